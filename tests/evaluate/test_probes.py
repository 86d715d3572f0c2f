"""Probes and diagnostics on synthetic features whose answer is known."""

from __future__ import annotations

import pytest
import torch

from lejepa.evaluate.probes import effective_rank, knn_classify, linear_probe, sigreg_statistic, top1

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


def test_knn_over_chunks_of_the_training_split_equals_one_pass() -> None:
    """kNN scans a large training split in chunks (bounded memory on a GPU): the same neighbours."""
    train_x, train_y = _clusters(1000, seed=8, spread=3.0)
    test_x, _ = _clusters(300, seed=9, spread=3.0)
    one_pass = knn_classify(train_x, train_y, test_x, CLASSES, k=20)
    chunked = knn_classify(train_x, train_y, test_x, CLASSES, k=20, chunk_size=64, train_chunk_size=7)
    assert torch.equal(chunked, one_pass)


def test_probes_run_on_the_device_of_their_inputs() -> None:
    """The device-generic path with the device spelt out (test_evaluate_cuda.py runs it on a GPU)."""
    device = torch.device("cpu")
    train_x, train_y = (t.to(device) for t in _clusters(500, seed=10))
    test_x, _ = _clusters(100, seed=11)
    linear = linear_probe(train_x, train_y, test_x.to(device), CLASSES, epochs=2, batch_size=64)
    knn = knn_classify(train_x, train_y, test_x.to(device), CLASSES)
    assert linear.device == knn.device == device and linear.dtype == knn.dtype == torch.long
