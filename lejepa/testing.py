"""What the tests and the benchmarks share: a real S3 endpoint, stopping a server, finding processes,
watching training steps.

Not used by the pipeline itself. `moto_server` starts moto's S3 server (the `moto_server` program beside
this Python) on a free loopback port; `stop` ends a server process; `processes_with` finds the processes
that carry an environment variable, which every child of a process inherits, so a test or a benchmark
can see what a killed stage left behind; `around_each_step` runs code around every training step of a
run trained in this process.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lejepa.launch import free_port

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
    """Within the block, every `lejepa.train.TrainStep` call in this process runs as
    `wrapper(train_step, step)`, where calling `step()` takes the step and returns what it returns."""
    from lejepa.train import TrainStep

    step = TrainStep.__call__

    def wrapped(self: TrainStep, batches: Any) -> Any:
        return wrapper(self, lambda: step(self, batches))

    TrainStep.__call__ = wrapped  # type: ignore[method-assign]
    try:
        yield
    finally:
        TrainStep.__call__ = step  # type: ignore[method-assign]
