"""LeJEPA in one loop: the paper's minimal reference training, with no DeepSpeed, shards or storage.

It is the demo (`lejepa-pipeline demo`) and the plain-PyTorch baseline that the DeepSpeed training step
is benchmarked against. Data are Fashion-MNIST images held in memory as one uint8 tensor.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
from torch import Tensor

from lejepa.cli import config_from, run_stage, stage_parser
from lejepa.config import PipelineConfig
from lejepa.data.sources import FashionMNIST
from lejepa.objective.loss import LeJEPALoss, lejepa_loss
from lejepa.objective.model import Encoder
from lejepa.objective.sigreg import SIGReg
from lejepa.objective.views import MultiCropViews


class MinimalTrainer:
    """Encoder + projector, multi-crop views, LeJEPA loss and AdamW: one `step(images)` per batch."""

    def __init__(self, cfg: PipelineConfig, resolution: int, channels: int, lr: float = 2e-3):
        self.cfg = cfg
        self.views = MultiCropViews.from_config(cfg.views, resolution=resolution, channels=channels)
        self.encoder = Encoder.from_config(cfg.model, in_chans=channels, img_size=self.views.global_size)
        self.sigreg = SIGReg(num_slices=cfg.loss.num_slices, knots=cfg.loss.knots, t_max=cfg.loss.t_max)
        self.optimizer = torch.optim.AdamW(self.encoder.parameters(), lr=lr, weight_decay=5e-4)

    def step(self, images: Tensor, generator: torch.Generator) -> LeJEPALoss:
        return self.step_on_views(*self.views(images, generator))

    def step_on_views(self, global_views: Tensor, local_views: Tensor) -> LeJEPALoss:
        _, projections = self.encoder.forward_views(global_views, local_views)
        loss = lejepa_loss(projections, global_views.shape[0], self.sigreg, self.cfg.loss.lamb)
        self.optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        self.optimizer.step()
        return loss


def train_minimal(
    images: Tensor, cfg: PipelineConfig, steps: int, batch_size: int, log_every: int = 10
) -> list[float]:
    """Train on uint8 `images` (N, C, H, W) for `steps` batches; returns the total loss of every step."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    trainer = MinimalTrainer(cfg, resolution=images.shape[-1], channels=images.shape[1])
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
        loss = trainer.step(batch, generator)
        losses.append(loss.total.item())
        if step % log_every == 0 or step == 1:
            rate = step * batch_size / (time.perf_counter() - start)
            print(
                f"step {step:4d}  loss {loss.total.item():.4f}  prediction {loss.prediction.item():.4f}  "
                f"sigreg {loss.sigreg.item():.4f}  ({rate:.0f} img/s)",
                flush=True,
            )
    return losses


def load_fashion_mnist_train(limit: int) -> Tensor:
    """The first `limit` Fashion-MNIST training images as uint8 (N, 1, 28, 28), from the Debian package."""
    source = FashionMNIST(path=None, limit=limit)
    items, _ = source.items()
    pixels = [image for _, image in source.read([item for item in items if item.split == "train"])]
    return torch.from_numpy(np.stack(pixels)).unsqueeze(1)


def cli(argv: list[str] | None = None) -> int:
    parser = stage_parser("lejepa-pipeline minimal", __doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=10_000, help="Fashion-MNIST training images to load")
    args = parser.parse_args(argv)
    return run_stage(
        lambda: train_minimal(
            load_fashion_mnist_train(args.samples),
            config_from(args),
            steps=args.steps,
            batch_size=args.batch_size,
        ),
        report=_report_losses,
    )


def _report_losses(losses: list[float]) -> int:
    """One JSON line comparing the first and last steps; exit status 1 when the loss did not go down."""
    window = max(1, min(10, len(losses) // 3))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(json.dumps({"steps": len(losses), "first_loss": round(first, 4), "last_loss": round(last, 4)}))
    return 0 if last < first else 1


if __name__ == "__main__":
    sys.exit(cli())
