"""The streaming loaders: rank/worker splitting, epochs, resuming, evaluation order."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from conftest import image_key, make_imagefolder

from lejepa.config import load_config
from lejepa.data.manifest import ShardManifest
from lejepa.data.shard import write_shards
from lejepa.data.stream import TrainStream, eval_loader
from lejepa.store.storage import Storage


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[ShardManifest, Storage]:
    """120 recognisable 8x8 images in 3 classes, all in `train`, 9 shards of 14 (the last one 8)."""
    tmp = tmp_path_factory.mktemp("data")
    folder = make_imagefolder(tmp / "images")
    cfg = load_config(
        None,
        [
            f"storage.root={tmp / 'store'}",
            "data.source=imagefolder",
            f"data.path={folder}",
            "data.val_fraction=0",
            "shard.samples_per_shard=14",
            "shard.workers=1",
        ],
    )
    storage = Storage.from_config(cfg.storage)
    return ShardManifest.load(storage, write_shards(cfg, progress=False).manifest), storage


def keys(batches) -> list[int]:
    return [image_key(image) for images, _ in batches for image in images.numpy()]


def test_two_ranks_two_workers_see_every_sample_once(dataset):
    manifest, storage = dataset
    per_rank = []
    for rank in range(2):
        stream = TrainStream(manifest, storage, batch_size=6, num_workers=2, rank=rank, world_size=2, seed=3)
        assert stream.steps_per_epoch == 10  # 120 // (6 * 2)
        batches = list(itertools.islice(stream, 10))
        assert all(images.shape == (6, 1, 8, 8) and images.dtype == torch.uint8 for images, _ in batches)
        assert all(labels.dtype == torch.int64 and labels.shape == (6,) for _, labels in batches)
        per_rank.append(keys(batches))
    assert sorted(per_rank[0] + per_rank[1]) == list(range(120))
    # Labels travel with their images.
    batch, labels = next(iter(TrainStream(manifest, storage, batch_size=6, num_workers=0)))
    assert [image_key(i) // 40 for i in batch.numpy()] == labels.tolist()


def test_uneven_split_yields_equal_steps_and_reshuffles_each_epoch(dataset):
    manifest, storage = dataset
    epochs = []
    for rank in range(2):
        stream = TrainStream(manifest, storage, batch_size=7, num_workers=2, rank=rank, world_size=2)
        assert stream.steps_per_epoch == 8  # 120 // 14, remainder 8 dropped
        seen = keys(itertools.islice(stream, 16))
        epochs.append((seen[:56], seen[56:]))
        assert stream.state_dict()["epoch"] == 2 and stream.state_dict()["batch_in_epoch"] == 0
    for epoch in range(2):
        both = epochs[0][epoch] + epochs[1][epoch]
        assert len(set(both)) == 112  # no sample twice within an epoch across ranks
    assert epochs[0][0] != epochs[0][1]


def test_resume_mid_epoch_yields_the_same_batches(dataset):
    manifest, storage = dataset
    from lejepa.objective.views import MultiCropViews

    views = MultiCropViews(1, global_views=2, local_views=2, global_size=8, local_size=4)

    def stream():
        return TrainStream(manifest, storage, batch_size=8, num_workers=2, seed=5, transform=views)

    full = list(itertools.islice(stream(), 20))  # 15 steps per epoch: crosses into epoch 1
    assert isinstance(full[0][0], tuple) and full[0][0][0].shape == (2, 8, 1, 8, 8)
    for stop in (5, 15, 16):
        first = stream()
        consumed = list(itertools.islice(first, stop))
        state = first.state_dict()
        resumed = stream()
        resumed.load_state_dict(state)
        rest = list(itertools.islice(resumed, 20 - stop))
        for (a_views, a_labels), (b_views, b_labels) in zip(full, consumed + rest, strict=True):
            assert torch.equal(a_labels, b_labels)
            assert all(torch.equal(x, y) for x, y in zip(a_views, b_views, strict=True))


def test_eval_loader_is_complete_and_deterministic(dataset):
    manifest, storage = dataset
    runs = [keys(eval_loader(manifest, storage, "train", batch_size=16, num_workers=w)) for w in (0, 2, 2)]
    assert sorted(runs[0]) == list(range(120)) and runs[1] == runs[2]
    parts = [
        keys(eval_loader(manifest, storage, "train", batch_size=16, num_workers=2, rank=r, world_size=2))
        for r in range(2)
    ]
    assert sorted(parts[0] + parts[1]) == list(range(120))


def test_stream_reads_s3(tmp_path: Path, bucket: str):
    folder = make_imagefolder(tmp_path / "images", per_class=12, classes=2)
    cfg = load_config(
        None,
        [
            f"storage.root=s3://{bucket}/x",
            "data.source=imagefolder",
            f"data.path={folder}",
            "data.val_fraction=0",
            "shard.samples_per_shard=5",
            "shard.workers=1",
        ],
    )
    storage = Storage.from_config(cfg.storage)
    manifest = write_shards(cfg, progress=False).manifest
    stream = TrainStream(manifest, storage, batch_size=4, num_workers=2, world_size=1)
    assert sorted(keys(itertools.islice(stream, stream.steps_per_epoch))) == list(range(24))
