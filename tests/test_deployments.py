"""Deployments with real parts: a `prefect server`, a process work pool, a worker subprocess, the API.

What the UI's Run button does is a flow run created from a deployment with the form's parameters; this
test does exactly that with non-default parameters, waits for the worker to finish it, and checks the
release it published. The nightly deployment must hold its cron schedule and get upcoming runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_flows import TINY

from lejepa.config import load_config
from lejepa.testing import stop
from lejepa.train.launch import free_port as _free_port

PREFECT = Path(sys.executable).parent / "prefect"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """`prefect server start` on a free loopback port; yields the environment that talks to it."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
    }
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    if r.read() == b"true":
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (home / "server.log").read_text()
            time.sleep(0.2)
        yield env
    finally:
        stop(proc)
        log.close()


def test_run_button_on_the_manual_deployment_and_the_nightly_schedule(
    server: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("PREFECT_HOME", "PREFECT_API_URL", "PREFECT_SERVER_ANALYTICS_ENABLED"):
        monkeypatch.setenv(key, server[key])
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    subprocess.run(
        [str(PREFECT), "work-pool", "create", "lejepa-test", "--type", "process"],
        env=server,
        check=True,
        capture_output=True,
    )
    registered = subprocess.run(
        [sys.executable, "-m", "flows.cli", "deploy", "--work-pool", "lejepa-test", "--cron", "0 2 * * *"],
        env=server,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert registered.returncode == 0, registered.stderr
    assert "registered 6 deployments" in registered.stdout

    worker_log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen(
        [str(PREFECT), "worker", "start", "--pool", "lejepa-test", "--type", "process"],
        env=server,
        stdout=worker_log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    root = tmp_path / "store"
    config = load_config(
        None,
        [
            f"storage.root={root}",
            *TINY,
            "pretrain.run_name=from-ui",
            "publish.name=ui-model",
            "pretrain.max_steps=2",
        ],
    )
    try:
        with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}):
            with get_client(sync_client=True) as client:
                manual = client.read_deployment_by_name("lejepa-pipeline/manual")
                nightly = client.read_deployment_by_name("lejepa-pipeline/nightly")
                # The Run form posts the edited parameters: here a tiny digits run into tmp storage.
                run = client.create_flow_run_from_deployment(
                    manual.id, parameters={"config": json.loads(config.model_dump_json())}
                )
                deadline = time.monotonic() + 300
                while not (run := client.read_flow_run(run.id)).state.is_final():
                    assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
                    time.sleep(1)
                assert run.state.is_completed(), (tmp_path / "worker.log").read_text()[-3000:]

                assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
                assert nightly.parameters["continual"] is True
                deadline = time.monotonic() + 60
                while not (
                    upcoming := client.read_flow_runs(deployment_filter=_deployment_filter(nightly.id))
                ):
                    assert time.monotonic() < deadline, "the scheduler created no runs for the nightly"
                    time.sleep(0.5)
                assert all(r.state.is_scheduled() for r in upcoming)
                stage_names = {d.name for d in client.read_deployments()}
    finally:
        stop(worker)
        worker_log.close()

    latest = json.loads((root / "models" / "ui-model" / "latest.json").read_text())
    release = json.loads(Path(latest["model_uri"], "release.json").read_text())
    assert release["run"].endswith("runs/from-ui") and release["promoted"]
    summary = json.loads((root / "runs" / "from-ui" / "summary.json").read_text())
    assert summary["steps"] == 2  # the non-default parameter reached the ranks
    assert stage_names == {"manual", "nightly"}


def _deployment_filter(deployment_id):  # noqa: ANN001, ANN202
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    return DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
