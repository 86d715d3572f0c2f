"""How good are frozen features? Linear probe, kNN and label-free diagnostics, as pure functions on tensors.

- `linear_probe`: LayerNorm + Linear trained on the features with AdamW (weight decay 1e-6) and a linear
  warm-up then cosine schedule, the LeJEPA paper's protocol; seeded, so a rerun gives the same number.
  Inputs are first standardised per dimension with the training features' mean and std (a fixed affine
  map): on raw pixels this makes it plain logistic regression on standardised pixels.
- `knn_classify`: cosine similarity, the k nearest training samples vote with weights exp(sim / T) (DINO's
  weighted kNN, k=20, T=0.07).
- `effective_rank`: RankMe, exp of the entropy of the normalised singular values: ~D for well-spread
  features, ~1 for collapsed ones.
- `sigreg_statistic`: the Epps-Pulley normality statistic LeJEPA minimises, on fixed seeded slices: small
  for isotropic Gaussian embeddings, large for collapsed or badly scaled ones.

Labels are int64 in [0, num_classes); callers drop unlabelled samples (label -1) first. Everything runs on
the device of the input tensors (CPU or GPU), and predictions stay there. The random draws (the probe's
initialisation and shuffling, the SIGReg slices) come from seeded CPU generators and are then moved, so a
seed gives the same draws on every device, and the same scores up to rounding.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lejepa.objective.sigreg import slice_directions, sliced_epps_pulley
from lejepa.train.schedule import warmup_cosine


def _check(features: Tensor, labels: Tensor, name: str) -> None:
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels):
        raise ValueError(
            f"{name}: expected features (N, D) and labels (N,), got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if len(labels) and int(labels.min()) < 0:
        raise ValueError(f"{name}: labels must be >= 0; drop unlabelled samples (label -1) first")


def top1(predictions: Tensor, labels: Tensor) -> float:
    """Fraction of predictions equal to the labels."""
    return (predictions == labels).float().mean().item() if len(labels) else float("nan")


def standardised(train: Tensor, other: Tensor) -> tuple[Tensor, Tensor]:
    """Both sets in float32, standardised per dimension with the mean and std of `train`."""
    mean, std = train.float().mean(0), train.float().std(0)
    std = torch.where(std > 1e-6, std, 1.0)  # dims constant on the training set stay unscaled
    return (train.float() - mean) / std, (other.float() - mean) / std


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int | None = None,
    epochs: int = 100,
    batch_size: int = 1024,
    lr: float = 1e-2,
    weight_decay: float = 1e-6,
    warmup_fraction: float = 0.1,
    seed: int = 0,
) -> Tensor:
    """Train LayerNorm + Linear on the training features; returns the predicted classes of `test_features`.

    Mini-batches of precomputed features keep it fast on a CPU: 54k x 256 features for 100 epochs of 1024
    is ~5300 small steps, about 15-30 s on 2 shared cores (raw 784-pixel features take ~35 s).
    """
    _check(train_features, train_labels, "linear_probe")
    num_classes = num_classes or int(train_labels.max()) + 1
    dim, device = train_features.shape[1], train_features.device
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        norm, linear = nn.LayerNorm(dim).to(device), nn.Linear(dim, num_classes).to(device)
    # Fixed per-dimension standardisation first: frozen features often have dims with a large mean and a
    # tiny spread, which LayerNorm alone leaves ill-conditioned for the optimiser.
    train_features, test_features = standardised(train_features, test_features)
    # The features are frozen, so LayerNorm's normalisation is computed once; only its affine part and the
    # Linear layer train. The same model as LayerNorm + Linear, without renormalising every epoch.
    x, y = nn.functional.layer_norm(train_features, (dim,)), train_labels.long()

    def head(normalised: Tensor) -> Tensor:
        return linear(normalised * norm.weight + norm.bias)

    parameters = [*norm.parameters(), *linear.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    schedule = _warmup_then_cosine(optimizer, epochs * math.ceil(len(x) / batch_size), warmup_fraction)
    with _one_thread():
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator).to(device, non_blocking=True)
            # One gather per epoch, then contiguous mini-batches: much cheaper than a gather per step.
            for xb, yb in zip(x[order].split(batch_size), y[order].split(batch_size), strict=True):
                loss = nn.functional.cross_entropy(head(xb), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    with torch.no_grad():
        test = nn.functional.layer_norm(test_features, (dim,))
        return torch.cat([head(chunk).argmax(1) for chunk in test.split(8192)])


def _warmup_then_cosine(
    optimizer: torch.optim.Optimizer, total: int, warmup_fraction: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate rises linearly over the first `warmup_fraction` of `total` steps, then decays to 0
    along a cosine: pretraining's own shape."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, total, warmup_fraction))


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one CPU thread meanwhile: for thousands of small steps, one thread is several times faster
    than a pool that must sync every op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int | None = None,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 512,
    train_chunk_size: int = 65536,
) -> Tensor:
    """Weighted kNN on cosine similarity (DINO's): returns the predicted classes of `test_features`.

    Similarities are computed for `chunk_size` test samples against `train_chunk_size` training samples at
    a time, so memory stays bounded however large the training split is.
    """
    _check(train_features, train_labels, "knn_classify")
    num_classes = num_classes or int(train_labels.max()) + 1
    train = nn.functional.normalize(train_features.float(), dim=1)
    k = min(k, len(train))
    predictions = []
    for chunk in test_features.split(chunk_size):
        query = nn.functional.normalize(chunk.float(), dim=1)
        top_similarity, top_index = _nearest(query, train, k, train_chunk_size)
        votes = torch.zeros(len(chunk), num_classes, device=chunk.device)
        votes.scatter_add_(1, train_labels[top_index], (top_similarity / temperature).exp())
        predictions.append(votes.argmax(1))
    return torch.cat(predictions) if predictions else test_features.new_empty(0, dtype=torch.long)


def _nearest(query: Tensor, train: Tensor, k: int, chunk_size: int) -> tuple[Tensor, Tensor]:
    """The k largest similarities query @ train.T per row and their indices in `train`, one chunk of
    `train` at a time: each chunk's top k merged with the best so far."""
    best = query.new_empty(len(query), 0)
    best_index = torch.empty(len(query), 0, dtype=torch.long, device=query.device)
    for start, part in zip(range(0, len(train), chunk_size), train.split(chunk_size), strict=True):
        similarity, index = (query @ part.T).topk(min(k, len(part)), dim=1)
        candidates = torch.cat([best, similarity], dim=1)
        candidate_index = torch.cat([best_index, index + start], dim=1)
        best, position = candidates.topk(min(k, candidates.shape[1]), dim=1)
        best_index = candidate_index.gather(1, position)
    return best, best_index


def effective_rank(features: Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al., 2023): exp(entropy of the singular values normalised to sum 1)."""
    singular = torch.linalg.svdvals(features.double())
    p = singular / singular.sum() + eps
    return math.exp(-(p * p.log()).sum().item())


def sigreg_statistic(
    embeddings: Tensor, num_slices: int = 1024, knots: int = 17, t_max: float = 3.0, seed: int = 0
) -> float:
    """The SIGReg (sliced Epps-Pulley) statistic of embeddings (N, D) on `num_slices` seeded directions.

    Computed on the embeddings as they are (no centring or scaling): LeJEPA asks for N(0, I) itself.
    Under that null the statistic stays O(1) whatever N; a collapse makes it grow with N.
    """
    # Drawn on the CPU, then moved: the same directions, and so the same number, on every device.
    directions = slice_directions(embeddings.shape[1], num_slices, seed).to(embeddings.device)
    with torch.no_grad():
        return sliced_epps_pulley(embeddings.float(), directions, knots, t_max, distributed=False).item()
