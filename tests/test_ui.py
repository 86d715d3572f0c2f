"""The Prefect UI in a real browser: a tiny pipeline run against a real `prefect server`, then the run's
pages in Debian's headless Chromium, whose DOM (after the UI's JavaScript has run) must show the run.

The page the server sends holds none of it (checked): the flow run's name, its state and the probe's
score reach the DOM only through the UI's own API calls and rendering.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from test_deployments import server  # noqa: F401  (the fixture: `prefect server start` on a free port)
from test_flows import TINY

from lejepa.evaluate.report import percent

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium: run infra/install-test-deps.sh as root"
)


def rendered_text(url: str, profile: Path) -> str:
    """The visible text of `url` once headless Chromium has run its scripts (15 s of virtual time)."""
    done = subprocess.run(
        [
            str(CHROMIUM),
            *("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"),
            f"--user-data-dir={profile}",
            "--virtual-time-budget=15000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return visible_text(done.stdout)


def visible_text(page: str) -> str:
    page = re.sub(r"<(script|style)\b.*?</\1>", " ", page, flags=re.S | re.I)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


def served_text(url: str) -> str:
    """The text of the page as the server sends it, before any script runs (the UI's deep links come with
    its index.html and status 404)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return visible_text(response.read().decode())
    except urllib.error.HTTPError as error:
        return visible_text(error.read().decode())


def api(base: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{base}/{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_the_ui_shows_the_run_its_state_and_its_metrics_artifact(
    server: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    root = tmp_path / "store"
    overrides = [f"storage.root={root}", *TINY, "pretrain.max_steps=2", "pretrain.run_name=ui-run"]
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", *(a for o in overrides for a in ("--set", o))],
        cwd=Path(__file__).parents[1],
        env=server,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    console = done.stdout + done.stderr
    assert "Traceback" not in console and "| ERROR" not in console, console[-3000:]

    # The summary's last word before the JSON line: this run's page on the server it ran against.
    api_url = server["PREFECT_API_URL"]
    base = api_url.removesuffix("/api")
    ui_line = next(line for line in done.stdout.splitlines() if line.startswith("Prefect UI"))
    page = re.search(rf"{re.escape(base)}/runs/flow-run/([0-9a-f-]{{36}})$", ui_line)
    assert page, ui_line
    flow_run = api(api_url, f"flow_runs/{page[1]}")
    assert flow_run["state"]["type"] == "COMPLETED"

    metrics = json.loads((root / "runs" / "ui-run" / "metrics.json").read_text())
    probe = metrics["models"]["encoder"]["linear_probe_top1"]
    artifacts = api(api_url, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [page[1]]}}})
    by_key = {a["key"]: a for a in artifacts}
    assert {"metrics-ui-run", "training-curves-ui-run", "release-ui-run", "report-ui-run"} <= set(by_key)
    metrics_artifact = by_key["metrics-ui-run"]

    run_url = f"{base}/runs/flow-run/{page[1]}"
    assert flow_run["name"] not in served_text(run_url), "the server sent the name itself"

    run_page = rendered_text(run_url, tmp_path / "chromium")
    assert flow_run["name"] in run_page and "Completed" in run_page, run_page[:2000]
    assert "lejepa-pipeline" in run_page, run_page[:2000]

    artifact_page = rendered_text(
        f"{base}/artifacts/artifact/{metrics_artifact['id']}", tmp_path / "chromium"
    )
    # The table artifact rounds every score to 4 decimals; the UI shows the number as it is stored.
    assert "metrics-ui-run" in artifact_page and "linear_probe_top1" in artifact_page, artifact_page[:2000]
    assert str(round(probe, 4)) in artifact_page, (round(probe, 4), artifact_page[:2000])
    assert flow_run["name"] in artifact_page, artifact_page[:2000]

    # The run folder's report has the same score and, rewritten by publish, the release.
    report = (root / "runs" / "ui-run" / "report.html").read_text()
    release = json.loads(done.stdout.splitlines()[-1])["publish"]
    assert percent(probe) in report and release["version"] in report
