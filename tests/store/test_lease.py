"""One writer per run: the store lease, and ranks that die with their launcher.

The real test SIGKILLs a `lejepa.train.pretrain` launcher mid-run, as the OOM killer would, and checks that
none of its processes is left, that a retry resumes alone, and that a concurrent second attempt is refused.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from lejepa.config import load_config
from lejepa.data.shard import CRASH_AFTER_ENV, write_shards
from lejepa.store.layout import LEASE
from lejepa.store.lease import Lease, LeaseHeld
from lejepa.store.storage import Storage
from lejepa.testing import processes_with
from lejepa.with_parent import PARENT_ENV, STOP_GRACE_S


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 180) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_live_lease_refuses_a_second_holder_until_released(tmp_path: Path) -> None:
    storage = Storage.from_config(load_config(None, [f"storage.root={tmp_path}"]).storage)
    run = storage.url("runs", "r")
    first = Lease(storage, run, "trained", settle=0)
    first.acquire()
    with pytest.raises(LeaseHeld, match=f"is being trained by pid {os.getpid()}"):
        Lease(storage, run, "trained", settle=0).acquire()
    first.release()
    assert not (tmp_path / "runs" / "r" / LEASE).exists()
    with Lease(storage, run, "trained", settle=0):
        assert json.loads((tmp_path / "runs" / "r" / LEASE).read_text())["pid"] == os.getpid()


def test_a_lease_is_taken_over_only_when_its_holder_is_provably_gone(tmp_path: Path) -> None:
    storage = Storage.from_config(load_config(None, [f"storage.root={tmp_path}"]).storage)
    run = storage.url("runs", "r")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    live_elsewhere = {
        "host": "other-node",
        "pid": 1,
        "token": "x",
        "renewed": "now",
        "expires": time.time() + 60,
    }
    storage.write_json(f"{run}/{LEASE}", live_elsewhere)
    with pytest.raises(LeaseHeld, match="on other-node"):
        Lease(storage, run, "trained", settle=0).acquire()
    storage.write_json(f"{run}/{LEASE}", {**live_elsewhere, "expires": time.time() - 1})  # expired
    with Lease(storage, run, "trained", settle=0):
        pass
    gone_here = {**live_elsewhere, "host": socket.gethostname(), "pid": int(dead.stdout)}
    storage.write_json(f"{run}/{LEASE}", gone_here)  # this host, and that process has exited
    with Lease(storage, run, "trained", settle=0):
        pass


def _processes_of_launcher(pid: int) -> list[int]:
    """Processes started under the launcher `pid` (torchrun and the ranks carry its pid in their env)."""
    return processes_with(f"{PARENT_ENV}={pid}")


def test_a_killed_shard_stage_takes_its_pool_workers_along(tmp_path: Path) -> None:
    marker = f"LEJEPA_TEST_MARKER={uuid.uuid4().hex}"
    command = [sys.executable, "-m", "lejepa.data.shard", "--no-progress", "--set", "data.source=digits"]
    command += ["--set", f"storage.root={tmp_path}", "--set", "shard.samples_per_shard=50"]
    command += ["--set", "shard.workers=2", "--set", "shard.start_method=fork"]
    env = {**os.environ, CRASH_AFTER_ENV: "4", marker.split("=")[0]: marker.split("=")[1]}
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    wait_for(lambda: not processes_with(marker), "the killed stage's pool worker to exit", timeout=10)
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert sum(json.loads(rerun.stdout.strip().splitlines()[-1])["num_samples"].values()) == 1797


def test_a_killed_reader_takes_its_loader_workers_along(tmp_path: Path) -> None:
    # A loader worker notices that its reader is gone only between reads. Here every shard is a FIFO that
    # nobody writes, so the worker's read never returns: it must die with its reader all the same.
    settings = [f"storage.root={tmp_path}", "data.source=digits"]
    write_shards(load_config(None, settings), progress=False)
    for shard in tmp_path.rglob("*.tar"):
        shard.unlink()
        os.mkfifo(shard)
    reader = (
        "import sys\n"
        "from lejepa.config import load_config\n"
        "from lejepa.data.stream import TrainStream\n"
        "from lejepa.data.manifest import ShardManifest, locate_manifest\n"
        "from lejepa.store.storage import Storage\n"
        "cfg = load_config(None, sys.argv[1:])\n"
        "storage = Storage.from_config(cfg.storage)\n"
        "manifest = ShardManifest.load(storage, locate_manifest(cfg, storage))\n"
        "stream = TrainStream(manifest, storage, batch_size=8, num_workers=1)\n"
        "next(iter(stream))\n"
    )
    name, value = "LEJEPA_TEST_MARKER", uuid.uuid4().hex
    marked = f"{name}={value}"
    proc = subprocess.Popen([sys.executable, "-c", reader, *settings], env={**os.environ, name: value})
    try:
        wait_for(lambda: len(processes_with(marked)) >= 2, "the reader's loader worker", timeout=60)
    finally:
        proc.kill()
        proc.wait()
    wait_for(lambda: not processes_with(marked), "the loader worker to exit", timeout=10)


def test_a_launcher_that_hangs_after_its_parent_exits_is_ended_after_the_grace() -> None:
    # As torchrun does when the SIGTERM lands at the wrong moment: it ignores the signal and its interpreter
    # waits forever for a thread that never ends.
    hang = (
        "import signal, sys, threading\n"
        "from lejepa.with_parent import exit_after_parent\n"
        "exit_after_parent(int(sys.argv[1]), 1.0)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "threading.Thread(target=threading.Event().wait).start()\n"
        "print('armed', flush=True)\n"
    )
    parent = subprocess.Popen(["sleep", "600"])
    child = subprocess.Popen(
        [sys.executable, "-c", hang, str(parent.pid)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline() == "armed\n"
        with pytest.raises(subprocess.TimeoutExpired):  # the parent lives: it stays
            child.wait(timeout=2)
        parent.kill()
        parent.wait()
        assert child.wait(timeout=60) == 128 + signal.SIGTERM
        assert "1 s after the parent did" in child.stderr.read()
    finally:
        for proc in (parent, child):
            proc.kill()
            proc.wait()


def test_killed_launcher_takes_its_ranks_along_and_the_retry_trains_alone(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_shards(load_config(None, [f"storage.root={store}", "data.source=digits"]), progress=False)
    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"root": str(store)},
                "data": {"source": "digits"},
                "model": {"backbone": "resnet10t", "proj_hidden_dim": 256, "proj_dim": 64},
                "views": {"local_views": 2},
                "loss": {"num_slices": 128},
                "pretrain": {
                    "run_name": "lease",
                    "batch_size": 32,
                    "max_steps": 24,
                    "checkpoint_every": 2,
                    "num_workers": 1,
                },
                "launch": {"nproc_per_node": 2, "accelerator": "cpu"},
            }
        )
    )
    command = [sys.executable, "-m", "lejepa.train.pretrain", "--config", str(config)]
    run = store / "runs" / "lease"
    marker = run / "checkpoints" / "latest.json"

    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: marker.exists() and json.loads(marker.read_text())["step"] >= 2, "the first checkpoint")
    assert len(_processes_of_launcher(first.pid)) >= 3  # torchrun and two ranks
    first.send_signal(signal.SIGKILL)
    first.wait()
    # torchrun stops its ranks on the SIGTERM; if it hangs instead, it is ended after STOP_GRACE_S.
    wait_for(
        lambda: not _processes_of_launcher(first.pid),
        "the killed launcher's ranks to exit",
        timeout=STOP_GRACE_S + 30,
    )

    retry = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lease = run / LEASE
    wait_for(
        lambda: lease.exists() and json.loads(lease.read_text())["pid"] == retry.pid, "the retry's lease"
    )
    second = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert (
        second.stderr.strip().splitlines()[-1].startswith(f"error: {run} is being trained by pid {retry.pid}")
    )

    out, _ = retry.communicate(timeout=300)
    assert retry.returncode == 0, out[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 24
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))  # resumed once, nothing trained twice
    assert not lease.exists()
