"""The pretraining optimizer: AdamW whose gradient clipping and non-finite skip never wait for the device.

DeepSpeed can clip gradients and skip a step whose gradients are not finite, but both read a value back
to the host at every step (`bool(norm)`, `.item()`). On a GPU each read stops the host until the device
has drained, so the kernels that follow are launched into an idle device. Here the norm, the clip
factor and the decision to skip stay device tensors: the gradients are multiplied by
min(1, max_norm / norm), and a step whose norm is not finite is skipped inside the fused AdamW kernel
(torch's `found_inf` protocol, the one `GradScaler` uses), which also leaves its step count unchanged.
`lejepa.train.engine` gives DeepSpeed this optimizer and turns DeepSpeed's own clipping and check off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class DeviceAdamW(torch.optim.AdamW):
    """Fused AdamW with global-norm clipping at `max_norm` (0: none) and a skip of non-finite steps.

    Under ZeRO, DeepSpeed steps this optimizer one parameter group at a time, on this rank's partition
    of the gradients, after it has computed the norm of all of them: `global_norm` then returns that
    norm (set by `lejepa.train.engine`). Left unset, the norm is that of the gradients this optimizer holds,
    which is the global one when it holds all of them (no ZeRO).
    """

    def __init__(self, params: Iterable[Any], lr: float, max_norm: float) -> None:
        super().__init__(params, lr=lr, fused=True)
        self.max_norm = max_norm
        self.global_norm: Callable[[], Tensor | None] | None = None
        self.last_norm: Tensor | None = None
        """The latest step's gradient norm before clipping (on the device)."""
        self.last_skipped: Tensor | None = None
        """1.0 on the device when the latest step was skipped (its gradients were not finite), else 0.0."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:  # ZeRO-3 hands over sub-groups one at a time; the others are empty
            return None
        norm = self._norm(params)
        # DeepSpeed reports a norm that is not finite as -1.
        skipped = (~torch.isfinite(norm) | (norm < 0)).float()
        if self.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, norm, foreach=True)
        self.found_inf = skipped  # read by torch's fused AdamW: where it is 1, nothing changes
        try:
            loss = super().step(closure)
        finally:
            del self.found_inf
        self.last_norm, self.last_skipped = norm, skipped
        return loss

    def _norm(self, params: list[Tensor]) -> Tensor:
        if self.global_norm is None:
            return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True).float()
        norm = self.global_norm()
        if not isinstance(norm, Tensor):
            raise RuntimeError(
                "DeepSpeed computed no gradient norm for this step: leave "
                "zero_optimization.compute_grad_norm on in pretrain.deepspeed_config"
            )
        return norm.float()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Also takes the state of an unfused AdamW (a checkpoint written before this optimizer existed)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.update(fused=True, foreach=None)
            for p in group["params"]:
                state = self.state.get(p, {})
                if "step" in state:  # the fused kernel reads the step count on the parameters' device
                    state["step"] = state["step"].to(p.device, torch.float32)
