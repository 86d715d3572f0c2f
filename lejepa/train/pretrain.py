"""The pretrain stage: launch `lejepa.train.rank` on every rank, then report the run's summary.

`lejepa-pipeline pretrain --config FILE [--set key=value ...]` (or `python -m lejepa.train.pretrain ...`) runs
the launch described by the `launch` section (local processes, a hostfile, or a Slurm job) and prints the
run's summary as its last line: `run_dir`, `checkpoint`, `encoder`, `steps`, `final_loss`. Running it
again on the same `pretrain.run_name` resumes from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from lejepa.cli import config_from, run_stage, stage_parser
from lejepa.config import SECRETS_ENV, PipelineConfig, blank_credentials, storage_secrets
from lejepa.data.manifest import locate_manifest
from lejepa.store import layout
from lejepa.store.lease import Lease
from lejepa.store.storage import Storage
from lejepa.train.launch import LaunchError, LaunchFailed, describe_job, job_alive, launch


def launch_inputs(cfg: PipelineConfig, folder: Path) -> tuple[list[str], dict[str, str]]:
    """Write `cfg` for the ranks to `folder/config.yaml` and return (program_args, env).

    The file holds no secret: the storage credentials and secret options are left out of it and returned in
    env instead, as SECRETS_ENV (which lejepa.store.storage reads), so neither a file nor a command line holds
    them. `folder` must be readable by every rank (for hostfile and Slurm launches: a shared file system).
    """
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(blank_credentials(cfg.model_dump(mode="json"), None), sort_keys=False))
    secrets = storage_secrets(cfg.storage)
    return ["--config", str(path)], {SECRETS_ENV: json.dumps(secrets)} if secrets else {}


@contextlib.contextmanager
def launch_folder(cfg: PipelineConfig, dry_run: bool = False) -> Iterator[Path]:
    """A private folder (mode 0700) for the ranks' config file, on the file system the ranks share.

    It lies under the working directory and goes when the launch ends. A Slurm job submitted without waiting
    starts later, so its folder stays, beside the job's script in `launch.slurm_dir`.
    """
    if cfg.launch.mode == "slurm" and not cfg.launch.wait and not dry_run:
        slurm_dir = Path(cfg.launch.slurm_dir).absolute()
        slurm_dir.mkdir(parents=True, exist_ok=True)
        yield Path(tempfile.mkdtemp(prefix="lejepa-launch-", dir=slurm_dir))
        return
    with tempfile.TemporaryDirectory(prefix=".lejepa-launch-", dir=Path.cwd()) as tmp:
        yield Path(tmp)


def run_pretrain(
    cfg: PipelineConfig,
    program_args: list[str] | None = None,
    *,
    dry_run: bool = False,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Launch training on every rank; returns the run's summary.

    The ranks read `cfg` from the file `launch_inputs` writes into a `launch_folder`, and its secrets from
    their environment. `program_args` (`--config/--set`, read by every rank) replaces that file; it is on
    every rank's command line, so it must hold no secret. `env` adds variables to every rank's environment
    (see `lejepa.train.launch.launch`). Unless `data.manifest` is set, the dataset is resolved here, once, and
    passed to every rank as `--set data.manifest=URL`, so no rank resolves it again (and none can find
    another version of it).
    """
    with contextlib.ExitStack() as stack:
        if program_args is None:
            folder = stack.enter_context(launch_folder(cfg, dry_run))
            program_args, handed = launch_inputs(cfg, folder)
            env = {**(env or {}), **handed}
        storage = Storage.from_config(cfg.storage)
        run = layout.run_url(storage, cfg.pretrain.run_name)
        if not cfg.data.manifest and not dry_run:
            manifest = json.dumps(locate_manifest(cfg, storage))
            program_args = [*program_args, "--set", f"data.manifest={manifest}"]
        lc = cfg.launch
        if (
            dry_run  # trains nothing
            or (lc.mode == "slurm" and not lc.wait)  # a job submitted without waiting is Slurm's to watch
            or (lc.mode == "hostfile" and lc.no_ssh and lc.node_rank != 0)  # node 0's launcher holds the run
        ):
            launch(cfg, program_args, dry_run=dry_run, env=env)
        else:
            with Lease(storage, run, "trained", job_alive=job_alive, describe_job=describe_job) as lease:
                launch(cfg, program_args, env=env, on_job=lease.attach_job)
    if dry_run:
        return {}
    return storage.read_json(f"{run}/{layout.SUMMARY}")


def finished_run(cfg: PipelineConfig) -> dict[str, Any]:
    """The summary.json of the finished run `pretrain.run_name`."""
    storage = Storage.from_config(cfg.storage)
    run = layout.run_url(storage, cfg.pretrain.run_name)
    if not storage.exists(f"{run}/{layout.SUMMARY}"):
        raise FileNotFoundError(f"no finished run at {run}: run the pretrain stage first")
    return storage.read_json(f"{run}/{layout.SUMMARY}")


def cli(argv: list[str] | None = None) -> int:
    parser = stage_parser("lejepa-pipeline pretrain", __doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="print the launch command (or sbatch script) only"
    )
    args = parser.parse_args(argv)
    return run_stage(
        lambda: run_pretrain(config_from(args), dry_run=args.dry_run) or None,
        LaunchError,
        LaunchFailed,
    )


if __name__ == "__main__":
    sys.exit(cli())
