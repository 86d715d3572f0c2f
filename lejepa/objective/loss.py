"""The LeJEPA objective: predict the global views' mean, keep every view's embedding Gaussian.

target      = mean of the G global views' projections          (no stop-gradient)
prediction  = mean over views, samples and dims of (proj_v - target)^2
sigreg      = SIGReg statistic of each view's projections, averaged over views
total       = (1 - lamb) * prediction + lamb * sigreg
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor


class LeJEPALoss(NamedTuple):
    total: Tensor
    prediction: Tensor
    sigreg: Tensor


def lejepa_loss(
    projections: Tensor, num_global: int, sigreg: Callable[[Tensor], Tensor], lamb: float = 0.05
) -> LeJEPALoss:
    """LeJEPA loss of `projections` (V, N, P) whose first `num_global` views are the global ones.

    `sigreg` maps (V, N, P) to the view-averaged statistic (a `lejepa.objective.sigreg.SIGReg`). `lamb` is the
    method's single trade-off hyperparameter (0.05 in the paper).
    """
    if projections.dim() != 3:
        raise ValueError(f"projections must be (views, batch, dim), got shape {tuple(projections.shape)}")
    if not 1 <= num_global <= projections.shape[0]:
        raise ValueError(f"num_global must be in [1, {projections.shape[0]}], got {num_global}")
    # At least float32 whatever the model's precision: bf16's 8-bit mantissa is too coarse for these means.
    projections = projections.to(torch.promote_types(projections.dtype, torch.float32))
    target = projections[:num_global].mean(dim=0)
    prediction = (projections - target).square().mean()
    # SIGReg on (V, N, P) averages the per-view statistics: each view's batch is tested separately.
    regulariser = sigreg(projections)
    total = (1.0 - lamb) * prediction + lamb * regulariser
    return LeJEPALoss(total, prediction, regulariser)
