"""Task results in the store are plain JSON, and nothing else is ever read back from it.

Prefect persists a cached task's result under `{storage.root}/prefect-results` and, on the next run, reads
it back with the serializer that the file itself names: pickle by default, or Prefect's JSON, whose
decoder builds any class (and calls any function) the file names. Whoever can write to the store could
then run code in the flow's process. So every cached task here writes `PlainJSON` (JSON values, nothing
built on load), and the storage blocks below hand Prefect only such records. Any other file under a
task's key is refused with a warning: Prefect counts it as no cached result, runs the task again and
writes over it.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import LocalFileSystem, RemoteFileSystem
from prefect.logging import get_logger
from prefect.serializers import Serializer
from pydantic import Field

PLAIN_JSON = "lejepa-json"


class PlainJSON(Serializer):
    """JSON values only: `dumps` refuses any other object, `loads` builds only dicts, lists, strings and
    numbers."""

    type: str = Field(default=PLAIN_JSON, frozen=True)

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(obj).encode()

    def loads(self, blob: bytes) -> Any:
        return json.loads(blob)


class RefusedResult(ValueError):
    """A file under a task's result key that is not a plain-JSON result record."""


def plain_json_record(path: str, content: bytes) -> bytes:
    """`content` if it is a result record that `PlainJSON` wrote, else `RefusedResult` (and a warning)."""
    try:
        serializer = json.loads(content)["metadata"]["serializer"]
    except (ValueError, TypeError, KeyError):
        serializer = None
    if serializer != {"type": PLAIN_JSON}:
        named = serializer.get("type") if isinstance(serializer, dict) else None
        what = f"written with serializer {named!r}" if named else "not a result record"
        message = (
            f"task result {path} is not plain JSON ({what}): refused, never loaded; "
            "the task runs again and replaces it"
        )
        get_logger("lejepa.results").warning(message)
        raise RefusedResult(message)
    return content


class _PlainJSONReads:
    """Makes a Prefect file-system block's reads refuse whatever is not a plain-JSON result record."""

    async def aread_path(self, path: str) -> bytes:
        content = await super().aread_path(path)  # type: ignore[misc]
        return plain_json_record(posixpath.join(self.basepath, path), content)  # type: ignore[attr-defined]

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        content = super().read_path(path, _sync=True)  # type: ignore[misc]
        return plain_json_record(posixpath.join(self.basepath, path), content)  # type: ignore[attr-defined]


class LocalResults(_PlainJSONReads, LocalFileSystem):
    """Task results in a local store's folder."""

    _block_type_name = "LeJEPA local task results"


class StoreResults(_PlainJSONReads, RemoteFileSystem):
    """Task results in a remote store (fsspec URL) folder."""

    _block_type_name = "LeJEPA store task results"
