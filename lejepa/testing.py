"""What the tests and the benchmarks share: a real S3 endpoint, stopping a server, finding processes,
watching training steps.

Not used by the pipeline itself. `moto_server` starts moto's S3 server (the `moto_server` program beside
this Python) on a free loopback port, and `mlflow_server` an MLflow tracking server; `stop` ends a server
process; `processes_with` finds the processes that carry an environment variable, which every child of a
process inherits, so a test or a benchmark can see what a killed stage left behind; `around_each_step`
runs code around every training step of a run trained in this process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lejepa.train.launch import free_port

MOTO_SERVER = Path(sys.executable).parent / "moto_server"


@contextlib.contextmanager
def moto_server(log: Path | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """A moto S3 server for the duration of the block; yields its endpoint URL.

    Its output goes to `log` (or nowhere); `env` adds variables to its environment (moto's settings).
    """
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(log.open("w")) if log is not None else subprocess.DEVNULL
        proc = subprocess.Popen(
            [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=out,
            env={**os.environ, **(env or {})},
        )
    try:
        deadline = time.monotonic() + 60
        while True:  # any HTTP answer means it is up
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint}") from None
                time.sleep(0.05)
        yield endpoint
    finally:
        stop(proc)


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """An MLflow tracking server (its runs in `folder/mlflow.db`, its artifacts in `folder/artifacts`) for
    the duration of the block; yields its URL. It serves with one worker: the machines that test are small."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--default-artifact-root"]
    command += [str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]
    with (folder / "server.log").open("w") as log:
        # Its own session: the server's workers are stopped with it, as one process group.
        proc = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"mlflow server did not start on {url}: see {folder}/server.log"
                    ) from None
                time.sleep(0.2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        stop(proc)


def stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL if `proc` has not exited after `timeout` seconds; waits for it either way."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def processes_with(variable: str, *, or_below: bool = False) -> list[int]:
    """Pids of the processes whose environment holds `variable` ("NAME=value") exactly, or with
    `or_below` also "NAME=value/..." (a mark and the marks made under it)."""
    wanted = variable.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if any(v == wanted or (or_below and v.startswith(wanted + b"/")) for v in environ):
            found.append(int(entry.name))
    return found


@contextlib.contextmanager
def around_each_step(wrapper: Callable[[Any, Callable[[], Any]], Any]) -> Iterator[None]:
    """Within the block, every `lejepa.train.rank.TrainStep` call in this process runs as
    `wrapper(train_step, step)`, where calling `step()` takes the step and returns what it returns."""
    from lejepa.train.rank import TrainStep

    step = TrainStep.__call__

    def wrapped(self: TrainStep, batches: Any) -> Any:
        return wrapper(self, lambda: step(self, batches))

    TrainStep.__call__ = wrapped  # type: ignore[method-assign]
    try:
        yield
    finally:
        TrainStep.__call__ = step  # type: ignore[method-assign]


SLURM_NODES = ("node1", "node2")


@contextlib.contextmanager
def slurm_cluster(folder: Path, cpus_per_node: int = 2, kill_wait: int = 10) -> Iterator[dict[str, str]]:
    """A real two-node Slurm cluster on this machine (slurmctld and two slurmd, both nodes at 127.0.0.1),
    for the duration of the block; yields the environment its clients need (SLURM_CONF).

    Needs root, Debian's slurm-wlm and munge, and the node names in /etc/hosts (infra/install-test-deps.sh
    does all three). Requeued jobs wait `cred_expire` seconds before they run again (Slurm's default: 120),
    so it is short here; `kill_wait` is the grace between a job's SIGTERM and SIGKILL (Slurm's KillWait).
    """
    missing = [tool for tool in ("slurmctld", "slurmd", "munged", "sinfo") if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        raise RuntimeError(
            f"a Slurm cluster needs root and {missing or 'slurm-wlm'}: run infra/install-test-deps.sh"
        )
    for node in SLURM_NODES:
        try:
            socket.gethostbyname(node)
        except OSError:
            raise RuntimeError(
                f"{node} does not resolve: run infra/install-test-deps.sh (adds it to /etc/hosts)"
            ) from None
    _start_munge()
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (folder / sub).mkdir(exist_ok=True)
    ctld_port, node_ports = free_port(), [free_port() for _ in SLURM_NODES]
    host = socket.gethostname()
    conf = folder / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=lejepa-test",
                f"SlurmctldHost={host}(127.0.0.1)",
                f"SlurmctldPort={ctld_port}",
                "AuthType=auth/munge",
                "AuthInfo=cred_expire=10",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"StateSaveLocation={folder}/state",
                f"SlurmdSpoolDir={folder}/spool/%n",
                f"SlurmctldPidFile={folder}/slurmctld.pid",
                f"SlurmdPidFile={folder}/slurmd-%n.pid",
                f"SlurmctldLogFile={folder}/slurmctld.log",
                f"SlurmdLogFile={folder}/slurmd-%n.log",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "ReturnToService=2",
                "MpiDefault=none",
                "AccountingStorageType=accounting_storage/none",
                "JobAcctGatherType=jobacct_gather/none",
                f"KillWait={kill_wait}",
                "MinJobAge=300",
                *(
                    f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                    f"CPUs={cpus_per_node} RealMemory=8000"
                    for node, port in zip(SLURM_NODES, node_ports, strict=True)
                ),
                "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
            ]
        )
        + "\n"
    )
    env = {"SLURM_CONF": str(conf)}
    daemons = [["slurmctld", "-f", str(conf)], *(["slurmd", "-f", str(conf), "-N", n] for n in SLURM_NODES)]
    pid_files = [folder / "slurmctld.pid", *(folder / f"slurmd-{n}.pid" for n in SLURM_NODES)]
    pids: list[int] = []
    try:
        for argv, pid_file in zip(daemons, pid_files, strict=True):
            subprocess.run(argv, check=True, env={**os.environ, **env})  # forks; its pid is in pid_file
            pids.append(_wait_for_pid_file(pid_file))
        deadline = time.monotonic() + 60
        while True:
            states = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%N %T"],
                capture_output=True,
                text=True,
                env={**os.environ, **env},
            ).stdout.split()
            if states.count("idle") == len(SLURM_NODES):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Slurm nodes did not come up: {states}; see {folder}/*.log")
            time.sleep(0.2)
        yield env
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in pids:
            deadline = time.monotonic() + 20
            while _process_exists(pid):
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                time.sleep(0.05)


def _wait_for_pid_file(path: Path, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text())
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear: the daemon did not start (see its log beside it)")
        time.sleep(0.05)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _start_munge() -> None:
    """munged, once per machine: Slurm's daemons and clients authenticate through it."""
    if subprocess.run(["bash", "-c", "munge -n | unmunge"], capture_output=True).returncode == 0:
        return
    for folder in ("/run/munge", "/var/log/munge", "/etc/munge"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.chown(folder, "munge", "munge")
    if not Path("/etc/munge/munge.key").exists():  # Debian's package makes one; an image may lack it
        subprocess.run(["mungekey", "--create"], check=True)
        shutil.chown("/etc/munge/munge.key", "munge", "munge")
    subprocess.run(["munged", "--force"], check=True)
