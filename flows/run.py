"""`lejepa-pipeline run` and `lejepa-pipeline demo`: the whole Prefect flow on this machine.

No server is needed: without PREFECT_API_URL, Prefect starts its temporary API for the run. Its database
lives under PREFECT_HOME, so the run's history stays there after the command ends, and
`prefect server start` with the same PREFECT_HOME shows it in the UI.

The console shows Prefect's line for each flow and task, training as one progress bar (on a terminal;
the run's log in Prefect keeps every line the ranks print), and at the end a summary: top-1 of the
encoder and its baselines, where the release, model card, figure and HTML report are, and the command
that opens this run in the UI. The last printed line is a JSON object holding each stage's summary under
its name.

Prefect's telemetry is off for these runs unless it is set explicitly (environment, profile or
prefect.toml): offline, the temporary server's telemetry printed tracebacks and ERROR lines although
nothing had failed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

from lejepa.cli import USER_ERRORS, config_from, stage_parser
from lejepa.config import ConfigError, PipelineConfig
from lejepa.evaluate.report import text_table
from lejepa.store.layout import CARD, HTML_REPORT
from lejepa.store.storage import Storage
from lejepa.train.launch import LaunchError

FLOW_USER_ERRORS = (*USER_ERRORS, LaunchError)
ANALYTICS = "PREFECT_SERVER_ANALYTICS_ENABLED"


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
    telemetry_off = _turn_telemetry_off()
    from flows.pipeline import pipeline  # Prefect is slow to import: only for commands that need it

    with _console_view():
        try:
            state = pipeline(config=cfg, force=args.force, continual=args.continual, return_state=True)
            result = state.result()  # a failed run raises its stage's own error here
            _stop_temporary_server()
        except Exception as exc:  # the failed stage's own error, already in the run's log
            _stop_temporary_server()
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            if isinstance(exc, FLOW_USER_ERRORS):  # the user's to fix, as every stage command says it
                print(f"error: {first_line}", file=sys.stderr)
                return 2
            print(f"error: {type(exc).__name__}: {first_line}", file=sys.stderr)
            return 1
    print(summary(cfg, result, state.state_details.flow_run_id, telemetry_off))
    print(json.dumps(result, default=str))
    return 0


def _turn_telemetry_off() -> bool:
    """Prefect's telemetry off, where nobody set it: the SDK's (DO_NOT_TRACK, read at import) and the
    temporary server's (PREFECT_SERVER_ANALYTICS_ENABLED, which the server process inherits). Returns
    whether the server's was turned off here."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from prefect.settings import get_current_settings

    # model_fields_set holds what any source set: the environment, a profile, prefect.toml or pyproject.
    if ANALYTICS in os.environ or "analytics_enabled" in get_current_settings().server.model_fields_set:
        return False
    os.environ[ANALYTICS] = "false"
    return True


class ConsoleView(logging.Filter):
    """What Prefect's console handler shows of a run; the run's log in Prefect keeps every record.

    The temporary server's start is one line, and on a terminal the ranks' `[pretrain] step N/T ...` lines
    drive one progress bar.
    """

    STEP = re.compile(r"\[pretrain\] step (\d+)/(\d+)\s+loss (\S+)")

    def __init__(self, progress_bar: bool) -> None:
        super().__init__()
        self.progress_bar = progress_bar
        self.bar: Any = None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Starting temporary server"):
            record.msg, record.args = message.splitlines()[0], ()
        step = self.STEP.search(message) if self.progress_bar else None
        if step:
            self._advance(int(step[1]), int(step[2]), step[3])
            return False
        if self.bar is not None:
            self.bar.clear()  # the line prints where the bar was; the next step redraws it
        return True

    def _advance(self, step: int, total: int, loss: str) -> None:
        from tqdm import tqdm

        if self.bar is None or self.bar.total != total or step < self.bar.n:
            self.close()
            self.bar = tqdm(total=total, desc="pretrain", unit="step", file=sys.stderr, dynamic_ncols=True)
        self.bar.set_postfix_str(f"loss {loss}", refresh=False)
        self.bar.update(step - self.bar.n)
        if step >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@contextlib.contextmanager
def _console_view() -> Iterator[ConsoleView]:
    """ConsoleView on Prefect's console handlers while the flow runs."""
    from prefect.logging.handlers import PrefectConsoleHandler

    view = ConsoleView(progress_bar=sys.stderr.isatty())
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    for handler in handlers:
        handler.addFilter(view)
    try:
        yield view
    finally:
        view.close()
        for handler in handlers:
            handler.removeFilter(view)


def _stop_temporary_server() -> None:
    """Stop Prefect's temporary API (started when no PREFECT_API_URL is set) now rather than at exit, so
    its closing log line comes before ours and the last line is the result or the `error:` line."""
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    APILogWorker.drain_all(timeout=5)  # the run's last log lines go to the API while it still runs
    SubprocessASGIServer().stop()  # the running singleton; a no-op when none was started


def summary(
    cfg: PipelineConfig, result: dict[str, Any], flow_run_id: UUID | None, telemetry_off: bool
) -> str:
    """The end of a run for a person: top-1 of every model, where the outputs are, how to see the run."""
    evaluated, published = result["evaluate"], result["publish"]
    storage = Storage.from_config(cfg.storage)
    metrics = storage.read_json(evaluated["metrics"])
    report = f"{posixpath.dirname(evaluated['metrics'])}/{HTML_REPORT}"
    places = {
        "release": f"{published['model_uri']} ({published['reason']})",
        "model card": f"{published['model_uri']}/{CARD}",
        "figure": evaluated["figure"],
        "report": report if storage.exists(report) else "none (evaluated before reports were written)",
        "Prefect UI": ui_command(flow_run_id, telemetry_off),
    }
    return "\n".join(
        ["", text_table(metrics), "", *(f"{name:<11} {value}" for name, value in places.items())]
    )


def ui_command(flow_run_id: UUID | None, telemetry_off: bool) -> str:
    """How to open this flow run in Prefect's UI: its URL on the user's server, or the command that serves
    the temporary API's database (under PREFECT_HOME) and then the URL."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    page = f"runs/flow-run/{flow_run_id}"
    if settings.api.url:
        return f"{settings.ui_url}/{page}"
    prefect = Path(sys.executable).parent / "prefect"
    on_path = shutil.which("prefect")
    command = "prefect" if on_path and Path(on_path).resolve() == prefect.resolve() else str(prefect)
    start = f"PREFECT_HOME={settings.home} {command} server start" + (
        " --analytics-off" if telemetry_off else ""
    )
    return f"{start}, then open http://{settings.server.api.host}:{settings.server.api.port}/{page}"


# The demo is the tuned CPU profile on a clock: pretraining stops after DEMO_SECONDS of steps, whatever the
# machine's speed, so the whole demo (install included) ends in about ten minutes on 2 cores. At this
# budget a narrower ResNet-10 (stages 32-64-128-256 wide) learns more: its steps take about half as long
# as the profile's earlier 48-96-192-384, and in 5-minute trials it led that width by 0.2 points (86.2%
# against 86.0%). Everything else is the profile's (its lr, 5e-3, was the demo's first: in the demo's
# trials 3e-3 and 7e-3 scored lower). docs/benchmarks.md#demo has the demo's numbers.
DEMO_PROFILE = Path(__file__).resolve().parents[1] / "infra" / "cpu.yaml"
DEMO_SECONDS = 200
DEMO_SETTINGS = [
    "pretrain.run_name=demo",
    f"pretrain.time_budget_s={DEMO_SECONDS}",
    "pretrain.epochs=20",
    "model.backbone_kwargs={layers: [1, 1, 1, 1], channels: [32, 64, 128, 256], stem_width: 32}",
]


def demo_cli(argv: list[str] | None = None) -> int:
    """The whole flow on Fashion-MNIST with infra/cpu.yaml, local storage, the CPU, a timed pretraining."""
    if not DEMO_PROFILE.is_file():
        print(
            f"error: the demo reads {DEMO_PROFILE}: run it from a checkout of the repository", file=sys.stderr
        )
        return 2
    settings = [arg for setting in DEMO_SETTINGS for arg in ("--set", setting)]
    return cli(["--config", str(DEMO_PROFILE), *settings, *(argv or [])], prog="lejepa-pipeline demo")
