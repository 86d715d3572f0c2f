"""The Prefect flows: the whole pipeline (shard -> pretrain -> evaluate -> publish) and one flow per stage.

Every flow takes the typed `PipelineConfig` as its `config` parameter, so the UI's Run form shows every
option with its default and validates it, plus flags (`force`, `continual`). Flows only compose: the
stages' work is in `lejepa/`, their tasks in `tasks/stages.py`, the tasks' cache keys, retries and result
storage in `tasks/options.py`, and what the UI shows in `tasks/artifacts.py`.

The dataset is resolved once: after the shard stage (or from `data.manifest`, which skips it), the flow
sets `data.manifest` to that manifest, so pretraining, every rank and evaluation read exactly it.

Continual mode (recurring runs): shard groups are keyed by their own samples, so only what is new in the
source is written; the run is named after the dataset version (a new dataset is a new run, the same one
is cached); it warm-starts from the latest published model; and publish promotes only past the gate,
which compares top-1 with the latest release's only when both were scored on the same test set (a grown
source usually adds test samples: then the release must clear `publish.min_top1` alone).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from lejepa.config import OrchestrationConfig, PipelineConfig
from lejepa.data.shard import GroupResult, ShardPlan
from lejepa.store.lease import Lease
from tasks import stages
from tasks.options import commit_key, configured, evaluate_key, group_key, pretrain_key, publish_key

# The Run form's defaults (flows never mutate their config: continual mode works on a copy).
DEFAULTS = PipelineConfig()


def task_runner(orchestration: OrchestrationConfig) -> TaskRunner:
    """Threads on this machine, or a Dask cluster (an existing one at dask_address, else a local one)."""
    if orchestration.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if orchestration.dask_address:
            return DaskTaskRunner(address=orchestration.dask_address)
        workers = orchestration.max_workers or os.cpu_count() or 1
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "dashboard_address": None}
        )
    return ThreadPoolTaskRunner(max_workers=orchestration.max_workers)


def _map_shard_groups(
    plan: ShardPlan, cfg: PipelineConfig, continual: bool, force: bool
) -> list[GroupResult]:
    """Submit one shard-group task per group to the flow's task runner and wait for all of them."""
    runner = configured(stages.shard_group, cfg, cfg.orchestration.shard, refresh=force)
    # Each task gets a plan of its own group only: Prefect walks every parameter before a task runs, and
    # the whole plan (every item of the dataset) per task made sharding Fashion-MNIST take minutes. Not
    # quote()d instead: Dask would hand the task the annotation's bare tuple.
    futures = [
        runner.submit(replace(plan, groups=[group], listing_rejects=[]), 0, group_key(plan, i, continual))
        for i, group in enumerate(plan.groups)
    ]
    return [GroupResult.from_json(future.result()) for future in futures]


@flow(name="lejepa-shard-groups")
def _write_dataset(config: PipelineConfig, force: bool = False, continual: bool = False) -> dict[str, Any]:
    """Plan the groups, map one task per group onto this flow's task runner, then commit the manifest.

    The flow holds the dataset version's lease from the first group to the commit (one writer per dataset):
    the lease spans tasks, so it is the one store access outside a task.
    """
    policy = config.orchestration.shard
    plan = configured(stages.plan, config, policy)(config)
    with Lease(plan.storage, plan.dataset_url, "sharded"):
        results = _map_shard_groups(plan, config, continual, force)
        commit = configured(stages.commit_shards, config, policy, refresh=force)
        return commit(config, quote(plan), results, key=commit_key(plan, results))


@flow(name="lejepa-shard", log_prints=True)
def shard_flow(
    config: PipelineConfig = DEFAULTS, force: bool = False, continual: bool = False
) -> dict[str, Any]:
    """Shard the source into `storage.root`; returns at once when this exact dataset is committed."""
    committed = configured(stages.check_dataset, config, config.orchestration.shard)(config, force)
    if committed is not None:
        return committed
    runner = task_runner(config.orchestration)
    return _write_dataset.with_options(task_runner=runner)(config, force, continual)


def _stored_dataset(config: PipelineConfig) -> dict[str, Any]:
    return configured(stages.read_dataset, config, config.orchestration.shard)(config)


@flow(name="lejepa-pretrain", log_prints=True)
def pretrain_flow(config: PipelineConfig = DEFAULTS, force: bool = False) -> dict[str, Any]:
    """Pretrain on the dataset already in storage: `data.manifest`, else the source's own, else the latest
    of `data.name`."""
    dataset = _stored_dataset(config)
    return _pretrain(with_manifest(config, dataset["manifest"]), dataset, force)


@flow(name="lejepa-evaluate", log_prints=True)
def evaluate_flow(config: PipelineConfig = DEFAULTS, force: bool = False) -> dict[str, Any]:
    """Evaluate the run `pretrain.run_name` already in storage."""
    trained = configured(stages.read_run, config, config.orchestration.evaluate)(config)
    return _evaluate(config, trained, force)


@flow(name="lejepa-publish", log_prints=True)
def publish_flow(config: PipelineConfig = DEFAULTS, force: bool = False) -> dict[str, Any]:
    """Publish the evaluated run `pretrain.run_name`; `force` promotes past the gate."""
    evaluated = configured(stages.read_evaluation, config, config.orchestration.publish)(config)
    return _publish(config, evaluated, force)


@flow(name="lejepa-pipeline", log_prints=True)
def pipeline(
    config: PipelineConfig = DEFAULTS, force: bool = False, continual: bool = False
) -> dict[str, Any]:
    """shard -> pretrain -> evaluate -> publish; returns each stage's summary under its name.

    force: redo every stage and promote past the gate. continual: the recurring mode (see module doc).
    """
    if config.data.manifest:
        dataset = _stored_dataset(config)
    else:
        dataset = shard_flow(config, force=force, continual=continual)
    config = with_manifest(config, dataset["manifest"])
    if continual:
        config = continual_config(config, dataset)
    trained = _pretrain(config, dataset, force)
    evaluated = _evaluate(config, trained, force)
    published = _publish(config, evaluated, force)
    return {"shard": dataset, "pretrain": trained, "evaluate": evaluated, "publish": published}


def with_manifest(config: PipelineConfig, manifest: str) -> PipelineConfig:
    """A copy of `config` whose `data.manifest` is `manifest`: every later stage and rank reads exactly it."""
    config = config.model_copy(deep=True)
    config.data.manifest = manifest
    return config


def continual_config(config: PipelineConfig, dataset: dict[str, Any]) -> PipelineConfig:
    """This recurring run's config: a run per dataset version, warm-started from the latest release."""
    config = config.model_copy(deep=True)
    name = config.publish.name or config.pretrain.run_name
    latest = configured(stages.latest_release, config, config.orchestration.publish)(config, name)
    config.publish.name = name  # the model keeps its name while run names follow the data
    config.pretrain.run_name = f"{config.pretrain.run_name}-{dataset['version']}"
    if latest is not None:
        config.pretrain.init_from = latest["model_uri"]
    start = config.pretrain.init_from or "scratch"
    get_run_logger().info("continual run %s, warm start from %s", config.pretrain.run_name, start)
    return config


def _pretrain(config: PipelineConfig, dataset: dict[str, Any], force: bool) -> dict[str, Any]:
    task = configured(stages.pretrain, config, config.orchestration.pretrain, refresh=force)
    return task(config, dataset, key=pretrain_key(config, dataset))


def _evaluate(config: PipelineConfig, trained: dict[str, Any], force: bool) -> dict[str, Any]:
    task = configured(stages.evaluate, config, config.orchestration.evaluate, refresh=force)
    return task(config, trained, key=evaluate_key(config, trained))


def _publish(config: PipelineConfig, evaluated: dict[str, Any], force: bool) -> dict[str, Any]:
    task = configured(stages.publish, config, config.orchestration.publish, refresh=force)
    return task(config, evaluated, force, key=publish_key(config, evaluated, force))


FLOWS = {
    "pipeline": pipeline,
    "shard": shard_flow,
    "pretrain": pretrain_flow,
    "evaluate": evaluate_flow,
    "publish": publish_flow,
}
