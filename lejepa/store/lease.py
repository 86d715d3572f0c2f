"""One writer per store folder: a lease that a stage holds while it writes a run, a dataset or a model.

`{folder}/lease.json` names the holder (host, pid, a random token) and when the lease expires. The holder
renews it from a background thread every `ttl / 3` seconds and deletes it when it is done. The pretrain
launch holds `runs/{run}`, the shard stage `datasets/{name}`, publish `models/{name}`. A second writer of
the same folder is refused while the lease is live. It takes the lease over only when its holder is
provably gone: it expired (no renewal for `ttl` seconds: a crashed holder on another host), or its holder
ran on this host and that process no longer exists (a killed launcher, whose ranks die with it). A
launch that hands its ranks to a scheduler records the job in the lease (`attach_job`): the ranks of a
Slurm job outlive a killed launcher, so such a lease is taken over only once the scheduler says the job
is gone as well (`job_alive`).

Object stores have no compare-and-swap, so after writing its lease a writer reads it back once more after
a short settle time and proceeds only if it still holds it: two writers that start within the same moment
cannot both win.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from lejepa.store.layout import LEASE
from lejepa.store.storage import Storage


class LeaseHeld(RuntimeError):
    """Another live writer holds the folder; the message names it and what to do."""


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder_gone(lease: dict[str, Any], now: float) -> bool:
    if now >= lease["expires"]:
        return True
    return lease["host"] == socket.gethostname() and not _process_exists(lease["pid"])


class Lease:
    """`with Lease(storage, folder, "trained"): ...` holds `folder` for the body, or raises LeaseHeld.

    `activity` completes the refusal "{folder} is being {activity} by pid ... on ...". `job_alive` tells
    whether a job a holder recorded may still run (see lejepa.train.launch.job_alive), `describe_job` names
    it.
    """

    def __init__(
        self,
        storage: Storage,
        folder: str,
        activity: str,
        ttl: float = 60.0,
        settle: float = 1.0,
        job_alive: Callable[[dict[str, str]], bool] | None = None,
        describe_job: Callable[[dict[str, str]], str] = str,
    ) -> None:
        self.storage, self.url, self.ttl, self.settle = storage, f"{folder}/{LEASE}", ttl, settle
        self.folder, self.activity = folder, activity
        self.job_alive, self.describe_job = job_alive, describe_job
        self.job: dict[str, str] | None = None
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
            "renewed": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "expires": now + self.ttl,
            **({"job": self.job} if self.job else {}),
        }

    def _current(self) -> dict[str, Any] | None:
        return self.storage.read_json(self.url) if self.storage.exists(self.url) else None

    def _gone(self, lease: dict[str, Any], now: float) -> bool:
        """Whether the lease's holder, and the job it recorded, are provably gone."""
        if not _holder_gone(lease, now):
            return False
        job = lease.get("job")
        return job is None or (self.job_alive is not None and not self.job_alive(job))

    def _refuse(self, lease: dict[str, Any]) -> LeaseHeld:
        if (job := lease.get("job")) and _holder_gone(lease, time.time()):
            return LeaseHeld(
                f"{self.folder} is being {self.activity} by {self.describe_job(job)}, which the launcher "
                f"(pid {lease['pid']} on {lease['host']}) left running: wait for the job to end, or cancel "
                "it, then run again to resume"
            )
        left = max(0, round(lease["expires"] - time.time()))
        return LeaseHeld(
            f"{self.folder} is being {self.activity} by pid {lease['pid']} on {lease['host']} "
            f"(lease renewed {lease['renewed']}): wait for it to finish, or stop it; a crashed holder's "
            f"lease expires within {left} s"
        )

    def acquire(self) -> None:
        lease = self._current()
        if lease is not None and lease["token"] != self.token and not self._gone(lease, time.time()):
            raise self._refuse(lease)
        self.storage.write_json(self.url, self._record())
        time.sleep(self.settle)  # let a racing writer's lease land, then see who holds the folder
        lease = self._current()
        if lease is None or lease["token"] != self.token:
            raise self._refuse(lease or self._record())
        self._renewer = threading.Thread(target=self._renew, name="store-lease", daemon=True)
        self._renewer.start()

    def attach_job(self, job: dict[str, str]) -> None:
        """Record the scheduler's job that now trains the folder: a later writer waits for it too."""
        self.job = job
        self.storage.write_json(self.url, self._record())

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.storage.write_json(self.url, self._record())
            except Exception as error:  # a store hiccup: the next renewal may work; expiry is ttl away
                print(f"warning: could not renew the lease {self.url}: {error}", flush=True)

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        lease = self._current()
        if lease is not None and lease["token"] == self.token:
            self.storage.rm(self.url)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
