"""What `precision: auto` and `native` mean (lejepa.train.precision), for training and evaluation alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lejepa.config import load_config
from lejepa.train import precision
from lejepa.train.engine import deepspeed_config, trains_in_bf16


@pytest.mark.parametrize("native", [True, False])
def test_native_picks_bf16_only_where_the_hardware_has_it(
    monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert precision.resolve_precision("native", "cpu") == ("bf16" if native else "fp32")
    assert precision.resolve_precision("native", "cuda") == "bf16"
    assert precision.resolve_precision("auto", "cpu") == "fp32"  # whatever the CPU
    assert precision.resolve_precision("auto", "cuda") == "bf16"
    assert precision.resolve_precision("fp32", "cuda") == "fp32"
    assert precision.resolve_precision("bf16", "cpu") == "bf16"
    assert ("lacks" in precision.describe("native", "cpu")) is not native
    cfg = load_config(None, ["pretrain.precision=native", "pretrain.zero_stage=2"])
    assert deepspeed_config(cfg, 1, use_cuda=False)["bf16"]["enabled"] is native
    assert deepspeed_config(load_config(None, []), 1, use_cuda=False)["bf16"]["enabled"] is False


def test_bf16_under_zero_0_is_autocast_not_deepspeeds_bf16_mode() -> None:
    # DeepSpeed's bf16 wrapper at ZeRO-0 reads every gradient back to the host (tests/train/test_step.py).
    for stage, deepspeed_bf16 in ((0, False), (1, True), (2, True), (3, True)):
        cfg = load_config(None, ["pretrain.precision=bf16", f"pretrain.zero_stage={stage}"])
        assert deepspeed_config(cfg, 1, use_cuda=True)["bf16"]["enabled"] is deepspeed_bf16
        assert trains_in_bf16(cfg, use_cuda=True)  # either way: what a baseline must match
        fp32 = load_config(None, ["pretrain.precision=fp32", f"pretrain.zero_stage={stage}"])
        assert not trains_in_bf16(fp32, use_cuda=True)


def test_a_deepspeed_config_that_turns_bf16_on_trains_in_bf16(tmp_path: Path) -> None:
    (tmp_path / "ds.json").write_text(json.dumps({"bf16": {"enabled": True}}))
    cfg = load_config(None, ["pretrain.precision=fp32", f"pretrain.deepspeed_config={tmp_path / 'ds.json'}"])
    assert trains_in_bf16(cfg, use_cuda=True)


def test_this_machines_flags_are_read() -> None:
    flags = open("/proc/cpuinfo").read().split()
    expected = "avx512_bf16" in flags or "amx_bf16" in flags
    assert precision.cpu_has_native_bf16() is expected
