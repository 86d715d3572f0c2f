"""The Prefect flows for real, under `prefect_test_harness`: caching, artifacts, retries and resumes.

Everything runs on the 8x8 digits with a tiny ResNet, one rank, a handful of steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterParentTaskRunId,
    LogFilter,
    LogFilterTaskRunId,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.results import ResultRecord, ResultRecordMetadata
from prefect.serializers import JSONSerializer, PickleSerializer, Serializer
from test_trust import OpensAFile

from lejepa.config import PipelineConfig, load_config
from lejepa.data.shard import write_shards
from tasks.options import configured

SECRET = "do-not-leak-this-secret-value"
# Tiny everything; no retry delays (the policies still retry).
TINY = [
    "data.source=digits",
    "shard.samples_per_shard=400",
    "model.backbone=resnet10t",
    "model.proj_hidden_dim=128",
    "model.proj_dim=32",
    "views.local_views=2",
    "loss.num_slices=64",
    "pretrain.batch_size=32",
    "pretrain.max_steps=4",
    "pretrain.checkpoint_every=2",
    "pretrain.num_workers=0",
    "launch.nproc_per_node=1",
    "evaluate.probe_epochs=2",
    "evaluate.baselines=false",
    "evaluate.num_workers=0",
    "orchestration.max_workers=2",
    *(f"orchestration.{s}.retry_delay_s=0" for s in ("shard", "pretrain", "evaluate", "publish")),
]


@pytest.fixture(scope="module", autouse=True)
def harness(prefect_api: None) -> None:
    """Every test here runs flows against the suite's temporary Prefect API."""


def tiny(root: str, *extra: str) -> PipelineConfig:
    return load_config(None, [f"storage.root={root}", *TINY, *extra])


def task_runs_of(flow_run_id: uuid.UUID) -> list:
    """Every task run of a flow run and of its subflows (a subflow hangs off a task run of its parent)."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id]))
        )
        children = (
            client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[r.id for r in runs])
                )
            )
            if runs
            else []
        )
    return runs + [t for child in children for t in task_runs_of(child.id)]


def states_of(task_run_id: uuid.UUID) -> list[str]:
    with get_client(sync_client=True) as client:
        return [s.name for s in client.read_task_run_states(task_run_id)]


def test_whole_flow_completes_publishes_artifacts_then_reruns_from_cache(tmp_path: Path) -> None:
    from flows.pipeline import pipeline

    root = tmp_path / "store"
    cfg = tiny(
        str(root),
        "pretrain.run_name=flow",
        f"storage.secret_access_key={SECRET}",
        "storage.access_key_id=AKIAFLOWTEST",
    )
    state = pipeline(config=cfg, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert set(result) == {"shard", "pretrain", "evaluate", "publish"}
    assert result["shard"]["num_samples"] == {"train": 1637, "val": 160}
    assert result["pretrain"]["steps"] == 4
    assert result["publish"]["promoted"] is True
    assert Path(result["publish"]["model_uri"], "release.json").is_file()

    runs = task_runs_of(state.state_details.flow_run_id)
    assert sum(r.name.startswith("shard ") for r in runs) == 6  # 1637 train + 160 val images, 400 a shard
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts() if a.key}
    assert {"shards-digits", "training-curves-flow", "metrics-flow", "release-flow"} <= set(artifacts)
    shards = json.loads(artifacts["shards-digits"].data)
    assert {r["split"]: r["samples"] for r in shards} == {"train": 1637, "val": 160, "rejected": 0}
    assert "| step |" in artifacts["training-curves-flow"].data
    assert json.loads(artifacts["metrics-flow"].data)[0]["model"] == "encoder"
    assert f"({Path(result['publish']['model_uri']).as_uri()})" in artifacts["release-flow"].data

    # The same inputs again: the dataset is up to date and every stage's task is served from the cache.
    again = pipeline(config=cfg, return_state=True)
    assert again.is_completed()
    assert again.result() == {
        **result,
        "shard": {**result["shard"], "up_to_date": True, "seconds": 0.0, "images_per_s": 0.0},
    }
    rerun = task_runs_of(again.state_details.flow_run_id)
    by_name = {r.name.rsplit("-", 1)[0]: r.state.name for r in rerun}
    assert by_name == {
        "lejepa-shard": "Completed",
        "check-dataset": "Completed",
        "pretrain": "Cached",
        "evaluate": "Cached",
        "publish": "Cached",
    }  # lejepa-shard: the subflow's own run

    # Results persist in the store, as plain JSON only, and no secret reached results, artifacts, rank
    # configs or the API.
    records = [json.loads(p.read_bytes()) for p in (root / "prefect-results").iterdir()]
    assert records and all(r["metadata"]["serializer"] == {"type": "lejepa-json"} for r in records)
    leaked = [p for p in root.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []
    assert not any(
        SECRET in (a.data if isinstance(a.data, str) else json.dumps(a.data)) for a in artifacts.values()
    )
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert SECRET not in json.dumps(run.parameters, default=str)


class FlakyProxy:
    """A TCP proxy to an S3 endpoint that drops every connection until `restore()`, then forwards."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.down = threading.Event()
        self.down.set()
        self.refused = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def restore(self) -> None:
        self.down.clear()

    def close(self) -> None:
        self.closed = True
        self.server.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.down.is_set():
                self.refused += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()  # a reset: what a dead endpoint behind a load balancer looks like
                continue
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@task(cache_key_fn=lambda context, parameters: f"doubled-{parameters['x']}")
def _doubled(x: int) -> dict:
    return {"value": 2 * x}


@flow
def _double_each(config: PipelineConfig, xs: list[int]) -> list[dict]:
    """One cached task per x, configured as every stage's task is (result storage and serializer)."""
    doubled = configured(_doubled, config, config.orchestration.shard)
    return [doubled(x) for x in xs]


def _record(serializer: Serializer, value: object) -> bytes:
    """A Prefect result record, as Prefect itself writes one, of `value` in `serializer`."""
    return ResultRecord(metadata=ResultRecordMetadata(serializer=serializer), result=value).serialize()


def test_a_task_result_in_the_store_that_is_not_plain_json_is_never_loaded(tmp_path: Path) -> None:
    cfg = tiny(str(tmp_path / "store"))
    results = tmp_path / "store" / "prefect-results"
    expected = [{"value": 2 * x} for x in (1, 2, 3, 4)]
    assert _double_each(cfg, [1, 2, 3, 4]) == expected

    # Someone who can write to the store plants results under three of the four keys.
    marker = tmp_path / "the-store-ran-code"
    (results / "doubled-1").write_bytes(_record(PickleSerializer(), OpensAFile(marker)))
    (results / "doubled-2").write_bytes(PickleSerializer().dumps(OpensAFile(marker)))  # a bare pickle
    # Prefect's own JSON: its decoder builds whatever class a file names.
    (results / "doubled-3").write_bytes(_record(JSONSerializer(), {"value": 666}))

    state = _double_each(cfg, [1, 2, 3, 4], return_state=True)
    assert not marker.exists()
    assert state.is_completed() and state.result() == expected
    # The three were refused and recomputed (and rewritten as plain JSON); the untouched one was a cache hit.
    runs = task_runs_of(state.state_details.flow_run_id)
    assert sorted(r.state.name for r in runs) == ["Cached", "Completed", "Completed", "Completed"]
    for key in ("doubled-1", "doubled-2", "doubled-3"):
        record = json.loads((results / key).read_bytes())
        assert record["metadata"]["serializer"] == {"type": "lejepa-json"}


def test_s3_endpoint_down_for_the_first_attempt_is_retried(bucket: str, aws_env: str) -> None:
    from flows.pipeline import shard_flow

    proxy = FlakyProxy(aws_env)
    cfg = tiny(
        f"s3://{bucket}/store",
        f"storage.endpoint_url={proxy.url}",
        # One attempt per request inside botocore: the retry we test is Prefect's, not the client's.
        "storage.options={config_kwargs: {retries: {max_attempts: 1}}}",
        "orchestration.shard.retries=20",
        "orchestration.shard.retry_delay_s=0.2",
    )
    try:
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(shard_flow, config=cfg, return_state=True)
            deadline = time.monotonic() + 120
            failed_attempt = None
            while failed_attempt is None:  # restore the endpoint once Prefect recorded a failed attempt
                assert time.monotonic() < deadline and not future.done(), "no failed attempt was recorded"
                with get_client(sync_client=True) as client:
                    for run in client.read_task_runs():
                        if run.name.startswith("check-dataset") and "AwaitingRetry" in states_of(run.id):
                            failed_attempt = run
                time.sleep(0.1)
            proxy.restore()
            state = future.result(timeout=180)
    finally:
        proxy.close()
    assert state.is_completed(), state.message
    assert proxy.refused > 0
    history = states_of(failed_attempt.id)
    assert history[-1] == "Completed" and "Retrying" in history
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[failed_attempt.id])))
    assert any("cannot connect to S3 endpoint" in log.message and "Retry 1/20" in log.message for log in logs)
    summary = state.result()
    assert summary["num_samples"] == {"train": 1637, "val": 160} and not summary["up_to_date"]


def test_killed_pretrain_attempt_is_retried_and_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    from flows.pipeline import pretrain_flow

    root = tmp_path / "store"
    cfg = tiny(
        str(root), "pretrain.run_name=killed", "pretrain.max_steps=8", "orchestration.pretrain.retries=1"
    )
    write_shards(cfg, progress=False)
    latest = root / "runs" / "killed" / "checkpoints" / "latest.json"
    killed_at: dict[str, int] = {}

    def kill_a_rank_after_the_first_checkpoint() -> None:
        deadline = time.monotonic() + 180
        while not latest.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        killed_at["step"] = json.loads(latest.read_text())["step"]
        commands = {p: " ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)}
        ranks = [
            p for p, c in commands.items() if "lejepa.train.rank" in c and "torch.distributed.run" not in c
        ]
        assert ranks, "no rank process found under the launcher"
        ranks[0].kill()

    with ThreadPoolExecutor(1) as pool:
        killer = pool.submit(kill_a_rank_after_the_first_checkpoint)
        state = pretrain_flow(config=cfg, return_state=True)
        killer.result()
    assert state.is_completed(), state.message
    assert state.result()["steps"] == 8
    assert 2 <= killed_at["step"] < 8
    steps = [json.loads(line)["step"] for line in (root / "runs" / "killed" / "metrics.jsonl").open()]
    assert steps == list(range(1, 9))  # continuous: the retry resumed, it did not start over
    (run,) = [r for r in task_runs_of(state.state_details.flow_run_id) if r.name.startswith("pretrain-")]
    assert "Retrying" in states_of(run.id)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[run.id])))
    logs = [log.message for log in logs]
    assert any(f"resuming at step {killed_at['step']}" in m for m in logs)  # rank logs reach the run log


def test_dask_task_runner_writes_the_same_shards_as_threads(tmp_path: Path) -> None:
    from flows.pipeline import shard_flow

    by_runner = {}
    for runner in ("threads", "dask"):
        root = tmp_path / runner
        state = shard_flow(config=tiny(str(root), f"orchestration.task_runner={runner}"), return_state=True)
        assert state.is_completed(), state.message
        manifest = json.loads(Path(state.result()["manifest"]).read_text())
        by_runner[runner] = sorted(s["sha256"] for s in manifest["shards"])
    assert len(by_runner["dask"]) == 6 and by_runner["dask"] == by_runner["threads"]


def test_run_command_exits_2_on_a_user_error_inside_the_flow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.run import cli

    missing = tmp_path / "no-such-folder"
    rc = cli(
        [
            "--set",
            f"storage.root={tmp_path / 'store'}",
            "--set",
            "data.source=imagefolder",
            "--set",
            f"data.path={missing}",
            "--set",
            "orchestration.shard.retries=0",
        ]
    )
    assert rc == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(missing) in last, last


def test_the_last_line_of_a_failed_run_is_the_error(tmp_path: Path) -> None:
    # As a user runs it: its own process and Prefect's temporary API, which used to log its shutdown last.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    missing = tmp_path / "no-such-folder"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "flows.cli", "run"),
            *("--set", f"storage.root={tmp_path / 'store'}", "--set", "data.source=imagefolder"),
            *("--set", f"data.path={missing}", "--set", "orchestration.shard.retries=0"),
        ],
        cwd=Path(__file__).parents[1],
        env={**env, "PREFECT_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    last = done.stdout.strip().splitlines()[-1]
    assert done.returncode == 2 and last.startswith("error: ") and str(missing) in last, done.stdout[-3000:]
