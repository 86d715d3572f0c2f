"""Probes and diagnostics on synthetic features whose answer is known."""

from __future__ import annotations

import pytest
import torch

from lejepa.probes import effective_rank, knn_classify, linear_probe, sigreg_statistic, top1

CLASSES, DIM = 10, 32


def _clusters(n: int, seed: int, spread: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Features that separate the classes: one random unit centre per class plus small noise."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(
        torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(0))
    )
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    return centres[labels] + spread / DIM**0.5 * torch.randn(n, DIM, generator=generator), labels


def test_probes_recover_separable_classes() -> None:
    train_x, train_y = _clusters(2000, seed=1)
    test_x, test_y = _clusters(500, seed=2)
    linear = linear_probe(train_x, train_y, test_x, CLASSES, epochs=10, batch_size=256, lr=1e-2)
    knn = knn_classify(train_x, train_y, test_x, CLASSES)
    assert top1(linear, test_y) > 0.98
    assert top1(knn, test_y) > 0.98


def test_probes_are_at_chance_on_random_labels() -> None:
    generator = torch.Generator().manual_seed(3)
    train_x, test_x = torch.randn(2000, DIM, generator=generator), torch.randn(1000, DIM, generator=generator)
    train_y = torch.randint(0, CLASSES, (2000,), generator=generator)
    test_y = torch.randint(0, CLASSES, (1000,), generator=generator)
    linear = linear_probe(train_x, train_y, test_x, CLASSES, epochs=10, batch_size=256, lr=1e-2)
    knn = knn_classify(train_x, train_y, test_x, CLASSES)
    for predictions in (linear, knn):
        assert abs(top1(predictions, test_y) - 1 / CLASSES) < 0.05


def test_linear_probe_is_seeded() -> None:
    train_x, train_y = _clusters(500, seed=4, spread=3.0)
    test_x, _ = _clusters(200, seed=5, spread=3.0)
    runs = [
        linear_probe(train_x, train_y, test_x, CLASSES, epochs=3, batch_size=64, seed=7) for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


def test_diagnostics_tell_gaussian_from_collapsed() -> None:
    generator = torch.Generator().manual_seed(6)
    gaussian = torch.randn(2000, 64, generator=generator)
    collapsed = torch.randn(1, 64, generator=generator) + 1e-3 * torch.randn(2000, 64, generator=generator)
    assert sigreg_statistic(gaussian, num_slices=256) < 2.0
    assert sigreg_statistic(collapsed, num_slices=256) > 100.0
    assert effective_rank(gaussian) > 0.95 * 64
    assert effective_rank(collapsed) < 1.5


def test_probes_reject_unlabelled_samples() -> None:
    with pytest.raises(ValueError, match="unlabelled"):
        linear_probe(torch.randn(4, 2), torch.tensor([0, 1, -1, 0]), torch.randn(2, 2))
