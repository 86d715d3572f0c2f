"""Register the pipeline's deployments on a work pool: what the UI's Run buttons and the schedule use.

- `lejepa-pipeline/manual`: the whole flow, run on demand (the Run form shows every config option).
- `lejepa-pipeline/nightly`: the same flow in continual mode on a cron schedule (default 02:00 daily).
- `lejepa-shard|pretrain|evaluate|publish/manual`: one stage, reading upstream outputs from storage.

Entry points are module paths (`flows.pipeline:pipeline`), so a worker needs this package installed and
nothing else: a `process` pool on this machine, or a Docker / Kubernetes pool whose image has it
(`lejepa-pipeline deploy --work-pool k8s-pool --image REGISTRY/lejepa:TAG`). See infra/README.md.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from lejepa.cli import config_from, run_stage, stage_parser
from lejepa.config import PipelineConfig, blank_credentials

WORK_POOL = "lejepa"
NIGHTLY_CRON = "0 2 * * *"


def default_parameters(cfg: PipelineConfig) -> dict[str, Any]:
    """The config as a deployment's default parameters, without storage credentials or secret options.

    Deployments live in the Prefect database; credentials belong to the worker's environment (AWS_*).
    """
    return {"config": blank_credentials(cfg.model_dump(mode="json"), placeholder=None)}


def deployments(cfg: PipelineConfig, cron: str = NIGHTLY_CRON, image: str | None = None) -> list[Any]:
    """The RunnerDeployments: manual and nightly pipeline, and a manual one per stage."""
    from prefect.deployments.runner import EntrypointType

    from flows.pipeline import FLOWS, pipeline

    parameters = default_parameters(cfg)
    common: dict[str, Any] = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": ["lejepa"]}
    if image:
        common["job_variables"] = {"image": image}
    found = [
        pipeline.to_deployment(
            name="manual", parameters=parameters, description="The whole pipeline, on demand.", **common
        ),
        pipeline.to_deployment(
            name="nightly",
            cron=cron,
            parameters={**parameters, "continual": True},
            description="Recurring pretraining: new data only, warm start, publish only if better.",
            **common,
        ),
    ]
    for stage, stage_flow in FLOWS.items():
        if stage != "pipeline":
            found.append(
                stage_flow.to_deployment(
                    name="manual", parameters=parameters, description=f"The {stage} stage alone.", **common
                )
            )
    return found


def deploy_all(
    cfg: PipelineConfig, work_pool: str = WORK_POOL, cron: str = NIGHTLY_CRON, image: str | None = None
) -> list[UUID]:
    """Create or update every deployment on `work_pool` (which must exist); returns their ids."""
    from prefect import deploy

    return deploy(
        *deployments(cfg, cron, image),
        work_pool_name=work_pool,
        image=image,
        build=False,
        push=False,
        print_next_steps_message=False,
    )


def cli(argv: list[str] | None = None) -> int:
    """`lejepa-pipeline deploy [--config FILE] [--set k=v ...] [--work-pool NAME] [--cron CRON]`."""
    parser = stage_parser("lejepa-pipeline deploy", __doc__.splitlines()[0])
    parser.add_argument("--work-pool", default=WORK_POOL, help=f"work pool name (default {WORK_POOL})")
    parser.add_argument("--cron", default=NIGHTLY_CRON, help=f"nightly schedule (default '{NIGHTLY_CRON}')")
    parser.add_argument("--image", help="container image for Docker/Kubernetes pools (built elsewhere)")
    args = parser.parse_args(argv)

    def report(ids: list[UUID]) -> int:
        print(f"registered {len(ids)} deployments on work pool '{args.work_pool}'")
        return 0

    return run_stage(
        lambda: deploy_all(config_from(args), args.work_pool, args.cron, args.image),
        ValueError,  # e.g. the work pool does not exist
        report=report,
    )
