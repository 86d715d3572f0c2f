"""The evaluate stage end to end on small data: sklearn's 8x8 digits, sharded, and an untrained encoder."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import lejepa.evaluate.stage as evaluate
from lejepa.config import PipelineConfig, load_config
from lejepa.data.manifest import ShardManifest, locate_manifest
from lejepa.data.shard import write_shards
from lejepa.evaluate.features import (
    calibrate_batchnorm,
    extract_features,
    features_key,
    in_precision,
    on_device,
    read_out,
)
from lejepa.evaluate.probes import effective_rank
from lejepa.objective.model import Encoder, create_backbone
from lejepa.objective.views import eval_view
from lejepa.store.storage import Storage
from lejepa.train.export import FrozenEncoder, encoder_description, export_encoder, rebuild_backbone

FAST = {
    "evaluate": {
        "device": "cpu",  # the same numbers with a GPU; test_evaluate_cuda.py tests cuda
        "precision": "fp32",  # the same on every CPU (auto is bf16 where the CPU has it natively)
        "probe_epochs": 20,
        "probe_batch_size": 256,
        "probe_lr": 1e-2,
        "batch_size": 128,
        "num_workers": 0,
        "diagnostic_samples": 128,
    },
    "loss": {"num_slices": 64},
    "pretrain": {"batch_size": 64, "run_name": "tiny"},
    "shard": {"workers": 1},
}


def _config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"storage": {"root": str(tmp_path / "store")}, "data": data, **FAST}))
    return path


def _export_tiny_encoder(cfg: PipelineConfig, with_projector: bool) -> None:
    """An untrained resnet10t exported the way the pretrain stage does."""
    storage = Storage.from_config(cfg.storage)
    manifest = ShardManifest.load(storage, locate_manifest(cfg, storage))
    size = manifest.longer_side
    encoder = Encoder(
        "resnet10t",
        in_chans=1,
        img_size=size,
        proj_dim=16,
        proj_hidden_dim=32,
        proj_layers=2,
        small_input=False,
    )
    projector = {"proj_dim": 16, "proj_hidden_dim": 32, "proj_layers": 2} if with_projector else None
    description = encoder_description(
        "resnet10t",
        {},
        1,
        size,
        False,
        encoder.embed_dim,
        manifest.mean,
        manifest.std,
        projector=projector,
    )
    export_encoder(
        encoder.backbone,
        description,
        storage,
        storage.url("runs", cfg.pretrain.run_name),
        projector=encoder.projector if with_projector else None,
    )


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("digits")
    config = _config(tmp_path, {"source": "digits", "test_fraction": 0.2})
    cfg = load_config(config)
    write_shards(cfg, progress=False)
    _export_tiny_encoder(cfg, with_projector=True)
    return config


@pytest.fixture(scope="module")
def evaluated(digits_run: Path) -> dict:
    """The printed summary of one `evaluate` run (its last stdout line)."""
    with pytest.MonkeyPatch.context() as patch:
        printed: list[str] = []
        patch.setattr("builtins.print", lambda *args, **kwargs: printed.append(" ".join(map(str, args))))
        assert evaluate.cli(["--config", str(digits_run)]) == 0
    return json.loads(printed[-1])


def test_evaluate_scores_encoder_and_baselines(evaluated: dict) -> None:
    summary = evaluated
    assert set(summary["baselines"]) == {"random_init", "raw_pixels"}
    assert 0.0 <= summary["linear_probe_top1"] <= 1.0 and 0.0 <= summary["knn_top1"] <= 1.0
    # Logistic regression on the raw pixels of digits is a well-known ~95%: the probe must get close.
    assert summary["baselines"]["raw_pixels"] > 0.85

    run = Path(summary["metrics"]).parent
    metrics = json.loads(Path(summary["metrics"]).read_text())
    manifest = ShardManifest.load(Storage(str(run.parents[1])), metrics["dataset"]["manifest"])
    assert metrics["dataset"]["splits"]["test"] == {
        "split": "test",
        "num_samples": 387,
        "fingerprint": manifest.splits["test"].fingerprint,
    }
    assert metrics["linear_probe_top1"] == summary["linear_probe_top1"]
    # The linear probe's top-1 is the mean of two seeds; each baseline carries its gap to the encoder.
    seeds = metrics["models"]["encoder"]["linear_probe_seeds"]
    assert len(seeds) == 2 and metrics["linear_probe_top1"] == pytest.approx(sum(seeds) / 2)
    for name in ("random_init", "raw_pixels"):
        baseline = metrics["models"][name]
        marks = baseline["gap_to_encoder"]
        assert marks["linear_probe"]["gap"] == pytest.approx(
            metrics["linear_probe_top1"] - baseline["linear_probe_top1"]
        )
        assert marks["knn"]["gap"] == pytest.approx(metrics["knn_top1"] - baseline["knn_top1"])
        assert all(isinstance(mark["beyond_noise"], bool) for mark in marks.values())
    assert all(0 <= metrics["models"][name]["knn_dino_top1"] <= 1 for name in metrics["models"])
    for name in ("encoder", "random_init"):
        diagnostics = metrics["models"][name]
        assert 1.0 <= diagnostics["rankme"] <= 512
        assert diagnostics["sigreg"] > 0 and diagnostics["lejepa_loss"] > 0
    assert (run / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (run / "evaluation.md").read_text()
    assert "raw pixels (logistic regression)" in report and "evaluation.png" in report
    assert " noise " in report and "(seeds spread " in report
    page = (run / "report.html").read_text()
    assert f"{summary['linear_probe_top1'] * 100:.2f}%" in page
    assert len(list((run / "eval").glob("features-*.safetensors"))) == 2


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        # without a GPU, auto is the CPU: the same features
        ["evaluate.device=auto"],
    ],
)
def test_retry_reads_features_from_the_cache(
    digits_run: Path, evaluated: dict, monkeypatch: pytest.MonkeyPatch, overrides: list[str]
) -> None:

    def recompute(*args: object, **kwargs: object) -> None:
        raise AssertionError("features were recomputed despite the cache")

    monkeypatch.setattr("lejepa.evaluate.features.extract_features", recompute)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    again = evaluate.run_evaluate(load_config(digits_run, overrides))
    assert again.linear_probe_top1 == evaluated["linear_probe_top1"]
    assert again.baselines == evaluated["baselines"]
    assert sum("cache" in note for note in again.notes) == 2
    protocol = json.loads(Path(again.metrics).read_text())["protocol"]
    assert "networks in fp32 on cpu," in protocol["features"]


def test_features_key_of_explicit_precisions_is_unchanged() -> None:
    """Caches written before `evaluate.device` and precision auto existed stay valid: same key, same file."""
    cfg = load_config(None)
    manifest = SimpleNamespace(url="s3://bucket/datasets/digits/v1/manifest.json", version="v1")
    extractors = ["raw_pixels", "encoder", "random_init"]
    keys = {p: features_key("ab" * 32, manifest, "test", extractors, p, cfg) for p in ("fp32", "bf16")}
    assert keys == {"fp32": "312be0eee8a80e5a", "bf16": "07cedf1415a14960"}


def test_auto_device() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert evaluate.resolve_device("cpu") == cpu
    assert evaluate.resolve_device("auto") == (cuda if torch.cuda.is_available() else cpu)


def test_cuda_without_a_gpu_is_one_error_line_and_writes_nothing(
    digits_run: Path, evaluated: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    store = digits_run.parent / "store"
    before = {path: path.stat().st_mtime_ns for path in store.rglob("*")}
    assert evaluate.cli(["--config", str(digits_run), "--set", "evaluate.device=cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: evaluate.device=cuda, but torch sees no CUDA GPU")
    assert "evaluate.device=auto" in err[0]
    assert {path: path.stat().st_mtime_ns for path in store.rglob("*")} == before


@pytest.mark.parametrize(
    "override",
    [
        "evaluate.calibration_samples=64",  # the random-init baseline's BatchNorm statistics change
        "evaluate.precision=bf16",  # the networks' arithmetic changes
    ],
)
def test_features_of_other_settings_are_not_read_from_the_cache(
    digits_run: Path, evaluated: dict, monkeypatch: pytest.MonkeyPatch, override: str
) -> None:
    computed: list[object] = []

    def counting(*args: object, **kwargs: object) -> dict:
        computed.append(args)
        return extract_features(*args, **kwargs)

    monkeypatch.setattr("lejepa.evaluate.features.extract_features", counting)
    cfg = load_config(digits_run, [override])
    again = evaluate.run_evaluate(cfg)
    assert len(computed) == 2 and not any("cache" in note for note in again.notes)


def test_unlabelled_data_skips_probes_but_not_diagnostics(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(images / f"{i:03d}.png")
    cfg = load_config(
        _config(tmp_path, {"source": "imagefolder", "path": str(images), "test_fraction": 0.25})
    )
    write_shards(cfg, progress=False)
    _export_tiny_encoder(cfg, with_projector=False)

    summary = evaluate.run_evaluate(cfg)
    assert summary.linear_probe_top1 is None and summary.knn_top1 is None
    assert summary.baselines == {"random_init": None, "raw_pixels": None}
    assert any("probes skipped" in note for note in summary.notes)
    assert any("LeJEPA loss diagnostic skipped" in note for note in summary.notes)
    metrics = json.loads(Path(summary.metrics).read_text())
    assert metrics["diagnostics"]["rankme"] >= 1.0 and "lejepa_loss" not in metrics["diagnostics"]


def test_missing_encoder_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert evaluate.cli(["--set", f"storage.root={tmp_path}", "--set", "pretrain.run_name=nothing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no exported encoder in ")


def test_calibrated_batchnorm_holds_the_data_statistics() -> None:
    """The random-init baseline's BatchNorm measures its input (its initial 0/1 statistics collapse the
    features in eval mode); the weights stay random."""
    torch.manual_seed(0)
    backbone = create_backbone("resnet18", in_chans=1)
    description = encoder_description("resnet18", {}, 1, 32, False, backbone.num_features, [0.3], [0.3])
    frozen = FrozenEncoder(backbone, description)
    weights = backbone.conv1.weight.clone()
    images = torch.randint(0, 256, (192, 1, 32, 32), dtype=torch.uint8)
    rank_before = effective_rank(frozen(images))
    calibrate_batchnorm(frozen, images, batch_size=64)
    assert not frozen.training
    with torch.no_grad():
        stem = backbone.conv1(eval_view(images, 32, [0.3], [0.3]))
    torch.testing.assert_close(backbone.bn1.running_mean, stem.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert torch.equal(backbone.conv1.weight, weights)
    assert effective_rank(frozen(images)) > 2 * rank_before


def test_extraction_moves_images_to_the_device_and_features_back() -> None:
    """The device-generic path, with device="cpu" spelt out: what a GPU run goes through."""
    torch.manual_seed(0)
    backbone = create_backbone("resnet10t", in_chans=1)
    description = encoder_description("resnet10t", {}, 1, 16, False, backbone.num_features, [0.3], [0.3])
    frozen = FrozenEncoder(backbone, description).to(torch.device("cpu"))
    # The normalisation follows the module to its device, but is not part of the exported weights.
    assert frozen.mean.device.type == "cpu" and set(frozen.state_dict()) == {
        f"backbone.{name}" for name in backbone.state_dict()
    }
    images = torch.randint(0, 256, (20, 1, 16, 16), dtype=torch.uint8)
    batches = [(images[:12], torch.arange(12)), (images[12:], torch.arange(12, 20))]
    extractors = {"encoder": in_precision(frozen, "fp32")}
    features = extract_features(extractors, on_device(batches, torch.device("cpu")))
    assert features["encoder"].dtype == torch.float32 and features["encoder"].device.type == "cpu"
    torch.testing.assert_close(features["encoder"], frozen(images))
    assert torch.equal(features["labels"], torch.arange(20))


def test_bf16_extraction_gives_float32_features_close_to_fp32() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("resnet18", in_chans=1, small_input=True)
    description = encoder_description("resnet18", {}, 1, 28, True, backbone.num_features, [0.3], [0.3])
    frozen = FrozenEncoder(backbone, description)
    calibrate_batchnorm(frozen, torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8), 64)
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    exact = in_precision(frozen, "fp32")(images)
    fast = in_precision(frozen, "bf16")(images)
    assert exact.dtype == fast.dtype == torch.float32
    assert not torch.equal(fast, exact)  # bf16 really ran
    assert torch.nn.functional.cosine_similarity(fast, exact).min() > 0.99


@pytest.mark.parametrize(
    "architecture, token",
    [
        ({}, lambda normed: normed[:, 0]),  # the class token leads
        # Without a class token: the mean patch token.
        ({"class_token": False, "global_pool": "avg"}, lambda normed: normed.mean(1)),
    ],
    ids=["class-token", "no-class-token"],
)
def test_last2_reads_the_tokens_of_a_vits_last_two_blocks(architecture: dict, token) -> None:
    kwargs = {"patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2, **architecture}
    description = encoder_description("vit_tiny_patch16_224", kwargs, 1, 16, False, 32, [0.5], [0.25])
    torch.manual_seed(0)
    frozen = FrozenEncoder(rebuild_backbone(description), description)
    images = torch.randint(0, 256, (5, 1, 16, 16), dtype=torch.uint8)
    features = read_out(frozen, "last2")(images)
    # By hand: the blocks' outputs, each through the final norm, then the token the read-out takes.
    vit = frozen.backbone
    with torch.no_grad():
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(eval_view(images, 16, frozen.mean, frozen.std))))
        outputs = []
        for block in vit.blocks:
            x = block(x)
            outputs.append(token(vit.norm(x)))
    assert features.shape == (5, 64)
    torch.testing.assert_close(features, torch.cat(outputs[-2:], dim=1))
    assert read_out(frozen, "last") is frozen


def test_last2_of_a_cnn_is_its_pooled_last_stage() -> None:
    description = encoder_description("resnet10t", {}, 1, 16, False, 512, [0.5], [0.25])
    frozen = FrozenEncoder(create_backbone("resnet10t", in_chans=1), description)
    assert read_out(frozen, "last2") is frozen


def test_the_random_init_baseline_is_read_out_as_the_encoder(digits_run: Path, tmp_path: Path) -> None:
    """evaluate.features=last2 on a ViT: encoder and random-init features both 2 x embed_dim wide."""
    cfg = load_config(digits_run, [f"storage.root={tmp_path}", "evaluate.features=last2"])
    write_shards(cfg, progress=False)
    storage = Storage.from_config(cfg.storage)
    manifest = ShardManifest.load(storage, locate_manifest(cfg, storage))
    kwargs = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
    description = encoder_description(
        "vit_tiny_patch16_224", kwargs, 1, 8, False, 32, manifest.mean, manifest.std
    )
    export_encoder(rebuild_backbone(description), description, storage, storage.url("runs", "tiny"))
    summary = evaluate.run_evaluate(cfg)
    metrics = json.loads(Path(summary.metrics).read_text())
    assert "read out as last2" in metrics["protocol"]["features"]
    (cached,) = [p for p in (tmp_path / "runs" / "tiny" / "eval").glob("features-test-*.safetensors")]
    widths = {name: t.shape[1] for name, t in load_file(str(cached)).items() if t.ndim == 2}
    assert widths == {"encoder": 64, "random_init": 64, "raw_pixels": 64}
