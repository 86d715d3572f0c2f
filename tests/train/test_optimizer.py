"""DeviceAdamW: torch's AdamW with global-norm clipping and a skip of non-finite steps, on the device."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lejepa.train.optimizer import DeviceAdamW


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def _groups(model: nn.Module) -> list[dict]:
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": 0.05},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


def _backward(model: nn.Module, step: int, scale: float = 1.0) -> None:
    torch.manual_seed(100 + step)
    model.zero_grad(set_to_none=True)
    (scale * model(torch.randn(16, 6)).square().sum()).backward()


@pytest.mark.parametrize("max_norm", [0.0, 0.05])
def test_steps_as_torch_adamw_after_clip_grad_norm(max_norm: float) -> None:
    ours_model, theirs_model = _model(), _model()
    ours = DeviceAdamW(_groups(ours_model), lr=1e-2, max_norm=max_norm)
    theirs = torch.optim.AdamW(_groups(theirs_model), lr=1e-2)
    for step in range(4):
        for model in (ours_model, theirs_model):
            _backward(model, step)
        if max_norm:
            norm = torch.nn.utils.clip_grad_norm_(theirs_model.parameters(), max_norm)
            assert norm > max_norm  # the clip is active at every step
        ours.step()
        theirs.step()
        assert ours.last_skipped is not None and float(ours.last_skipped) == 0.0
    for a, b in zip(ours_model.parameters(), theirs_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_step_with_non_finite_gradients_changes_nothing_and_is_reported() -> None:
    model = _model()
    optimizer = DeviceAdamW(_groups(model), lr=1e-2, max_norm=1.0)
    _backward(model, 0)
    optimizer.step()
    before = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    _backward(model, 1)
    next(model.parameters()).grad[0, 0] = float("nan")
    optimizer.step()
    assert float(optimizer.last_skipped) == 1.0
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[0][name]), name
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(value, before[1]["state"][index][key]), (index, key)
    _backward(model, 2)
    optimizer.step()
    assert float(optimizer.last_skipped) == 0.0
    assert all(float(s["step"]) == 2 for s in optimizer.state_dict()["state"].values())


def test_a_given_global_norm_sets_the_clip() -> None:
    # Under ZeRO the optimizer sees one partition at a time: the clip must use the norm of all of them.
    ours_model, theirs_model = _model(), _model()
    ours = DeviceAdamW(_groups(ours_model), lr=1e-2, max_norm=1.0)
    theirs = torch.optim.AdamW(_groups(theirs_model), lr=1e-2)
    ours.global_norm = lambda: torch.tensor(400.0)
    for model in (ours_model, theirs_model):
        _backward(model, 0)
    for p in theirs_model.parameters():
        p.grad.mul_(1.0 / 400.0)
    ours.step()
    theirs.step()
    for a, b in zip(ours_model.parameters(), theirs_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ours.global_norm = lambda: torch.tensor(-1.0)  # DeepSpeed's word for a norm that is not finite
    _backward(ours_model, 1)
    ours.step()
    assert float(ours.last_skipped) == 1.0


def test_resumes_from_an_unfused_adamw_state() -> None:
    old_model, new_model = _model(), _model()
    old = torch.optim.AdamW(_groups(old_model), lr=1e-2)
    for step in range(2):
        _backward(old_model, step)
        old.step()
    new_model.load_state_dict(old_model.state_dict())
    new = DeviceAdamW(_groups(new_model), lr=1e-2, max_norm=0.0)
    new.load_state_dict(copy.deepcopy(old.state_dict()))  # loading shares CPU tensors with `old`
    for model in (old_model, new_model):
        _backward(model, 2)
    old.step()
    new.step()
    assert all(group["fused"] for group in new.param_groups)
    for a, b in zip(old_model.parameters(), new_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
