"""The online probe: a linear classifier trained beside the encoder, so a run's log shows what it learns."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


class OnlineProbe:
    """A linear classifier on detached global-view embeddings, trained beside the encoder.

    It has its own optimizer outside DeepSpeed, so it can neither change the encoder's gradients nor
    enter the gradient-norm clipping; its gradients are averaged over ranks to keep replicas equal.
    """

    def __init__(
        self, embed_dim: int, num_classes: int, device: torch.device, seed: int, lr: float = 1e-3
    ) -> None:
        with torch.random.fork_rng(devices=[]):  # the same head on every rank, whatever its RNG
            torch.manual_seed(seed)
            self.head = nn.Linear(embed_dim, num_classes).to(device)
        # Fused: its step count stays on the device, so a step reads nothing back to the host.
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=1e-6, fused=True)

    def step(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """One update; returns [loss, accuracy] on the device, so the training step never waits for it.

        Unlabelled samples (label -1, e.g. a partly labelled webdataset) are left out; a batch without
        labels updates nothing and reports 0.
        """
        features = embeddings.detach().float().flatten(0, 1)
        targets = labels.repeat(embeddings.shape[0])
        logits = self.head(features)
        labelled = targets >= 0
        count = labelled.sum().clamp(min=1)
        loss = nn.functional.cross_entropy(logits, targets, ignore_index=-1, reduction="sum") / count
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dist.is_initialized() and dist.get_world_size() > 1:
            for p in self.head.parameters():
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        self.optimizer.step()
        correct = ((logits.argmax(1) == targets) & labelled).sum()
        return torch.stack([loss.detach(), correct / count])

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
