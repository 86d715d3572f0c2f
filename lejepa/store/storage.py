"""One small storage layer for every stage: URLs in, fsspec underneath.

Every path is a URL: a local path (`/data/store`, `./lejepa-store`), `file://...`, or `s3://bucket/prefix`
(through s3fs). S3 credentials come from the config or, when it leaves them empty, from the secrets a
launcher handed its rank (SECRETS_ENV), then from the standard AWS chain: AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE and ~/.aws, and AWS_ENDPOINT_URL for S3-compatible
stores such as MinIO. Secrets never appear in repr or error messages.

Writes are atomic from a reader's view: a local file is written to a hidden temporary name in the same
directory and renamed; an S3 object is uploaded in one put, which S3 makes visible all at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import fsspec

from lejepa.config import CREDENTIAL_FIELDS, SECRETS_ENV, StorageConfig, storage_secrets

TMP_PREFIX = ".tmp-"


class StorageError(RuntimeError):
    """A storage problem a user can fix (missing bucket, refused credentials, unreachable endpoint)."""


def _split_url(url: str) -> tuple[str, str]:
    """('s3', 'bucket/key') for s3://bucket/key, ('file', '/abs/path') for local paths and file:// URLs."""
    if "://" in url:
        protocol, rest = url.split("://", 1)
        if protocol == "file":
            return "file", os.path.abspath(rest)
        return protocol, rest.rstrip("/")
    return "file", os.path.abspath(os.path.expanduser(url))


def _private_dir(path: Path) -> Path:
    """`path` as a folder only this user can write: created with mode 0700, refused if someone else could
    have put files there (checkpoints are loaded from it)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"scratch folder {path} is not a folder: remove it, or set TMPDIR elsewhere")
    if st.st_uid != os.getuid():
        raise StorageError(
            f"scratch folder {path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}): "
            "remove it, or set TMPDIR to a folder of your own"
        )
    if st.st_mode & 0o022:
        raise StorageError(
            f"scratch folder {path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}): "
            "remove it (the next run makes it again, private)"
        )
    return path


def fsspec_options(protocol: str, cfg: StorageConfig) -> dict[str, Any]:
    """The keyword arguments of `fsspec.filesystem(protocol)` for the storage config `cfg`: the credentials,
    endpoint, region and profile it names, then its `options` (which win)."""
    # A launched rank's config holds no secret: the launcher hands them over in SECRETS_ENV. The config's
    # own secrets, where it has any, win.
    secrets = {**json.loads(os.environ.get(SECRETS_ENV) or "{}"), **storage_secrets(cfg)}
    options = secrets.get("options", cfg.options)
    if protocol != "s3":
        return dict(options)
    kwargs: dict[str, Any] = {"skip_instance_cache": True}
    if cfg.endpoint_url:
        kwargs["endpoint_url"] = cfg.endpoint_url
    if cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL"):
        # S3-compatible stores (MinIO, Ceph, moto) often mishandle botocore's default aws-chunked
        # uploads with trailing checksums, and decoding them costs the server dearly: send plain puts.
        kwargs["config_kwargs"] = {
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
        }
    if cfg.region:
        kwargs["client_kwargs"] = {"region_name": cfg.region}
    if cfg.profile:
        kwargs["profile"] = cfg.profile
    for field, kwarg in zip(CREDENTIAL_FIELDS, ("key", "secret", "token"), strict=True):
        if secrets.get(field):
            kwargs[kwarg] = secrets[field]
    return {**kwargs, **options}


@contextlib.contextmanager
def _user_errors(storage: Storage, url: str) -> Iterator[None]:
    """Turn credential and connection failures into a StorageError; let FileNotFoundError through."""
    try:
        yield
    except PermissionError:
        raise StorageError(
            f"{storage.endpoint} refused access to {url}: check storage.access_key_id/secret_access_key "
            "or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_PROFILE"
        ) from None
    except FileNotFoundError:
        raise
    except OSError as exc:
        if storage.protocol == "file":
            raise
        raise StorageError(f"cannot reach {storage.endpoint} for {url}: {exc}") from None
    except Exception as exc:  # botocore raises its own types for missing credentials and bad endpoints
        if type(exc).__name__ == "NoCredentialsError":
            raise StorageError(
                f"no S3 credentials for {url}: set storage.access_key_id/secret_access_key, "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            ) from None
        if type(exc).__name__ == "EndpointConnectionError":
            raise StorageError(
                f"cannot connect to S3 endpoint {storage.endpoint}: start it or fix storage.endpoint_url"
            ) from None
        if type(exc).__module__.startswith(("botocore", "aiobotocore")):
            raise StorageError(f"S3 error at {storage.endpoint} for {url}: {exc}") from None
        raise


class Storage:
    """Filesystem access bound to a root URL and its options.

    Methods take either a full URL or a path relative to the root (`url(*parts)` builds the former), so
    code written against a local directory runs unchanged against S3.
    """

    def __init__(self, root: str, options: StorageConfig | None = None) -> None:
        self.options = options or StorageConfig(root=root)
        self.protocol, path = _split_url(root)
        self.root = path if self.protocol == "file" else f"{self.protocol}://{path}"
        self._fs: fsspec.AbstractFileSystem | None = None
        self._pid = -1

    @classmethod
    def from_config(cls, cfg: StorageConfig) -> Storage:
        return cls(cfg.root, cfg)

    def at(self, root: str) -> Storage:
        """The same options (credentials, endpoint) bound to another root, e.g. a source's URL."""
        return Storage(root, self.options)

    # Pickled into worker processes without the live filesystem (s3fs holds threads and sockets).
    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None, "_pid": -1}

    def __repr__(self) -> str:
        shown = {"endpoint": self.endpoint} if self.protocol == "s3" else {}
        if self.protocol == "s3" and (self.options.access_key_id or self.options.profile):
            shown["credentials"] = "config (redacted)"
        return f"Storage({self.root!r}{''.join(f', {k}={v!r}' for k, v in shown.items())})"

    @property
    def endpoint(self) -> str:
        return self.options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        # One instance per process: a filesystem created before a fork must not be shared with the child.
        if self._fs is None or self._pid != os.getpid():
            self._fs = fsspec.filesystem(self.protocol, **fsspec_options(self.protocol, self.options))
            self._pid = os.getpid()
        return self._fs

    # -- paths ---------------------------------------------------------------------------------------

    def url(self, *parts: str) -> str:
        """The URL of `parts` joined under the root."""
        return posixpath.join(self.root, *parts) if parts else self.root

    def _path(self, url: str) -> str:
        """The filesystem path of a full URL or of a path relative to the root."""
        if "://" in url or url.startswith("/"):
            protocol, path = _split_url(url)
            if protocol != self.protocol:
                raise StorageError(f"{url} is not on {self.root}: use a Storage bound to that URL")
            return path
        return self._path(self.url(url))

    def local_dir(self, url: str) -> Path:
        """A local folder standing for `url`, for tools that only write local files (DeepSpeed, appends).

        On a local root it is the folder itself; on a remote one, a scratch folder named by the URL's hash,
        the same for every process of this user on this machine, whose files the caller uploads. It lies in
        `lejepa-scratch-<uid>` under the system temp folder, private to the user: checkpoints are loaded
        from it, so no one else may write there.
        """
        if self.protocol == "file":
            return Path(self._path(url))
        digest = hashlib.sha256(self._url(self._path(url)).encode()).hexdigest()[:16]
        scratch = _private_dir(Path(tempfile.gettempdir()) / f"lejepa-scratch-{os.getuid()}")
        return _private_dir(scratch / digest)

    def _url(self, path: str) -> str:
        return path if self.protocol == "file" else f"{self.protocol}://{path}"

    # -- reading -------------------------------------------------------------------------------------

    def open(self, url: str, mode: str = "rb", **kwargs: Any) -> IO[Any]:
        """An fsspec file object; for writing prefer `writer`, which is atomic."""
        with _user_errors(self, url):
            return self.fs.open(self._path(url), mode, **kwargs)

    def exists(self, url: str) -> bool:
        with _user_errors(self, url):
            return self.fs.exists(self._path(url))

    def read_bytes(self, url: str) -> bytes:
        with _user_errors(self, url):
            return self.fs.cat_file(self._path(url))

    def read_json(self, url: str) -> Any:
        return json.loads(self.read_bytes(url))

    def ls(self, url: str = "", detail: bool = False) -> list[Any]:
        """Entries directly under `url` (full URLs, or fsspec info dicts with detail=True); [] when absent."""
        with _user_errors(self, url):
            try:
                entries = self.fs.ls(self._path(url), detail=True)
            except FileNotFoundError:
                return []
        # Copies: fsspec caches these dicts, and rewriting their names in place would corrupt its cache.
        entries = [{**e, "name": self._url(e["name"])} for e in entries]
        return sorted(entries, key=lambda e: e["name"]) if detail else sorted(e["name"] for e in entries)

    def find(self, url: str = "") -> dict[str, dict[str, Any]]:
        """Every file below `url` (recursively): {full URL: fsspec info}."""
        with _user_errors(self, url):
            found = self.fs.find(self._path(url), detail=True)
        return {self._url(path): {**info, "name": self._url(path)} for path, info in sorted(found.items())}

    def info(self, url: str) -> dict[str, Any]:
        with _user_errors(self, url):
            return self.fs.info(self._path(url))

    def get_file(self, url: str, local: str | Path) -> None:
        with _user_errors(self, url):
            self.fs.get_file(self._path(url), str(local))

    def sha256(self, url: str) -> str:
        """The sha256 of the file at `url`, streamed."""
        digest = hashlib.sha256()
        with self.open(url, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        return digest.hexdigest()

    # -- writing -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def writer(self, url: str) -> Iterator[IO[bytes]]:
        """A binary file that appears at `url` only when the block exits without an exception."""
        path = self._path(url)
        if self.protocol == "file":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = os.path.join(
                os.path.dirname(path), f"{TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}"
            )
            try:
                with open(tmp, "wb") as f:
                    yield f
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            return
        # Remote: spool locally, then one put (S3 makes an object visible only once it is complete).
        with tempfile.NamedTemporaryFile(prefix=TMP_PREFIX) as f:
            yield f
            f.flush()
            with _user_errors(self, url):
                self.fs.put_file(f.name, path)

    def write_bytes(self, url: str, data: bytes) -> None:
        with self.writer(url) as f:
            f.write(data)

    def write_json(self, url: str, obj: Any) -> None:
        self.write_bytes(url, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())

    def put_file(self, local: str | Path, url: str) -> None:
        """Copy a local file to `url` atomically."""
        if self.protocol != "file":  # one put is already atomic
            with _user_errors(self, url):
                self.fs.put_file(str(local), self._path(url))
            return
        with self.writer(url) as dst, open(local, "rb") as src:
            shutil.copyfileobj(src, dst, 1 << 22)

    def rm(self, url: str, recursive: bool = False) -> None:
        with _user_errors(self, url):
            self.fs.rm(self._path(url), recursive=recursive)

    # -- checks --------------------------------------------------------------------------------------

    def check(self, write: bool = False) -> None:
        """Fail fast with one clear line when the root's bucket is missing or the credentials are refused."""
        if self.protocol != "s3":
            if write:
                try:
                    os.makedirs(self._path(self.root), exist_ok=True)
                except OSError as exc:
                    raise StorageError(f"cannot create storage root {self.root}: {exc.strerror}") from None
            return
        bucket = self._path(self.root).split("/", 1)[0]
        with _user_errors(self, self.root):
            try:
                self.fs.ls(bucket, refresh=True)
            except FileNotFoundError:
                raise StorageError(
                    f"bucket '{bucket}' does not exist at {self.endpoint}: create it or fix storage.root"
                ) from None
