"""Shared fixtures: a real S3 endpoint (moto_server on a free loopback port) and small image folders."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lejepa.testing import free_port, moto_server, slurm_cluster


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A temporary Prefect API for a test module (it takes ~20 s to start on 2 cores). Per module: a
    test of `lejepa-pipeline run` stops it as the command does at its end."""
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    saved = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED")}
    os.environ.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real two-node Slurm cluster on this machine for the suite (see lejepa.testing.slurm_cluster), with
    SLURM_CONF in this process's environment: the launcher and what it starts read it."""
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as env:
        saved = os.environ.get("SLURM_CONF")
        os.environ.update(env)
        try:
            yield env
        finally:
            os.environ.pop("SLURM_CONF") if saved is None else os.environ.__setitem__("SLURM_CONF", saved)


@pytest.fixture(scope="session")
def mlflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the suite's MLflow server keeps everything: mlflow.db (its backend store) and artifacts/."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture(scope="session")
def mlflow_uri(mlflow_home: Path) -> Iterator[str]:
    """One real MLflow tracking server for the suite (~10 s to start), stopped when the session ends."""
    from lejepa.testing import mlflow_server

    with mlflow_server(mlflow_home) as url:
        yield url


def _start_moto(extra_env: dict[str, str] | None = None) -> Iterator[str]:
    with moto_server(env=extra_env) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """An S3-compatible endpoint that accepts any credentials."""
    yield from _start_moto()


@pytest.fixture(scope="session")
def moto_auth_endpoint() -> Iterator[str]:
    """An S3 endpoint that checks credentials (and so refuses every key it has not issued)."""
    yield from _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, moto_endpoint: str) -> str:
    """The standard AWS variables pointing at moto; returns the endpoint."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return moto_endpoint


@pytest.fixture
def bucket(aws_env: str) -> str:
    """A fresh, empty bucket on the moto endpoint."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=aws_env, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def unique_image(index: int, size: tuple[int, int] = (8, 8), mode: str = "L") -> Image.Image:
    """An image whose first pixels spell `index`, so every sample can be recognised after decoding."""
    rng = np.random.default_rng(index)
    shape = size[::-1] + ((3,) if mode == "RGB" else ())
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    flat = pixels.reshape(-1)
    flat[:2] = (index // 256, index % 256)
    return Image.fromarray(pixels)


def image_key(image: np.ndarray) -> int:
    """Inverse of unique_image for a decoded uint8 (C, H, W) image of the same size."""
    flat = np.asarray(image).transpose(1, 2, 0).reshape(-1)
    return int(flat[0]) * 256 + int(flat[1])


def make_imagefolder(root: Path, per_class: int = 40, classes: int = 3, fmt: str = "PNG") -> Path:
    """root/class_k/img_i.png with unique, recognisable 8x8 grey images; returns root."""
    n = 0
    for k in range(classes):
        folder = root / f"class_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(per_class):
            unique_image(n).save(folder / f"img_{n:04d}.{fmt.lower()}", format=fmt)
            n += 1
    return root


# --- sshd on two loopback addresses, the hostfile launcher's "remote" nodes --------------------------------


def _wait_for_port(host: str, port: int, proc: subprocess.Popen, log: Path, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {log.read_text()}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"sshd did not accept connections on {host}:{port} within {timeout} s")


@pytest.fixture
def loopback_sshd(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """sshd on 127.0.0.1 and 127.0.0.2 at a free port with throw-away keys; yields (port, ssh_config)."""
    missing = [tool for tool in ("/usr/sbin/sshd", "pdsh", "ssh", "ssh-keygen") if not shutil.which(tool)]
    if missing or os.geteuid() != 0:
        needs = ", ".join(missing) or "sshd and pdsh"
        pytest.skip(f"needs root and {needs}: run infra/install-test-deps.sh as root")
    d = tmp_path / "ssh"
    d.mkdir()
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nListenAddress 127.0.0.2\nHostKey {d}/host_key\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\n"
    )
    (d / "ssh_config").write_text(
        f"Host 127.0.0.1 127.0.0.2\n  IdentityFile {d}/client_key\n  IdentitiesOnly yes\n  BatchMode yes\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
    )
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
    log = d / "sshd.log"
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(d / "sshd_config"), "-E", str(log)])
    try:
        _wait_for_port("127.0.0.2", port, sshd, log)
        yield port, d / "ssh_config"
    finally:
        sshd.terminate()
        sshd.wait(timeout=10)
