"""The probes' rules, the same for every feature set, and the gap between the encoder and a baseline marked
against the probe's noise."""

from __future__ import annotations

import math

import pytest
import torch

from lejepa.config import load_config
from lejepa.evaluate.report import gap_text, top1_cell
from lejepa.evaluate.scoring import gap, probe_scores


def _scores(seeds: list[float], knn: float) -> dict:
    return {
        "linear_probe_top1": sum(seeds) / len(seeds),
        "linear_probe_spread": max(seeds) - min(seeds),
        "linear_probe_seeds": seeds,
        "knn_top1": knn,
    }


def test_a_linear_gap_larger_than_either_models_seed_spread_is_beyond_the_noise() -> None:
    right = torch.ones(100, dtype=torch.bool)
    ours, pixels = _scores([0.880, 0.882], 0.9), _scores([0.840, 0.846], 0.9)
    mark = gap(ours, pixels, right, right)["linear_probe"]
    assert mark["gap"] == pytest.approx(0.038)
    assert mark["noise"] == pytest.approx(0.006)  # the larger spread: the baseline's
    assert mark["beyond_noise"] is True
    close = gap(ours, _scores([0.876, 0.884], 0.9), right, right)["linear_probe"]
    assert close["gap"] == pytest.approx(0.001) and close["noise"] == pytest.approx(0.008)
    assert close["beyond_noise"] is False


def test_one_probe_seed_gives_no_noise_estimate() -> None:
    right = torch.ones(10, dtype=torch.bool)
    mark = gap(_scores([0.9], 0.9), _scores([0.8], 0.9), right, right)["linear_probe"]
    assert mark["noise"] is None and mark["beyond_noise"] is None
    assert gap_text(mark) == "encoder +10.00, noise unknown"


def test_the_knn_noise_counts_the_test_samples_the_two_models_disagree_on() -> None:
    # 1,000 test samples: the encoder gets 40 right that the baseline misses, the baseline 10 the encoder
    # misses; b + c = 50 discordant samples, so two standard errors are 2 * sqrt(50) / 1000 = 1.41 points.
    ours = torch.zeros(1000, dtype=torch.bool)
    baseline = torch.zeros(1000, dtype=torch.bool)
    ours[:840], baseline[:800] = True, True
    baseline[900:910] = True
    scores = _scores([0.9, 0.9], 0.84), _scores([0.8, 0.8], 0.81)
    mark = gap(*scores, ours, baseline)["knn"]
    assert mark["noise"] == pytest.approx(2 * math.sqrt(50) / 1000)
    assert mark["gap"] == pytest.approx(0.03) and mark["beyond_noise"] is True
    # The same accuracies from models that disagree on many more samples: within the noise.
    shuffled = torch.roll(baseline, 300)
    assert gap(*scores, ours, shuffled)["knn"]["beyond_noise"] is False


def test_the_table_cells_show_the_spread_and_the_marks() -> None:
    right = torch.ones(100, dtype=torch.bool)
    ours, pixels = _scores([0.880, 0.882], 0.9), _scores([0.840, 0.846], 0.9)
    pixels["gap_to_encoder"] = gap(ours, pixels, right, right)
    assert top1_cell(ours, "linear_probe") == "88.10% (seeds spread 0.20)"
    assert top1_cell(pixels, "linear_probe") == "84.30% (encoder +3.80, beyond noise 0.60)"
    assert top1_cell(pixels, "knn") == "90.00% (encoder +0.00, within noise 0.00)"


def test_the_knn_compares_standardised_features_and_dinos_the_features_as_they_are() -> None:
    """Informative dimensions a hundred times narrower than four uninformative ones: a cosine of the
    features as they are (DINO's kNN) sees the noise; standardised, every dimension counts the same."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=generator)
    labels = torch.arange(400) % 4
    informative = 0.01 * (centres[labels] + 0.3 * torch.randn(400, 16, generator=generator))
    features = torch.cat([informative, torch.randn(400, 4, generator=generator)], dim=1)
    cfg = load_config(None, ["evaluate.probe_epochs=5", "evaluate.probe_seeds=1"])
    scores, knn_right = probe_scores(features[:300], labels[:300], features[300:], labels[300:], 4, cfg)
    assert scores["knn_top1"] > 0.9 and scores["knn_dino_top1"] < 0.6
    assert knn_right.float().mean().item() == pytest.approx(scores["knn_top1"])
