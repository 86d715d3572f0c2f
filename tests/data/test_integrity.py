"""Checksums are read back: corrupt shards are clear errors naming the shard, one bad image is not fatal."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import image_key, make_imagefolder

from lejepa.config import load_config
from lejepa.data.manifest import ShardManifest
from lejepa.data.shard import write_shards
from lejepa.data.stream import TrainStream, eval_loader
from lejepa.data.tarfiles import iter_tar_samples
from lejepa.store.errors import DataError
from lejepa.store.storage import Storage

PER_CLASS = 10


def shard_set(tmp_path: Path) -> tuple[ShardManifest, Storage]:
    """20 recognisable 8x8 images in 2 classes, all in `train`, 2 shards of 10."""
    folder = make_imagefolder(tmp_path / "images", per_class=PER_CLASS, classes=2)
    cfg = load_config(
        None,
        [
            f"storage.root={tmp_path / 'store'}",
            "data.source=imagefolder",
            f"data.path={folder}",
            "data.val_fraction=0",
            "shard.samples_per_shard=10",
            "shard.workers=1",
        ],
    )
    storage = Storage.from_config(cfg.storage)
    return ShardManifest.load(storage, write_shards(cfg, progress=False).manifest), storage


def read_train(manifest: ShardManifest, storage: Storage) -> list:
    stream = TrainStream(manifest, storage, batch_size=4, num_workers=2, seed=1)
    return list(itertools.islice(stream, stream.steps_per_epoch))


def read_eval(manifest: ShardManifest, storage: Storage) -> list:
    return list(eval_loader(manifest, storage, "train", batch_size=4, num_workers=2))


def first_png(path: Path) -> tarfile.TarInfo:
    with tarfile.open(path) as tar:
        return next(m for m in tar.getmembers() if m.name.endswith(".png"))


def corrupt_error(url: str) -> str:
    """The message a corrupt shard must raise: its URL, and the fix."""
    return re.escape(url) + r"(.|\n)*lejepa-pipeline shard --force"


@pytest.mark.parametrize("read", [read_train, read_eval])
@pytest.mark.parametrize("damage", ["flipped-byte", "cut-mid-member", "no-end-of-archive"])
def test_damaged_shard_is_a_data_error_naming_it(tmp_path: Path, read, damage: str):
    manifest, storage = shard_set(tmp_path)
    url = manifest.shards[1].url
    data = bytearray(Path(url).read_bytes())
    if damage == "flipped-byte":  # inside an image payload: the tar still parses, with every sample
        member = first_png(Path(url))
        data[member.offset_data + member.size // 2] ^= 0xFF
        assert len(list(iter_tar_samples(io.BytesIO(data)))) == 10
    elif damage == "cut-mid-member":
        data = data[: len(data) // 2 + 100]
    else:  # cut at a member boundary: every sample is there, only the closing blocks are missing
        data = data[:-1024]
        assert len(list(iter_tar_samples(io.BytesIO(data)))) == 10
    Path(url).write_bytes(data)
    with pytest.raises(DataError, match=corrupt_error(url)):
        read(manifest, storage)


def test_untouched_shards_stream(tmp_path: Path):
    manifest, storage = shard_set(tmp_path)
    keys = [image_key(i) for images, _ in read_train(manifest, storage) for i in images.numpy()]
    assert sorted(keys) == list(range(20))
    assert sum(len(labels) for _, labels in read_eval(manifest, storage)) == 20


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT, errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_non_utf8_member_names_are_read_and_resharded(tmp_path: Path):
    folder = make_imagefolder(tmp_path / "images", per_class=1, classes=1)
    png = (folder / "class_0" / "img_0000.png").read_bytes()
    name = b"caf\xe9".decode("utf-8", "surrogateescape")  # Latin-1 bytes, not UTF-8
    data = tar_bytes([(f"{name}.png", png), (f"{name}.cls", b"1"), ("ok.png", png)])
    assert [key for key, _ in iter_tar_samples(io.BytesIO(data))] == [name, "ok"]

    (tmp_path / "wds").mkdir()
    (tmp_path / "wds" / "a.tar").write_bytes(data)
    cfg = load_config(
        None,
        [
            f"storage.root={tmp_path / 'store'}",
            "data.source=webdataset",
            f"data.path={tmp_path / 'wds'}",
            "data.val_fraction=0",
            "shard.workers=1",
        ],
    )
    summary = write_shards(cfg, progress=False)
    assert summary.num_samples == {"train": 2} and summary.rejected == 0
    manifest = ShardManifest.load(Storage.from_config(cfg.storage), summary.manifest)
    [shard] = manifest.shards
    ids = [json.loads(s["json"])["id"] for _, s in iter_tar_samples(io.BytesIO(Path(shard.url).read_bytes()))]
    assert sorted(ids) == ["a.tar:caf\\xe9", "a.tar:ok"]


@pytest.mark.parametrize(
    "value, expected",
    [
        (b"12x4\0", "size field"),
        (b"-1\0", "size field"),
        (b"77777777\0", "runs past the end of the file: truncated"),
    ],
    ids=["not-octal", "negative", "past-the-end"],
)
def test_bad_size_fields_are_data_errors_naming_the_tar(value: bytes, expected: str):
    data = bytearray(tar_bytes([("a.png", b"x" * 600), ("b.png", b"y" * 10)]))
    header = 1024 + 512  # the second member's header: after a 512-byte header and 600 bytes padded to 1024
    data[header + 124 : header + 136] = value.ljust(12, b"\0")
    data[header + 148 : header + 156] = b" " * 8
    data[header + 148 : header + 156] = b"%06o\0 " % sum(data[header : header + 512])
    with pytest.raises(DataError, match=f"shard.tar: corrupt tar at byte {header}: .*{re.escape(expected)}"):
        list(iter_tar_samples(io.BytesIO(bytes(data)), "shard.tar"))


def with_bad_image(manifest: ShardManifest, shard: int) -> tuple[ShardManifest, int]:
    """Replace the first image of shard `shard` with bytes PIL cannot open, keeping the tar and the manifest
    consistent (so only decoding fails); returns the new manifest and the bad image's key."""
    entry = manifest.shards[shard]
    with tarfile.open(entry.url) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad = next(i for i, (name, _) in enumerate(members) if name.endswith(".png"))
    index = int(json.loads(members[bad + 2][1])["id"].split("_")[-1].split(".")[0])  # class_k/img_NNNN.png
    members[bad] = (members[bad][0], b"not a png at all")
    data = tar_bytes(members)
    Path(entry.url).write_bytes(data)
    fixed = entry.model_copy(update={"sha256": hashlib.sha256(data).hexdigest(), "num_bytes": len(data)})
    shards = [fixed if s.url == entry.url else s for s in manifest.shards]
    return manifest.model_copy(update={"shards": shards}), index


def test_undecodable_image_is_skipped_and_batches_stay_full(tmp_path: Path, capfd):
    manifest, storage = shard_set(tmp_path)
    manifest, bad = with_bad_image(manifest, 0)

    batches = read_train(manifest, storage)
    assert len(batches) == 5 and all(images.shape == (4, 1, 8, 8) for images, _ in batches)
    keys = [image_key(i) for images, _ in batches for i in images.numpy()]
    assert bad not in keys and set(keys) == set(range(20)) - {bad}  # one sample stands in for it
    for images, labels in batches:
        assert [image_key(i) // PER_CLASS for i in images.numpy()] == labels.tolist()

    evaluated = read_eval(manifest, storage)
    keys = [image_key(i) for images, _ in evaluated for i in images.numpy()]
    labels = torch.cat([labels for _, labels in evaluated]).tolist()
    assert sorted(keys) == sorted(set(range(20)) - {bad})  # dropped with its label, the rest aligned
    assert labels == [k // PER_CLASS for k in keys]

    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 2 and all(manifest.shards[0].url in line for line in warnings)
    assert all("skipped by this process" in line for line in warnings)


class _FailingDataset(torch.utils.data.IterableDataset):
    def __iter__(self):
        raise DataError("shard x.tar: corrupt: rewrite the shards")


def test_an_error_raised_in_a_loader_worker_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    from lejepa.cli import run_stage

    loader = torch.utils.data.DataLoader(_FailingDataset(), batch_size=None, num_workers=1)
    assert run_stage(lambda: list(loader)) == 2
    assert capsys.readouterr().err == "error: shard x.tar: corrupt: rewrite the shards\n"


def test_a_reader_whose_loader_failed_exits_at_once(tmp_path: Path) -> None:
    """Its workers ignore SIGTERM (so a rank can commit on a scheduler's), which multiprocessing sends them
    at exit before waiting for them: a reader still holding the failed loader must not wait for good."""
    manifest, storage = shard_set(tmp_path)
    Path(manifest.shards[1].url).write_bytes(b"not a tar")
    program = (
        "import sys\n"
        "from lejepa.data.manifest import ShardManifest\n"
        "from lejepa.data.stream import eval_loader\n"
        "from lejepa.store.storage import Storage\n"
        f"storage = Storage({str(tmp_path / 'store')!r})\n"
        f"loader = iter(eval_loader(ShardManifest.load(storage, {manifest.url!r}), storage, 'train', "
        "batch_size=4, num_workers=2))\n"
        "try:\n"
        "    list(loader)\n"
        "except Exception as exc:\n"
        "    failure = exc  # the traceback keeps the loader's iterator, and so its workers, alive\n"
        "    print(type(exc).__name__, flush=True)\n"
        "sys.exit(2)\n"
    )
    # The timeout only turns a hang into a failure; the program takes seconds.
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (2, "DataError\n"), done.stderr[-2000:]
