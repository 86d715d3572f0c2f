"""`lejepa-pipeline run` and `lejepa-pipeline demo`: the whole Prefect flow on this machine.

No server is needed: without PREFECT_API_URL, Prefect starts its ephemeral API for the run. The last
printed line is a JSON object holding each stage's summary under its name.
"""

from __future__ import annotations

import json
import sys

from lejepa.cli import USER_ERRORS, config_from, stage_parser
from lejepa.config import ConfigError
from lejepa.launch import LaunchError
from lejepa.lease import LeaseHeld

FLOW_USER_ERRORS = (*USER_ERRORS, LaunchError, LeaseHeld)


def cli(argv: list[str] | None = None, prog: str = "lejepa-pipeline run") -> int:
    """`lejepa-pipeline run [--config FILE] [--set key=value ...] [--force] [--continual]`."""
    parser = stage_parser(prog, "Run shard -> pretrain -> evaluate -> publish.")
    parser.add_argument("--force", action="store_true", help="redo every stage and promote past the gate")
    parser.add_argument(
        "--continual", action="store_true", help="recurring mode: new data only, warm start, gated publish"
    )
    args = parser.parse_args(argv)
    try:
        cfg = config_from(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from flows.pipeline import pipeline  # Prefect is slow to import: only for commands that need it

    try:
        result = pipeline(config=cfg, force=args.force, continual=args.continual)
        _stop_temporary_server()
    except Exception as exc:  # the failed stage's own error, already in the run's log
        _stop_temporary_server()
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        if isinstance(exc, FLOW_USER_ERRORS):  # the user's to fix, as every stage command says it
            print(f"error: {first_line}", file=sys.stderr)
            return 2
        print(f"error: {type(exc).__name__}: {first_line}", file=sys.stderr)
        return 1
    published, evaluated = result["publish"], result["evaluate"]
    print(f"release: {published['model_uri']} ({published['reason']})")
    print(
        f"metrics: linear-probe top-1 {evaluated['linear_probe_top1']}, kNN top-1 {evaluated['knn_top1']}, "
        f"baselines {evaluated['baselines']} ({evaluated['metrics']})"
    )
    print(json.dumps(result, default=str))
    return 0


def _stop_temporary_server() -> None:
    """Stop Prefect's temporary API (started when no PREFECT_API_URL is set) now rather than at exit, so
    its closing log line comes before ours and the last line is the result or the `error:` line."""
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    APILogWorker.drain_all(timeout=5)  # the run's last log lines go to the API while it still runs
    SubprocessASGIServer().stop()  # the running singleton; a no-op when none was started


def demo_cli(argv: list[str] | None = None) -> int:
    """The whole flow on the defaults: local storage, Fashion-MNIST, CPU, 2 local processes."""
    return cli(argv, prog="lejepa-pipeline demo")
