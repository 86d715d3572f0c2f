"""What a run reports to a person: the self-contained HTML report in the run folder, and what
`lejepa-pipeline run` prints (its console view of Prefect's log and its closing summary)."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from flows.run import ConsoleView, summary, ui_command
from lejepa.config import load_config, redacted
from lejepa.data.shard import write_shards
from lejepa.evaluate.report import (
    html_report,
    results_table,
    text_table,
    write_figure,
    write_html_report,
)
from lejepa.store.layout import FIGURE, HTML_REPORT
from lejepa.store.storage import Storage

HISTORY = [
    {"step": s, "loss": 4.0 / s, "prediction": 1.0 / s, "sigreg": 60.0 / s, "probe_acc": 0.1 * s, "lr": 1e-3}
    for s in range(1, 9)
]
RELEASE = {
    "model_uri": "/store/models/tiny/v20260101-000000-abcdef12",
    "version": "v20260101-000000-abcdef12",
    "promoted": True,
    "reason": "first release",
}


def metrics_of(
    root: str, manifest: str = "/nowhere/manifest.json", overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """metrics.json as the evaluate stage writes it, for a run `tiny` with two models."""
    cfg = load_config(None, [f"storage.root={root}", "pretrain.run_name=tiny", *overrides])
    return {
        "run": f"{root}/runs/tiny",
        "encoder": {"sha256": "ab" * 32, "description": {"backbone": "resnet10t", "embed_dim": 512}},
        "dataset": {
            "name": "digits",
            "version": "v-123",
            "manifest": manifest,
            "splits": {
                "train": {"split": "train", "num_samples": 1637},
                "test": {"split": "val", "num_samples": 160},
            },
        },
        "models": {
            "encoder": {
                "linear_probe_top1": 0.8313,
                "knn_top1": 0.8375,
                "knn_dino_top1": 0.8012,
                "rankme": 40.75,
                "sigreg": 68.6,
            },
            "raw_pixels": {"linear_probe_top1": 0.9375, "knn_top1": 0.95},
        },
        "protocol": {"linear_probe": "LayerNorm + Linear", "knn": "cosine, k=20"},
        "config": redacted(cfg),
        "notes": ["<b>train</b> features read from the cache"],
    }


@pytest.fixture(scope="module")
def figure(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("figure") / FIGURE
    write_figure(HISTORY, metrics_of("/store"), path)
    return path.read_bytes()


def test_the_html_report_is_one_page_that_loads_nothing(figure: bytes) -> None:
    page = html_report(metrics_of("/store"), HISTORY, figure, release=RELEASE)

    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for outside in ("<script", "<link", "@import", "url(", "<iframe", "<object"):
        assert outside not in page.lower(), outside
    sources = re.findall(r'\ssrc="([^"]*)"', page)
    assert len(sources) == 1 and sources[0].startswith("data:image/png;base64,")
    assert base64.b64decode(sources[0].split(",", 1)[1]) == figure  # the figure itself, byte for byte

    # The results table, one row per model, as the Markdown report and the model card show them.
    assert re.search(r"<td>LeJEPA encoder</td><td class=\"n\">83\.13%</td><td class=\"n\">83\.75%</td>", page)
    assert 'raw pixels (logistic regression)</td><td class="n">93.75%' in page
    assert "| LeJEPA encoder | 83.13% | 83.75% | 80.12% | 40.75 |" in results_table(metrics_of("/store"))
    # The release, linked; the training curves as inline SVG, one per logged series.
    assert (
        'href="file:///store/models/tiny/v20260101-000000-abcdef12"' in page and "promoted to latest" in page
    )
    assert page.count("<polyline") == 5 and "steps 1 to 8" in page
    assert "&lt;b&gt;train&lt;/b&gt; features" in page  # text from the run is escaped, never markup


def test_before_publishing_the_report_says_how_to_publish() -> None:
    page = html_report(metrics_of("/store"), [], None)
    assert "Not published yet" in page and "No training log" in page and "No figure" in page


def test_the_html_report_holds_no_secret(figure: bytes) -> None:
    secrets = {
        "storage.access_key_id": "AKIAREPORTTESTKEY0001",
        "storage.secret_access_key": "report-secret-access-key-value-0001",
        "storage.options": '{"client_kwargs": {"aws_session_token": "report-session-token-value-0001"}}',
    }
    overrides = [f"{key}={value}" for key, value in secrets.items()]
    page = html_report(
        metrics_of("s3://bucket/lejepa", overrides=overrides), HISTORY, figure, release=RELEASE
    )
    assert "s3://bucket/lejepa" in page  # the config is there ...
    for value in (
        "AKIAREPORTTESTKEY0001",
        "report-secret-access-key-value-0001",
        "report-session-token-value",
    ):
        assert value not in page  # ... without its secrets


def test_write_html_report_reads_the_run_folder_and_publish_adds_the_release(tmp_path: Path) -> None:
    cfg = load_config(None, [f"storage.root={tmp_path}", "data.source=digits", "shard.workers=1"])
    manifest = write_shards(cfg, progress=False).manifest
    storage = Storage.from_config(cfg.storage)
    run = storage.url("runs", "tiny")
    storage.write_bytes(f"{run}/metrics.jsonl", "".join(json.dumps(r) + "\n" for r in HISTORY).encode())
    metrics = metrics_of(str(tmp_path), manifest)
    write_figure(HISTORY, metrics, tmp_path / "runs" / "tiny" / FIGURE)

    url = write_html_report(storage, run, metrics)
    assert url == f"{run}/{HTML_REPORT}"
    page = (tmp_path / "runs" / "tiny" / HTML_REPORT).read_text()
    # The shard table from the manifest: digits' 1797 images, split by the source's defaults.
    counts = json.loads(Path(manifest).read_text())["splits"]
    for split, info in counts.items():
        assert f'<td>{split}</td><td class="n">{info["num_samples"]}</td>' in page
    assert "data:image/png;base64," in page and "Not published yet" in page

    write_html_report(storage, run, metrics, RELEASE)
    assert RELEASE["version"] in (tmp_path / "runs" / "tiny" / HTML_REPORT).read_text()


def test_the_console_table_lines_up_top1_of_every_model() -> None:
    assert text_table(metrics_of("/store")).splitlines() == [
        "model                             linear probe top-1  kNN top-1",
        "LeJEPA encoder                                83.13%     83.75%",
        "raw pixels (logistic regression)              93.75%     95.00%",
    ]


def test_the_summary_says_where_everything_is_and_how_to_see_the_run(tmp_path: Path) -> None:
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    cfg = load_config(None, [f"storage.root={tmp_path}", "pretrain.run_name=tiny"])
    storage = Storage.from_config(cfg.storage)
    run = storage.url("runs", "tiny")
    storage.write_json(f"{run}/metrics.json", metrics_of(str(tmp_path)))
    storage.write_bytes(f"{run}/{HTML_REPORT}", b"<!DOCTYPE html>")
    result = {
        "evaluate": {"metrics": f"{run}/metrics.json", "figure": f"{run}/{FIGURE}"},
        "publish": {**RELEASE, "model_uri": f"{tmp_path}/models/tiny/{RELEASE['version']}"},
    }
    flow_run = uuid.uuid4()
    with temporary_settings(
        updates={PREFECT_HOME: str(tmp_path / "home")}, restore_defaults={PREFECT_API_URL}
    ):
        printed = summary(cfg, result, flow_run, telemetry_off=True).splitlines()
    assert "LeJEPA encoder                                83.13%     83.75%" in printed
    assert f"model card  {tmp_path}/models/tiny/{RELEASE['version']}/README.md" in printed
    assert f"report      {run}/{HTML_REPORT}" in printed and f"figure      {run}/{FIGURE}" in printed
    assert printed[-1].startswith(f"Prefect UI  PREFECT_HOME={tmp_path / 'home'} ")
    assert printed[-1].endswith(
        f"server start --analytics-off, then open http://127.0.0.1:4200/runs/flow-run/{flow_run}"
    )
    # A run on the user's own server: its page there.
    with temporary_settings(updates={PREFECT_API_URL: "http://prefect.example:4200/api"}):
        assert ui_command(flow_run, False) == f"http://prefect.example:4200/runs/flow-run/{flow_run}"


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("prefect.task_runs", logging.INFO, __file__, 1, message, None, None)


def test_the_console_view_keeps_the_log_short_and_turns_steps_into_one_bar(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    start = record(
        "Starting temporary server on http://127.0.0.1:8123\nSee https://www.prefect.io/docs for more"
    )
    plain = ConsoleView(progress_bar=False)
    assert plain.filter(start) and start.getMessage() == "Starting temporary server on http://127.0.0.1:8123"
    step = "[rank0]: [pretrain] step {}/30  loss {}  prediction 1.0  sigreg 2.0  lr 1e-3  90 img/s"
    assert plain.filter(
        record(step.format(10, 2.5))
    )  # off a terminal the lines stay, as the ranks print them

    terminal = io.StringIO()
    monkeypatch.setattr("sys.stderr", terminal)
    view = ConsoleView(progress_bar=True)
    assert not view.filter(record(step.format(10, 2.5))) and not view.filter(record(step.format(20, 1.25)))
    assert view.bar is not None and view.bar.n == 20 and view.bar.total == 30
    assert view.filter(record("[rank0]: [pretrain] checkpoint step00000020"))  # other lines still print
    assert not view.filter(record(step.format(30, 1.0)))
    assert view.bar is None  # closed at the last step
    drawn = terminal.getvalue()
    assert "pretrain: 100%" in drawn and "30/30" in drawn and "loss 1.0" in drawn
