"""A training step never makes the host wait for the device (which a GPU turns into idle time).

The CPU cannot show a GPU's stall, but it can count its causes: `tests/programs/step_host_reads.py`
trains one rank and records every read of a tensor's value by the host, every tensor built from host
values onto the device, and every device synchronize, inside the training steps after the first few.
DeepSpeed's defaults made five a step under bf16 ZeRO-2 (its throughput timer's two synchronizes, the
overflow check's `.item()`, the clip's `bool(norm)`), and its ZeRO 1-2 one more per parameter group on
any settings (the -1 it masks a non-finite gradient norm with, copied from the host: on an H200 that
one cost 16% of the GPU profile's throughput). DeepSpeed's bf16 mode made about 52 a step under ZeRO-0,
where its wrapper checks every gradient: there bf16 is torch's autocast instead.
`tests/train/test_train_cuda.py` checks the same on a GPU with torch's sync debug mode.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lejepa.config import ConfigError, load_config
from lejepa.objective.model import Encoder
from lejepa.train.engine import _mask_non_finite, build_engine, require_deepspeed

PROGRAM = Path(__file__).parents[1] / "programs" / "step_host_reads.py"


def host_reads(store: Path, *overrides: str) -> dict:
    settings = [
        f"storage.root={store}",
        "data.source=digits",
        "model.backbone=resnet10t",
        "model.proj_hidden_dim=64",
        "model.proj_dim=32",
        "views.local_views=2",
        "loss.num_slices=64",
        "pretrain.batch_size=16",
        "pretrain.max_steps=6",
        "pretrain.log_every=100",
        "pretrain.num_workers=0",
        *overrides,
    ]
    args = [sys.executable, str(PROGRAM)] + [a for s in settings for a in ("--set", s)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("zero_stage", "views_on_device", "autocast"), [(2, True, False), (0, False, True)])
def test_training_steps_read_nothing_back_from_the_device(
    tmp_path: Path, zero_stage: int, views_on_device: bool, autocast: bool
) -> None:
    # bf16 is DeepSpeed's bf16 mode under ZeRO-2 and torch's autocast under ZeRO-0.
    report = host_reads(
        tmp_path,
        f"pretrain.zero_stage={zero_stage}",
        "pretrain.precision=bf16",
        f"views.on_device={str(views_on_device).lower()}",
        "pretrain.grad_clip=1.0",
    )
    assert report["steps"] == 3
    assert report["reads"] == [] and report["synchronizes"] == 0, report
    assert report["autocast"] is autocast
    assert report["parameters"] == ("torch.float32" if autocast else "torch.bfloat16")
    # One rank has nothing to average: ZeRO-0 skips DeepSpeed's all-reduce of the gradients, which copied
    # each of them into a bucket and back (ZeRO 1-2 reduce within their own optimizer).
    if zero_stage == 0:
        assert report["all_reduces"] == 0, report


def test_deepspeed_defaults_would_read_back_every_step(tmp_path: Path) -> None:
    """The same count on DeepSpeed's own settings: the check above can fail."""
    defaults = tmp_path / "deepspeed.json"
    defaults.write_text(
        json.dumps({"timers": {"throughput": {"enabled": True}}, "bf16": {"check_grad_overflow": True}})
    )
    report = host_reads(
        tmp_path,
        "pretrain.zero_stage=2",
        "pretrain.precision=bf16",
        f"pretrain.deepspeed_config={defaults}",
    )
    assert report["synchronizes"] >= 2 * report["steps"], report
    assert any(name == "item" for name, _, _ in report["reads"]), report


@pytest.mark.parametrize("shape", [(), (5,)])
def test_zero_norm_masking_without_a_host_copy_marks_as_deepspeed_does(shape: tuple[int, ...]) -> None:
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace

    values = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0, 0.0])
    for value in values if shape == () else [values]:
        theirs, ours = value.clone(), value.clone()
        mask_nan_or_inf_with_val_inplace(theirs, device="cpu")
        _mask_non_finite(ours)
        assert torch.equal(ours, theirs), (value, ours, theirs)


def test_a_deepspeed_whose_zero_would_step_on_nan_gradients_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # DeepSpeed 0.19.7 turned the -1 above into a finite global norm, so a NaN step was not skipped.
    import deepspeed

    cfg = load_config(None, ["model.backbone=resnet10t", "pretrain.zero_stage=2"])
    encoder = Encoder.from_config(cfg.model, in_chans=1, img_size=8)
    monkeypatch.setattr(deepspeed, "__version__", "0.19.7")
    refused = r"DeepSpeed 0\.19\.7 is older than 0\.19\.8.*: pip install 'deepspeed>=0\.19\.8'"
    with pytest.raises(ConfigError, match=refused):
        build_engine(cfg, encoder, 1, torch.device("cpu"), lambda: 10)
    require_deepspeed("0.20.0+cu130")  # a newer one, with a local version suffix, is taken
