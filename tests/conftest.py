"""Shared fixtures: a real S3 endpoint (moto_server on a free loopback port) and small image folders."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lejepa.testing import moto_server, slurm_cluster


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
