"""Hugging Face datasets as a shard source (save_to_disk folders and Parquet files), and releases that timm
loads (`<release>/timm/`), with the optional upload of that folder to the hub."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

datasets = pytest.importorskip("datasets")

from lejepa.config import load_config  # noqa: E402
from lejepa.data.manifest import ShardManifest  # noqa: E402
from lejepa.data.shard import cli, write_shards  # noqa: E402
from lejepa.data.sources import _digits  # noqa: E402
from lejepa.data.tarfiles import iter_tar_samples  # noqa: E402
from lejepa.store.storage import Storage  # noqa: E402

DIGIT_NAMES = [str(i) for i in range(10)]
datasets.disable_progress_bars()  # they write to stderr, where the error line is checked


def digits_dataset(count: int | None = None, labels: str = "classlabel") -> datasets.Dataset:
    """scikit-learn's digits as a `datasets.Dataset`: PIL images (the same uint8 pixels as the digits source)
    and labels as a ClassLabel, plain strings, or none."""
    images, targets = _digits()
    images, targets = images[:count], targets[:count]
    columns: dict = {"image": [Image.fromarray(x) for x in images]}
    features = {"image": datasets.Image()}
    if labels == "classlabel":
        columns["label"] = targets.tolist()
        features["label"] = datasets.ClassLabel(names=DIGIT_NAMES)
    elif labels == "strings":
        columns["label"] = [f"digit-{y}" for y in targets]
        features["label"] = datasets.Value("string")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def save(dataset: datasets.Dataset, folder: Path, fmt: str) -> Path:
    """The dataset written as `datasets` writes it: save_to_disk, or Parquet in row groups of 100."""
    if fmt == "save_to_disk":
        dataset.save_to_disk(str(folder))
    else:
        folder.mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(folder / "train-00000-of-00001.parquet"), batch_size=100)
    return folder


def config(root: Path, *sets: str):
    return load_config(
        None, [f"storage.root={root}", "shard.workers=1", "shard.samples_per_shard=200", *sets]
    )


def hf_config(root: Path, path: Path | str, *sets: str):
    return config(root, "data.source=huggingface", f"data.path={path}", *sets)


def stored(cfg, manifest_url: str) -> tuple[ShardManifest, dict[str, dict[str, bytes]]]:
    """The manifest and {sample id: its tar members} over every shard it lists."""
    storage = Storage.from_config(cfg.storage)
    manifest = ShardManifest.load(storage, manifest_url)
    samples = {}
    for shard in manifest.shards:
        for _, sample in iter_tar_samples(io.BytesIO(storage.read_bytes(shard.url))):
            samples[json.loads(sample["json"])["id"]] = {**sample, "split": shard.split}
    return manifest, samples


@pytest.mark.parametrize("fmt", ["save_to_disk", "parquet"])
def test_a_dataset_shards_into_the_same_splits_as_the_digits_source(tmp_path: Path, fmt: str) -> None:
    folder = save(digits_dataset(), tmp_path / "hf", fmt)
    hf = hf_config(tmp_path / "a", folder, "data.label_column=label", "data.name=digits")
    summary = write_shards(hf, progress=False)
    reference = write_shards(config(tmp_path / "b", "data.source=digits"), progress=False)

    assert summary.rejected == 0 and summary.num_samples == reference.num_samples
    assert sum(summary.num_samples.values()) == 1797
    manifest, samples = stored(hf, summary.manifest)
    expected, reference_samples = stored(config(tmp_path / "b"), reference.manifest)
    # Split fingerprints hash (dataset name, id, label): equal ones mean the same samples in each split.
    assert manifest.splits == expected.splits and manifest.class_names == DIGIT_NAMES
    assert manifest.source["kind"] == "huggingface" and manifest.image == expected.image
    images, labels = _digits()
    for sample_id, sample in samples.items():
        row = int(sample_id.split("/")[1])
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), images[row])
        assert int(sample["cls"]) == labels[row] and sample["split"] == reference_samples[sample_id]["split"]


def test_a_dataset_dict_keeps_its_test_split_and_string_labels_become_classes(tmp_path: Path) -> None:
    full = digits_dataset(300, labels="strings")
    splits = datasets.DatasetDict(train=full.select(range(250)), test=full.select(range(250, 300)))
    splits.save_to_disk(str(tmp_path / "hf"))
    cfg = hf_config(tmp_path / "store", tmp_path / "hf", "data.label_column=label")
    manifest, samples = stored(cfg, write_shards(cfg, progress=False).manifest)

    assert manifest.splits["test"].num_samples == 50
    assert manifest.splits["train"].num_samples + manifest.splits["val"].num_samples == 250
    assert manifest.class_names == [f"digit-{i}" for i in range(10)]
    targets = _digits()[1]
    for sample_id, sample in samples.items():
        split, row = sample_id.split("/")
        assert (sample["split"] == "test") == (split == "test")
        number = int(row) + (250 if split == "test" else 0)
        assert manifest.class_names[int(sample["cls"])] == f"digit-{targets[number]}"


def test_unlabelled_parquet_glob_with_hub_file_names(tmp_path: Path) -> None:
    """The hub's Parquet layout (data/{split}-NNNNN-of-NNNNN.parquet) read through a glob, no label column."""
    dataset = digits_dataset(120, labels="none")
    (tmp_path / "data").mkdir()
    dataset.select(range(100)).to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    dataset.select(range(100, 120)).to_parquet(str(tmp_path / "data" / "test-00000-of-00001.parquet"))
    cfg = hf_config(tmp_path / "store", f"{tmp_path}/data/*.parquet")
    manifest, samples = stored(cfg, write_shards(cfg, progress=False).manifest)
    assert manifest.splits["test"].num_samples == 20 and manifest.class_names is None
    assert sum(s.num_samples for s in manifest.splits.values()) == 120
    assert all("cls" not in sample for sample in samples.values())


@pytest.mark.parametrize("fmt", ["save_to_disk", "parquet"])
def test_resharding_an_unchanged_dataset_is_a_noop_and_a_changed_one_is_not(tmp_path: Path, fmt: str) -> None:
    folder = save(digits_dataset(200), tmp_path / "hf", fmt)
    cfg = hf_config(tmp_path / "store", folder, "data.label_column=label")
    first = write_shards(cfg, progress=False)
    again = write_shards(cfg, progress=False)
    assert not first.up_to_date and again.up_to_date and again.manifest == first.manifest

    changed = save(digits_dataset(250), tmp_path / "hf-new", fmt)
    os.rename(folder, tmp_path / "hf-old")
    os.rename(changed, folder)
    rebuilt = write_shards(cfg, progress=False)
    assert not rebuilt.up_to_date and rebuilt.version != first.version
    assert sum(rebuilt.num_samples.values()) == 250
    # Samples that were there before keep their split.
    _, before = stored(cfg, first.manifest)
    _, after = stored(cfg, rebuilt.manifest)
    assert all(after[key]["split"] == sample["split"] for key, sample in before.items())


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing-column", "has no column 'img' (columns: image, label): set data.image_column"),
        ("not-images", "column 'label' of"),
        ("empty", "has no rows"),
        ("missing-label", "has no column 'cls' (columns: image, label): set data.label_column"),
        ("no-dataset", "holds no .parquet files and no save_to_disk dataset"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path: Path, capsys, case: str, expected: str) -> None:
    dataset = digits_dataset(0 if case == "empty" else 20)
    folder = save(dataset, tmp_path / "hf", "save_to_disk")
    sets = {
        "missing-column": ["data.image_column=img"],
        "not-images": ["data.image_column=label"],
        "missing-label": ["data.label_column=cls"],
    }.get(case, [])
    if case == "no-dataset":
        folder = tmp_path / "nothing"
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "notes.txt").write_text("no data here")
    sets = ["data.source=huggingface", f"data.path={folder}", f"storage.root={tmp_path / 'store'}", *sets]
    code = cli([x for s in sets for x in ("--set", s)] + ["--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: huggingface: "), err
    assert expected in err[0]
    assert not list((tmp_path / "store").rglob("*.json")) and not list((tmp_path / "store").rglob("*.tar"))


# -- releases that timm loads ------------------------------------------------------------------------------


def exported_run(tmp_path: Path, backbone: str, in_chans: int, *sets: str, **kwargs) -> tuple:
    """An exported, untrained 16 px encoder with a metrics.json that passes the promotion gate; returns the
    config and the description."""
    import torch

    from lejepa.objective.model import create_backbone
    from lejepa.train.export import encoder_description, export_encoder

    cfg = load_config(None, [f"storage.root={tmp_path / 'store'}", "pretrain.run_name=tiny", *sets])
    storage = Storage.from_config(cfg.storage)
    run_url = storage.url("runs", "tiny")
    small_input = kwargs.pop("small_input", False)
    torch.manual_seed(0)
    network = create_backbone(backbone, in_chans=in_chans, img_size=16, small_input=small_input, **kwargs)
    mean, std = [0.2, 0.3, 0.4][:in_chans], [0.25, 0.2, 0.3][:in_chans]
    description = encoder_description(
        backbone, kwargs, in_chans, 16, small_input, network.num_features, mean, std
    )
    export_encoder(network, description, storage, run_url)
    storage.write_json(
        f"{run_url}/metrics.json",
        {
            "run": run_url,
            "encoder": {
                "url": run_url,
                "sha256": storage.sha256(f"{run_url}/encoder.safetensors"),
                "description": description,
            },
            "dataset": {
                "name": "digits",
                "version": "v-test",
                "manifest": "m.json",
                "fingerprint": "f",
                "splits": {"test": {"split": "test", "num_samples": 10, "fingerprint": "t"}},
            },
            "linear_probe_top1": 0.9,
            "knn_top1": 0.9,
            "models": {"encoder": {"linear_probe_top1": 0.9}, "raw_pixels": {"linear_probe_top1": 0.5}},
            "protocol": {"linear_probe": "test"},
            "notes": [],
        },
    )
    return cfg, description


@pytest.mark.parametrize(
    "backbone, in_chans, kwargs",
    [("resnet10t", 1, {}), ("vit_tiny_patch16_224", 3, {"patch_size": 4, "depth": 2})],
)
def test_a_release_loads_in_timm_with_the_features_of_load_encoder(
    tmp_path: Path, backbone: str, in_chans: int, kwargs: dict
) -> None:
    import timm
    import torch

    from lejepa.publish.stage import run_publish, verify_release
    from lejepa.train.export import load_encoder

    cfg, description = exported_run(tmp_path, backbone, in_chans, **kwargs)
    summary = run_publish(cfg)
    storage = Storage.from_config(cfg.storage)
    release = verify_release(storage, summary.model_uri)  # every file, the timm folder's included
    assert {"timm/config.json", "timm/model.safetensors"} <= set(release["files"])
    timm_config = json.loads(Path(summary.model_uri, "timm", "config.json").read_text())
    assert timm_config["architecture"] == backbone and timm_config["model_args"]["in_chans"] == in_chans

    model = timm.create_model(f"local-dir:{summary.model_uri}/timm", pretrained=True, num_classes=0).eval()
    images = torch.randint(
        0, 256, (4, in_chans, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    expected = load_encoder(summary.model_uri)(images)
    for data_config in (
        timm.data.resolve_data_config({}, model=model),
        timm.data.resolve_model_data_config(model),
    ):
        assert data_config["input_size"] == (in_chans, 16, 16) and data_config["crop_pct"] == 1.0
        assert data_config["interpolation"] == "bilinear"
        mean = torch.tensor(data_config["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(data_config["std"]).view(1, -1, 1, 1)
        with torch.no_grad():
            features = model((images.float() / 255 - mean) / std)
        torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    assert features.shape == (4, description["embed_dim"])

    card = Path(summary.model_uri, "README.md").read_text()
    assert f'load_encoder("{summary.model_uri}")' in card
    assert f'timm.create_model("local-dir:{summary.model_uri}/timm", pretrained=True)' in card


def test_a_small_input_stem_gets_no_timm_folder_and_the_card_says_why(tmp_path: Path) -> None:
    from lejepa.publish.stage import run_publish

    cfg, _ = exported_run(tmp_path, "resnet18", 1, small_input=True)
    summary = run_publish(cfg)
    release = json.loads(Path(summary.model_uri, "release.json").read_text())
    assert summary.promoted and not any(name.startswith("timm/") for name in release["files"])
    assert not Path(summary.model_uri, "timm").exists()
    card = Path(summary.model_uri, "README.md").read_text()
    assert "No `timm/` folder: its small-input stem (model.small_input" in card


class FakeHub:
    """Stands in for huggingface_hub.HfApi (the hub is not reachable here): records what it is asked."""

    calls: list = []

    def __init__(self, token: str | None = None) -> None:
        FakeHub.calls.append(("token", token))

    def create_repo(self, repo_id: str, **kwargs) -> None:
        FakeHub.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, repo_id: str, folder_path: str, **kwargs) -> None:
        FakeHub.calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path))))


@pytest.mark.parametrize("case", ["unset", "no-token", "uploaded"])
def test_the_hub_upload_happens_only_when_asked_and_with_a_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, case: str
) -> None:
    import huggingface_hub

    from lejepa.publish.stage import run_publish

    token = "hf_do-not-leak-this-token"
    FakeHub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    if case != "no-token":
        monkeypatch.setenv("HF_TOKEN", token)
    sets = [] if case == "unset" else ["publish.hf_repo=me/lejepa-tiny"]
    cfg, _ = exported_run(tmp_path, "resnet10t", 1, *sets)
    summary = run_publish(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    release = json.loads(Path(summary.model_uri, "release.json").read_text())
    assert summary.promoted

    if case == "unset":
        assert FakeHub.calls == [] and release["hf_repo"] is None and err == []
    elif case == "no-token":
        assert FakeHub.calls == [] and release["hf_repo"] is None
        assert len(err) == 1 and err[0].startswith(
            "warning: publish.hf_repo=me/lejepa-tiny: HF_TOKEN is not set"
        )
    else:
        assert FakeHub.calls == [
            ("token", token),
            ("create_repo", "me/lejepa-tiny", {"repo_type": "model", "private": True, "exist_ok": True}),
            ("upload_folder", "me/lejepa-tiny", ["README.md", "config.json", "model.safetensors"]),
        ]
        assert release["hf_repo"] == "https://huggingface.co/me/lejepa-tiny" and err == []
        assert (
            'timm.create_model("hf-hub:me/lejepa-tiny", pretrained=True)'
            in Path(summary.model_uri, "README.md").read_text()
        )
    for path in Path(summary.model_uri).rglob("*"):
        assert path.is_dir() or token not in path.read_bytes().decode(errors="ignore"), path
