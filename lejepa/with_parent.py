"""Run a module as `__main__` in a process that dies with its parent: `python -m lejepa.with_parent MOD ...`.

The launcher starts torchrun and DeepSpeed's runner through this, so a launcher that is killed, even with
SIGKILL as the OOM killer does, takes them along, and they stop their ranks (each rank also dies with its
own parent: `die_with_parent` in `lejepa.train.rank`). Linux only; elsewhere it just runs the module.

The module gets SIGTERM, so torchrun can pass it on and its ranks commit a checkpoint. If the module has not
exited STOP_GRACE_S after its parent, the process exits anyway: torchrun hit by the SIGTERM at the wrong
moment leaves its log-tailing threads running, and the interpreter then waits for them forever.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import select
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1
PARENT_ENV = "LEJEPA_LAUNCHER_PID"
STOP_GRACE_S = 60.0
"""How long the module may take to stop after its parent exits, e.g. torchrun waiting for its ranks'
checkpoints."""


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


def exit_after_parent(parent: int, grace_s: float) -> None:
    """Exit this process `grace_s` seconds after `parent` exits, whatever its threads are doing then.

    A daemon thread waits on a pidfd of the parent (readable once it exits), so nothing polls.
    """
    try:
        pidfd = os.pidfd_open(parent)
    except ProcessLookupError:  # already gone: die_with_parent has seen it
        os._exit(128 + signal.SIGTERM)
    except (AttributeError, OSError):  # no pidfd (not Linux, or a kernel before 5.3): the signal alone
        return

    def wait() -> None:
        select.select([pidfd], [], [])
        threading.Event().wait(grace_s)
        try:
            print(
                f"lejepa.with_parent: exiting, {grace_s:.0f} s after the parent did",
                file=sys.stderr,
                flush=True,
            )
        except OSError:  # the parent held the other end of stderr
            pass
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=wait, name="exit-after-parent", daemon=True).start()


def main() -> None:
    expected = os.environ.get(PARENT_ENV)
    parent = int(expected) if expected else os.getppid()
    die_with_parent(signal.SIGTERM, parent)
    exit_after_parent(parent, STOP_GRACE_S)
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
