"""The shard stage: sources to shards on a local path and on S3 (moto), idempotence, crashes, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import signal
import socket
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import image_key, make_imagefolder, unique_image
from PIL import Image

from lejepa.config import StorageConfig, load_config
from lejepa.data.manifest import (
    RejectedSample,
    ShardEntry,
    ShardManifest,
    latest_manifest_url,
    manifest_url_for,
)
from lejepa.data.shard import CRASH_AFTER_ENV, GroupResult, cli, write_shards
from lejepa.data.stream import eval_loader
from lejepa.data.tarfiles import iter_tar_samples
from lejepa.store.layout import LEASE
from lejepa.store.lease import Lease
from lejepa.store.storage import Storage, StorageError

REPO = Path(__file__).resolve().parents[2]


def config(root: str, source: str = "imagefolder", path: str | Path | None = None, **overrides):
    sets = [f"storage.root={root}", f"data.source={source}", "shard.workers=1", "shard.samples_per_shard=50"]
    if path is not None:
        sets.append(f"data.path={path}")
    sets += [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    return load_config(None, sets)


def stored_samples(storage: Storage, manifest: ShardManifest) -> dict[str, dict[str, bytes]]:
    """{source id: sample} over every shard the manifest lists, checking sizes and hashes on the way."""
    out = {}
    for shard in manifest.shards:
        data = storage.read_bytes(shard.url)
        assert len(data) == shard.num_bytes and hashlib.sha256(data).hexdigest() == shard.sha256
        samples = list(iter_tar_samples(io.BytesIO(data)))
        assert len(samples) == shard.num_samples
        for _, sample in samples:
            out[json.loads(sample["json"])["id"]] = sample
    return out


def check_roundtrip(cfg, folder: Path) -> ShardManifest:
    """Shard `folder`, then check every stored sample is the source file byte for byte, with its label."""
    summary = write_shards(cfg, progress=False)
    assert not summary.up_to_date and summary.rejected == 0
    storage = Storage.from_config(cfg.storage)
    manifest = ShardManifest.load(storage, summary.manifest)
    assert summary.manifest == manifest_url_for(cfg) == latest_manifest_url(storage, "imagefolder")
    files = sorted(folder.rglob("*.png"))
    assert sum(summary.num_samples.values()) == len(files) == 120
    assert summary.num_samples == {"train": 106, "val": 14}
    stored = stored_samples(storage, manifest)
    for f in files:
        rel = f.relative_to(folder).as_posix()
        assert stored[rel]["png"] == f.read_bytes()
        assert int(stored[rel]["cls"]) == manifest.class_names.index(f.parent.name)
    # Decoded through the evaluation loader: the same pixels as the source, every sample once.
    seen = {}
    for split in ("train", "val"):
        for images, labels in eval_loader(manifest, storage, split, batch_size=32, num_workers=2):
            for image, label in zip(images.numpy(), labels.tolist(), strict=True):
                seen[image_key(image)] = (image, label)
    assert len(seen) == 120
    for f in files:
        index = int(f.stem.split("_")[1])
        image, label = seen[index]
        np.testing.assert_array_equal(image[0], np.asarray(Image.open(f)))
        assert label == int(f.parent.name.split("_")[1])
    return manifest


def test_imagefolder_roundtrip_local(tmp_path: Path):
    folder = make_imagefolder(tmp_path / "images")
    manifest = check_roundtrip(config(str(tmp_path / "store"), path=folder), folder)
    assert manifest.class_names == ["class_0", "class_1", "class_2"]
    assert manifest.image.size == (8, 8) and manifest.image.mode == "L" and manifest.image.channels == 1
    assert 0.4 < manifest.image.mean[0] < 0.6 and 0.25 < manifest.image.std[0] < 0.33  # uniform pixels
    assert all(s.url.startswith(str(tmp_path / "store")) for s in manifest.shards)


def test_imagefolder_roundtrip_s3(tmp_path: Path, bucket: str):
    # Credentials and endpoint come from the AWS_* environment only (AWS_ENDPOINT_URL included).
    folder = make_imagefolder(tmp_path / "images")
    manifest = check_roundtrip(config(f"s3://{bucket}/pipeline", path=folder), folder)
    assert all(s.url.startswith(f"s3://{bucket}/pipeline/datasets/imagefolder/") for s in manifest.shards)


def test_rerun_is_a_noop_and_force_rebuilds(tmp_path: Path, capsys):
    args = [
        "--set",
        "data.source=digits",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        "data.limit=300",
        "--set",
        "shard.workers=1",
        "--no-progress",
    ]
    assert cli(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["up_to_date"] is False and first["num_samples"] == {"train": 276, "val": 24}
    mtime = os.stat(first["manifest"]).st_mtime_ns
    assert cli(args) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["up_to_date"] is True and second["manifest"] == first["manifest"]
    assert os.stat(first["manifest"]).st_mtime_ns == mtime
    assert cli([*args, "--force"]) == 0
    third = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert third["up_to_date"] is False and third["manifest"] == first["manifest"]
    # A changed parameter is a new version beside the old one.
    assert cli([*args, "--set", "data.val_fraction=0.2"]) == 0
    fourth = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fourth["manifest"] != first["manifest"] and fourth["num_samples"] == {"train": 228, "val": 72}


def test_killed_run_leaves_no_manifest_and_rerun_completes(tmp_path: Path):
    cmd = [
        sys.executable,
        "-m",
        "lejepa.data.shard",
        "--no-progress",
        "--set",
        "data.source=digits",
        "--set",
        f"storage.root={tmp_path}",
        "--set",
        "shard.samples_per_shard=100",
        "--set",
        "shard.workers=1",
    ]
    killed = subprocess.run(cmd, cwd=REPO, env={**os.environ, CRASH_AFTER_ENV: "3"}, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    [version] = (tmp_path / "datasets" / "digits").iterdir()
    assert len(list(version.glob("*.tar"))) == 3
    assert (
        not (version / "manifest.json").exists() and not (tmp_path / "datasets/digits/latest.json").exists()
    )
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["up_to_date"] is False and sum(summary["num_samples"].values()) == 1797
    assert (version / "manifest.json").exists() and not list(version.glob(".tmp-*"))


@pytest.mark.parametrize("start_method", ["spawn", "auto"])
def test_process_pool_and_fashion_mnist(tmp_path: Path, start_method: str):
    cfg = load_config(
        None,
        [
            f"storage.root={tmp_path}",
            "data.limit=200",
            "shard.samples_per_shard=64",
            "shard.workers=2",
            f"shard.start_method={start_method}",
        ],
    )
    summary = write_shards(cfg, progress=False)
    # 200 train -> 17 val + 183 train (each sample's own hash below 0.1); 200 test; 64 per shard.
    assert summary.num_samples == {"train": 183, "val": 17, "test": 200} and summary.num_shards == 3 + 1 + 4
    storage = Storage.from_config(cfg.storage)
    manifest = ShardManifest.load(storage, summary.manifest)
    assert manifest.class_names[0] == "T-shirt/top" and manifest.image.size == (28, 28)
    assert manifest.image.mode == "L" and 0.2 < manifest.image.mean[0] < 0.4
    # Same input, same bytes: a second build into another root gives identical shard hashes.
    cfg2 = cfg.model_copy(update={"storage": StorageConfig(root=str(tmp_path / "again"))})
    cfg2.shard.workers = 1
    again = ShardManifest.load(Storage.from_config(cfg2.storage), write_shards(cfg2, progress=False).manifest)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in manifest.shards]


def test_corrupt_and_unreadable_files_are_rejected(tmp_path: Path):
    folder = make_imagefolder(tmp_path / "images", per_class=10, classes=2)
    good = (folder / "class_0" / "img_0000.png").read_bytes()
    (folder / "class_0" / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "class_1" / "notes.txt").write_text("not an image")
    (folder / "class_1" / "empty.jpg").write_bytes(b"")
    (folder / "stray.png").write_bytes(good)
    summary = write_shards(config(str(tmp_path / "store"), path=folder, data__val_fraction=0), progress=False)
    manifest = ShardManifest.load(Storage(str(tmp_path / "store")), summary.manifest)
    assert summary.num_samples == {"train": 20} and summary.rejected == 4
    reasons = {r.id: r.reason for r in manifest.rejected}
    assert set(reasons) == {"class_0/truncated.png", "class_1/notes.txt", "class_1/empty.jpg", "stray.png"}
    assert "outside the class folders" in reasons["stray.png"]
    assert "UnidentifiedImageError" in reasons["class_1/notes.txt"]


def test_mixed_sizes_and_modes_unlabelled(tmp_path: Path):
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(6):
        unique_image(i, (12, 10)).save(folder / f"{i}.png")
    unique_image(6, (20, 16), "RGB").save(folder / "6.jpg", quality=95)
    unique_image(7, (5, 9), "RGB").save(folder / "7.webp")
    cfg = config(str(tmp_path / "store"), path=folder, data__val_fraction=0)
    summary = write_shards(cfg, progress=False)
    storage = Storage(str(tmp_path / "store"))
    manifest = ShardManifest.load(storage, summary.manifest)
    assert manifest.class_names is None and manifest.image.mode == "RGB" and manifest.image.size == (10, 12)
    assert manifest.image.sizes == {"10x12": 6, "16x20": 1, "9x5": 1}
    stored = stored_samples(storage, manifest)
    assert stored["6.jpg"]["jpg"] == (folder / "6.jpg").read_bytes() and "cls" not in stored["6.jpg"]
    assert stored["7.webp"]["webp"] == (folder / "7.webp").read_bytes()
    [(images, labels)] = list(eval_loader(manifest, storage, "train", batch_size=8))
    assert images.shape == (8, 3, 10, 12) and images.dtype.is_floating_point is False
    assert labels.tolist() == [-1] * 8


def test_webdataset_source_reshards(tmp_path: Path):
    folder = make_imagefolder(tmp_path / "images", per_class=20, classes=2)
    first = write_shards(config(str(tmp_path / "a"), path=folder, data__val_fraction=0), progress=False)
    shards = Path(first.manifest).parent
    # A sample without an image is rejected.
    with tarfile.open(shards / "extra.tar", "w") as tar:
        (tmp_path / "x.cls").write_text("1")
        tar.add(tmp_path / "x.cls", "orphan.cls")
    cfg = config(
        str(tmp_path / "b"),
        source="webdataset",
        path=shards,
        shard__samples_per_shard=7,
        data__val_fraction=0.25,
        data__name="resharded",
    )
    summary = write_shards(cfg, progress=False)
    assert summary.num_samples == {"train": 26, "val": 14} and summary.num_shards == 4 + 2
    storage = Storage(str(tmp_path / "b"))
    manifest = ShardManifest.load(storage, summary.manifest)
    assert [r.id for r in manifest.rejected] == ["extra.tar:orphan"]
    src = stored_samples(
        Storage(str(tmp_path / "a")), ShardManifest.load(Storage(str(tmp_path / "a")), first.manifest)
    )
    out = stored_samples(storage, manifest)
    by_bytes = {s["png"]: s["cls"] for s in src.values()}
    assert len(out) == 40 and all(by_bytes[s["png"]] == s["cls"] for s in out.values())


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "does not exist"),
        ("empty", "no files in"),
        ("all-bad", "no valid images"),
        ("bad-value", "invalid config: shard.samples_per_shard"),
    ],
)
def test_user_errors_are_one_clear_line(tmp_path: Path, capsys, case: str, expected: str):
    folder = tmp_path / "in"
    if case in ("empty", "all-bad"):
        (folder / "c").mkdir(parents=True)
    if case == "all-bad":
        (folder / "c" / "a.png").write_bytes(b"garbage")
    sets = [
        "data.source=imagefolder",
        f"data.path={folder}",
        f"storage.root={tmp_path / 'store'}",
        "shard.workers=1",
        "shard.samples_per_shard=0" if case == "bad-value" else "shard.workers=1",
    ]
    code = cli([x for s in sets for x in ("--set", s)] + ["--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not list((tmp_path / "store").rglob("*.json")) and not list((tmp_path / "store").rglob("*.tar"))


def test_missing_bucket_is_a_clear_error(aws_env: str, capsys):
    code = cli(
        ["--set", "data.source=digits", "--set", "storage.root=s3://no-such-bucket/x", "--no-progress"]
    )
    err = capsys.readouterr().err.strip()
    assert (
        code == 2
        and err
        == f"error: bucket 'no-such-bucket' does not exist at {aws_env}: create it or fix storage.root"
    )


def test_refused_credentials_are_a_clear_error(moto_auth_endpoint: str, capsys, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    code = cli(
        [
            "--set",
            "data.source=digits",
            "--set",
            "storage.root=s3://some-bucket/x",
            "--set",
            f"storage.endpoint_url={moto_auth_endpoint}",
            "--set",
            "storage.access_key_id=AKIAWRONG",
            "--set",
            "storage.secret_access_key=very-secret-value",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{moto_auth_endpoint} refused access to s3://some-bucket/x" in err and "very-secret" not in err


def test_secrets_are_redacted():
    cfg = StorageConfig(
        root="s3://b/p", access_key_id="AKIA1", secret_access_key="hunter2", session_token="tok"
    )
    storage = Storage.from_config(cfg)
    assert "hunter2" not in repr(storage) and "hunter2" not in repr(cfg) and "hunter2" not in str(cfg)
    assert "tok" not in repr(cfg.session_token)
    with pytest.raises(StorageError, match="not on s3://b/p"):
        storage.read_bytes("/etc/hostname")


def test_webdataset_source_reads_tarwriter_shards_and_survives_truncation(tmp_path: Path):
    import webdataset as wds

    folder = tmp_path / "wds"
    folder.mkdir()
    for name, first in (("good.tar", 0), ("cut.tar", 10)):
        with wds.TarWriter(str(folder / name)) as writer:
            for i in range(first, first + 10):
                buf = io.BytesIO()
                unique_image(i, mode="RGB").save(buf, format="JPEG", quality=90)
                writer.write({"__key__": f"sample{i:04d}", "jpg": buf.getvalue(), "cls": i % 2})
    data = (folder / "cut.tar").read_bytes()
    (folder / "cut.tar").write_bytes(data[: len(data) // 2])
    cfg = config(str(tmp_path / "store"), source="webdataset", path=folder, data__val_fraction=0)
    summary = write_shards(cfg, progress=False)
    manifest = ShardManifest.load(Storage(str(tmp_path / "store")), summary.manifest)
    [rejected] = manifest.rejected
    assert rejected.id.endswith("cut.tar") and "unreadable tar" in rejected.reason
    assert 10 < summary.num_samples["train"] < 20 and manifest.image.mode == "RGB"
    assert manifest.class_names == ["0", "1"]


def splits_by_id(storage: Storage, manifest: ShardManifest) -> dict[str, str]:
    """{source id: split} over every shard the manifest lists."""
    out = {}
    for shard in manifest.shards:
        for _, sample in iter_tar_samples(io.BytesIO(storage.read_bytes(shard.url))):
            out[json.loads(sample["json"])["id"]] = shard.split
    return out


def test_a_file_keeps_its_split_when_others_are_added(tmp_path: Path):
    folder = make_imagefolder(tmp_path / "images", per_class=100, classes=3)
    storage = Storage(str(tmp_path / "store"))
    cfg = config(str(tmp_path / "store"), path=folder, data__test_fraction=0.1)
    first = ShardManifest.load(storage, write_shards(cfg, progress=False).manifest)
    before = splits_by_id(storage, first)
    assert len(before) == 300 and set(before.values()) == {"train", "val", "test"}
    assert first.format == 2 and first.params["format"] == 2

    for n in range(300, 450):  # 150 more files, spread over the classes and sorting among the old ones
        unique_image(n).save(folder / f"class_{n % 3}" / f"img_{n - 300:04d}b.png")
    second = ShardManifest.load(storage, write_shards(cfg, progress=False).manifest)
    after = splits_by_id(storage, second)
    assert second.version != first.version and len(after) == 450
    moved = {key: (split, after[key]) for key, split in before.items() if after[key] != split}
    assert moved == {}
    # The new files land in every split at about the configured rates, and the test set only grew.
    added = Counter(after[key] for key in set(after) - set(before))
    assert added["val"] > 0 and added["test"] > 0 and added["train"] > 100
    assert first.splits["test"].fingerprint != second.splits["test"].fingerprint

    # The same files sharded elsewhere give the same test-set fingerprint.
    again = config(str(tmp_path / "again"), path=folder, data__test_fraction=0.1)
    third = ShardManifest.load(Storage(str(tmp_path / "again")), write_shards(again, progress=False).manifest)
    assert third.splits["test"].fingerprint == second.splits["test"].fingerprint


def test_a_dataset_being_sharded_refuses_a_second_writer(tmp_path: Path, capsys):
    args = ["--set", "data.source=digits", "--set", f"storage.root={tmp_path}", "--set", "data.limit=300"]
    cfg = load_config(None, [a for a in args if a != "--set"])
    folder = posixpath.dirname(manifest_url_for(cfg))
    with Lease(Storage.from_config(cfg.storage), folder, "sharded", settle=0):
        assert cli([*args, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "wait for it to finish, or stop it" in err[0]
        assert err[0].startswith(
            f"error: {folder} is being sharded by pid {os.getpid()} on {socket.gethostname()}"
        )
        assert not Path(folder, "manifest.json").exists()
    assert cli([*args, "--no-progress"]) == 0
    assert Path(folder, "manifest.json").exists() and not Path(folder, LEASE).exists()


def test_a_group_result_survives_the_plain_json_that_task_results_are_stored_as() -> None:
    def through_json(result: GroupResult) -> GroupResult:
        return GroupResult.from_json(json.loads(json.dumps(result.to_json())))

    rng = np.random.default_rng(0)
    rejected = [RejectedSample(id="a.png", reason="OSError: truncated")]
    result = GroupResult(None, rejected, Counter(), Counter(), {})
    result.add_image(rng.integers(0, 256, (6, 5), dtype=np.uint8), "L", 6, 5)
    result.add_image(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), "RGB", 4, 4)
    result.entry = ShardEntry(url="s3://b/t.tar", split="train", num_samples=2, num_bytes=9, sha256="0f")

    back = through_json(result)
    assert (back.entry, back.rejected, back.sizes, back.modes) == (
        result.entry,
        rejected,
        Counter({"6x5": 1, "4x4": 1}),
        Counter({"L": 1, "RGB": 1}),
    )
    assert back.histograms.keys() == {1, 3}
    for channels, counts in result.histograms.items():
        assert back.histograms[channels].dtype == np.int64
        np.testing.assert_array_equal(back.histograms[channels], counts)
    assert through_json(GroupResult(None, [], Counter(), Counter(), {})).entry is None  # an empty group
