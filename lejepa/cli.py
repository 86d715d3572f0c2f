"""What every stage command shares: `--config FILE --set key=value ...` in, one JSON line out.

Errors a user can cause (an invalid config, storage or data problems, a folder another writer holds, a
stage's own user errors) end as one `error: ...` line on stderr and exit status 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from lejepa.config import ConfigError, PipelineConfig, load_config
from lejepa.store.errors import DataError
from lejepa.store.lease import LeaseHeld
from lejepa.store.storage import StorageError

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, StorageError, DataError, LeaseHeld)


def stage_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the `--config` and `--set` options every stage takes."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="pipeline YAML config (defaults apply when omitted)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set loss.lamb=0.1 (repeatable)",
    )
    return parser


def config_from(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.config, args.overrides)


def as_json(summary: Any) -> Any:
    if isinstance(summary, BaseModel):
        return summary.model_dump(mode="json")
    if dataclasses.is_dataclass(summary) and not isinstance(summary, type):
        return dataclasses.asdict(summary)
    return summary


def print_summary(summary: Any) -> int:
    """The default report: the summary as one JSON line (nothing for None), exit status 0."""
    if summary is not None:
        print(json.dumps(as_json(summary), default=str), flush=True)
    return 0


def one_line(exc: BaseException) -> str:
    """The error's message; for one re-raised from a DataLoader worker (the worker's whole traceback in
    its message), the original exception's message only."""
    message = str(exc)
    if "Original Traceback" in message:
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    return message


def run_stage(
    stage: Callable[[], Any], *user_errors: type[Exception], report: Callable[[Any], int] = print_summary
) -> int:
    """Run `stage` and `report` its result (the exit status), or print a user error as one line (2)."""
    try:
        summary = stage()
    except (*USER_ERRORS, *user_errors) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        return 2
    return report(summary)
