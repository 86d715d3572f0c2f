"""The pretrain stage: launch `lejepa.train` on every rank, then report the run's summary.

`lejepa-pipeline pretrain --config FILE [--set key=value ...]` (or `python -m lejepa.pretrain ...`) runs
the launch described by the `launch` section (local processes, a hostfile, or a Slurm job) and prints the
run's summary as its last line: `run_dir`, `checkpoint`, `encoder`, `steps`, `final_loss`. Running it
again on the same `pretrain.run_name` resumes from the latest checkpoint.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from lejepa.cli import config_from, forwarded, run_stage, stage_parser
from lejepa.config import PipelineConfig, blank_credentials
from lejepa.launch import LaunchError, launch
from lejepa.lease import LeaseHeld, RunLease
from lejepa.storage import Storage

CREDENTIAL_ENV = {
    "access_key_id": "AWS_ACCESS_KEY_ID",
    "secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "session_token": "AWS_SESSION_TOKEN",
}


class PretrainFailed(RuntimeError):
    """A rank of the training launch failed; the message holds the launcher's exit status."""


def run_url(cfg: PipelineConfig) -> str:
    """The run folder of `cfg.pretrain.run_name`."""
    return Storage.from_config(cfg.storage).url("runs", cfg.pretrain.run_name)


def launch_inputs(cfg: PipelineConfig, folder: Path) -> tuple[list[str], dict[str, str]]:
    """Write `cfg` for the ranks to `folder/config.yaml` and return (program_args, env).

    Storage credentials are left out of the file (blank, so the ranks fall back to the AWS chain) and
    returned as AWS_* variables instead, so nothing on disk holds them. `folder` must be readable by every
    rank (for hostfile and Slurm launches: a shared file system).
    """
    tree = blank_credentials(cfg.model_dump(mode="json"), placeholder=None)
    env: dict[str, str] = {}
    for key, name in CREDENTIAL_ENV.items():
        value = getattr(cfg.storage, key)
        if value is not None:
            env[name] = value if isinstance(value, str) else value.get_secret_value()
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return ["--config", str(path)], env


def run_pretrain(
    cfg: PipelineConfig,
    program_args: list[str],
    *,
    dry_run: bool = False,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Launch training with `program_args` (the `--config/--set` every rank reads); returns its summary.

    `env` adds variables to every rank's environment (see `lejepa.launch.launch`).
    """
    storage = Storage.from_config(cfg.storage)
    if dry_run or (cfg.launch.mode == "slurm" and not cfg.launch.wait):
        # A dry run trains nothing; a Slurm job submitted without waiting is Slurm's to supervise.
        status = launch(cfg, program_args, dry_run=dry_run, env=env)
    else:
        with RunLease(storage, run_url(cfg)):
            status = launch(cfg, program_args, env=env)
    if status != 0:
        raise PretrainFailed(f"training launch exited with status {status} (the rank's error is above)")
    if dry_run:
        return {}
    return storage.read_json(f"{run_url(cfg)}/summary.json")


def cli(argv: list[str] | None = None) -> int:
    parser = stage_parser("lejepa-pipeline pretrain", __doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="print the launch command (or sbatch script) only"
    )
    args = parser.parse_args(argv)
    return run_stage(
        lambda: run_pretrain(config_from(args), forwarded(args), dry_run=args.dry_run) or None,
        LaunchError,
        PretrainFailed,
        LeaseHeld,
    )


if __name__ == "__main__":
    sys.exit(cli())
