"""The store's layout: every folder and file name the pipeline reads or writes, owned here and nowhere else.

Under `storage.root` (a local path, `file://...` or `s3://bucket/prefix`):

    datasets/{name}/{version}/{split}-000000.tar, manifest.json    # the manifest is the commit point
    datasets/{name}/latest.json                                    # the last committed version
    runs/{run}/config.json, metrics.jsonl, summary.json,           # the pretrain stage
               checkpoints/{tag}/, checkpoints/latest.json,         # `latest.json` commits a checkpoint
               encoder.safetensors, encoder.json, projector.safetensors,
               metrics.json, evaluation.png, evaluation.md,         # the evaluate stage
               report.html, eval/features-{split}-{key}.safetensors
               tracking.json, tensorboard/                          # lejepa.tracking: tracker run ids
    models/{name}/{version}/encoder.safetensors, encoder.json, projector.safetensors, metrics.json,
               evaluation.png, README.md, release.json             # `release.json` commits a release
               timm/config.json, timm/model.safetensors             # what timm loads
               (lejepa.publish.timm_release)
    models/{name}/latest.json                                      # moves only after a complete release
    {a dataset version, run or model folder}/lease.json            # its one writer (lejepa.store.lease)
    prefect-results/                                               # Prefect task results (the cache), JSON

Stages ask these functions for URLs and use these names for files; nothing else spells a path.
"""

from __future__ import annotations

from lejepa.store.storage import Storage

# Names shared by several folders.
LATEST = "latest.json"  # a pointer: datasets/{name}/, models/{name}/, runs/{run}/checkpoints/
LEASE = "lease.json"

# A dataset version.
MANIFEST = "manifest.json"

# A run: what pretraining writes...
CONFIG = "config.json"
TRAINING_LOG = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
WEIGHTS, DESCRIPTION, PROJECTOR = "encoder.safetensors", "encoder.json", "projector.safetensors"
# ...and what evaluation adds.
METRICS = "metrics.json"
FIGURE, EVALUATION, HTML_REPORT = "evaluation.png", "evaluation.md", "report.html"
# ...and what experiment tracking keeps: the tracker runs' ids, TensorBoard's event files.
TRACKER, TENSORBOARD = "tracking.json", "tensorboard"

# A release: the run's files plus these two...
RELEASE, CARD = "release.json", "README.md"
# ...and the folder timm loads with create_model("local-dir:<release>/timm").
TIMM_CONFIG, TIMM_WEIGHTS = "timm/config.json", "timm/model.safetensors"


def shard_name(split: str, index: int) -> str:
    """The file name of shard `index` of a split: `train-000042.tar`."""
    return f"{split}-{index:06d}.tar"


def dataset_url(storage: Storage, name: str, version: str | None = None) -> str:
    """`datasets/{name}`, or one version's folder `datasets/{name}/{version}`."""
    return storage.url("datasets", name) if version is None else storage.url("datasets", name, version)


def manifest_url(storage: Storage, name: str, version: str) -> str:
    return storage.url("datasets", name, version, MANIFEST)


def dataset_latest_url(storage: Storage, name: str) -> str:
    return storage.url("datasets", name, LATEST)


def run_url(storage: Storage, run_name: str) -> str:
    return storage.url("runs", run_name)


def checkpoints_url(run: str) -> str:
    return f"{run}/{CHECKPOINTS}"


def features_url(run: str, split: str, key: str) -> str:
    """The evaluation's cached features of one split, keyed by what they were computed from."""
    return f"{run}/eval/features-{split}-{key}.safetensors"


def model_url(storage: Storage, name: str, version: str | None = None) -> str:
    """`models/{name}`, or one release's folder `models/{name}/{version}`."""
    return storage.url("models", name) if version is None else storage.url("models", name, version)


def model_latest_url(storage: Storage, name: str) -> str:
    return storage.url("models", name, LATEST)


def results_url(storage: Storage) -> str:
    """Where Prefect persists task results, and so the flows' cache."""
    return storage.url("prefect-results")
