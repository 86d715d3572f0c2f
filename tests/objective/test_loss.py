"""The LeJEPA loss against a computation written out by hand, sample by sample."""

import pytest
import torch

from lejepa.objective.loss import lejepa_loss
from lejepa.objective.sigreg import SIGReg, sliced_epps_pulley


def test_loss_matches_hand_computation():
    torch.manual_seed(0)
    views, num_global, batch, dim = 5, 2, 7, 3
    projections = torch.randn(views, batch, dim, dtype=torch.float64)
    directions = torch.nn.functional.normalize(torch.randn(dim, 16, dtype=torch.float64), dim=0)
    lamb = 0.3

    def fixed_sigreg(z):
        return sliced_epps_pulley(z, directions)

    loss = lejepa_loss(projections, num_global, fixed_sigreg, lamb)

    squared = 0.0
    for i in range(batch):
        target = sum(projections[g, i] for g in range(num_global)) / num_global
        for v in range(views):
            squared += float(((projections[v, i] - target) ** 2).sum())
    prediction = squared / (views * batch * dim)
    sigreg = sum(float(sliced_epps_pulley(projections[v], directions)) for v in range(views)) / views

    assert loss.prediction.item() == pytest.approx(prediction, rel=1e-12)
    assert loss.sigreg.item() == pytest.approx(sigreg, rel=1e-10)
    assert loss.total.item() == pytest.approx((1 - lamb) * prediction + lamb * sigreg, rel=1e-10)


def test_identical_views_have_no_prediction_loss_and_gradients_reach_every_view():
    z = torch.randn(1, 64, 8).repeat(4, 1, 1).requires_grad_()
    loss = lejepa_loss(z, 2, SIGReg(num_slices=32), lamb=0.05)
    assert loss.prediction.item() == pytest.approx(0.0, abs=1e-12)
    loss.total.backward()
    assert all(z.grad[v].abs().sum() > 0 for v in range(4))


@pytest.mark.parametrize("shape, num_global", [((8, 3), 1), ((2, 8, 3), 0), ((2, 8, 3), 3)])
def test_bad_shapes_are_refused(shape, num_global):
    with pytest.raises(ValueError):
        lejepa_loss(torch.randn(*shape), num_global, SIGReg(num_slices=4))


def test_bf16_projections_get_a_float32_loss():
    """A bf16 model's projections are scored in float32: the same loss as their float32 values give."""
    torch.manual_seed(0)
    projections = torch.randn(4, 64, 16).bfloat16().requires_grad_()
    directions = torch.nn.functional.normalize(torch.randn(16, 32), dim=0)

    def sigreg(z):  # fixed slices: SIGReg itself draws new ones every step
        return sliced_epps_pulley(z, directions)

    loss = lejepa_loss(projections, 2, sigreg)
    reference = lejepa_loss(projections.detach().float(), 2, sigreg)
    assert loss.total.dtype == torch.float32
    torch.testing.assert_close(loss.total, reference.total)
    loss.total.backward()
    assert projections.grad is not None and projections.grad.dtype == torch.bfloat16
