"""Run a module as `__main__` in a process that dies with its parent: `python -m lejepa.with_parent MOD ...`.

The launcher starts torchrun and DeepSpeed's runner through this, so a launcher that is killed, even with
SIGKILL as the OOM killer does, takes them along, and they stop their ranks (each rank also dies with its
own parent: `die_with_parent` in `lejepa.train.rank`). Linux only; elsewhere it just runs the module.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys

PR_SET_PDEATHSIG = 1
PARENT_ENV = "LEJEPA_LAUNCHER_PID"


def die_with_parent(sig: signal.Signals = signal.SIGTERM, parent: int | None = None) -> None:
    """Have the kernel send `sig` to this process when its parent exits; exit now if it already has.

    `parent` is the pid the parent should have (default: the current one); a process re-parented before the
    signal was armed would otherwise never get it.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid() if parent is None else parent
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
    if os.getppid() != parent:
        os._exit(128 + int(sig))


def main() -> None:
    expected = os.environ.get(PARENT_ENV)
    die_with_parent(signal.SIGTERM, int(expected) if expected else None)
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
