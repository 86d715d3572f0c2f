"""One writer per store folder: a lease that a stage holds while it writes a run, a dataset or a model.

`{folder}/lease.json` names the holder (host, pid, a random token) and when the lease expires. The holder
renews it from a background thread every `ttl / 3` seconds and deletes it when it is done. The pretrain
launch holds `runs/{run}`, the shard stage `datasets/{name}`, publish `models/{name}`. A second writer of
the same folder is refused while the lease is live. It takes the lease over only when its holder is
provably gone: it expired (no renewal for `ttl` seconds: a crashed holder on another host), or its holder
ran on this host and that process no longer exists (a killed launcher, whose ranks die with it).

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
from datetime import datetime, timezone
from typing import Any

from lejepa.layout import LEASE
from lejepa.storage import Storage


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

    `activity` completes the refusal "{folder} is being {activity} by pid ... on ...".
    """

    def __init__(
        self, storage: Storage, folder: str, activity: str, ttl: float = 60.0, settle: float = 1.0
    ) -> None:
        self.storage, self.url, self.ttl, self.settle = storage, f"{folder}/{LEASE}", ttl, settle
        self.folder, self.activity = folder, activity
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
        }

    def _current(self) -> dict[str, Any] | None:
        return self.storage.read_json(self.url) if self.storage.exists(self.url) else None

    def _refuse(self, lease: dict[str, Any]) -> LeaseHeld:
        left = max(0, round(lease["expires"] - time.time()))
        return LeaseHeld(
            f"{self.folder} is being {self.activity} by pid {lease['pid']} on {lease['host']} "
            f"(lease renewed {lease['renewed']}): wait for it to finish, or stop it; a crashed holder's "
            f"lease expires within {left} s"
        )

    def acquire(self) -> None:
        lease = self._current()
        if lease is not None and lease["token"] != self.token and not _holder_gone(lease, time.time()):
            raise self._refuse(lease)
        self.storage.write_json(self.url, self._record())
        time.sleep(self.settle)  # let a racing writer's lease land, then see who holds the folder
        lease = self._current()
        if lease is None or lease["token"] != self.token:
            raise self._refuse(lease or self._record())
        self._renewer = threading.Thread(target=self._renew, name="store-lease", daemon=True)
        self._renewer.start()

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
