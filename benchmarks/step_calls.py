"""Operator calls a training step makes, by where they come from: the host's share of a step, on any machine.

Each call into torch's dispatcher costs the host a few microseconds, and on a GPU it is usually a kernel
launch too. Where a step holds little work for the device (a small batch, small views), those calls bound
its pace, and `benchmarks/step_profile.py` needs a GPU to show it. This count needs none: it trains one
rank in this process and counts the operator calls of the steps after the first three (which build
optimizer and DeepSpeed state), per step, grouped by the innermost file of ours, of DeepSpeed or of
torch.optim that made them. The backward pass counts as DeepSpeed's `engine` (it runs inside
`engine.backward`). The baseline is the plain PyTorch loop of `benchmarks/train_step.py` on the same
model, views and batch (views made before counting), with torch's AdamW in its multi-tensor form, the
one it takes on a GPU (on the CPU it would step one parameter at a time).

The default run is a ViT-Tiny with 4 px patches on 16/8 px views of the digits dataset, batch 16, bf16
under ZeRO-2: a step small enough to count in seconds.

    python benchmarks/step_calls.py [--steps N] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from train_step import plain_trainer, sharded_run

import lejepa.train.rank
from lejepa.config import PipelineConfig
from lejepa.data.manifest import ShardManifest
from lejepa.testing import around_each_step
from lejepa.train.engine import trains_in_bf16

UNCOUNTED_STEPS = 3
TINY = [
    "data.source=digits",
    "model.backbone=vit_tiny_patch16_224",
    "model.backbone_kwargs={patch_size: 4}",
    "views.global_size=16",
    "views.local_size=8",
    "views.on_device=true",
    "loss.num_slices=64",
    "pretrain.precision=bf16",
    "pretrain.zero_stage=2",
    "pretrain.batch_size=16",
    "pretrain.log_every=100",
    "pretrain.num_workers=0",
]


def origin(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frame of ours (lejepa), of DeepSpeed or of torch.optim, as `package:module`."""
    for frame in reversed(stack):
        path = frame.filename
        for package in ("/deepspeed/", "/lejepa/"):
            if package in path and not path.endswith("/lejepa/testing.py"):
                return package.strip("/") + ":" + path.split(package, 1)[1].removesuffix(".py")
        if "/torch/optim/" in path:
            return "torch.optim"
    return "other"


class CallCount(TorchDispatchMode):
    """Counts every operator call made while it is entered, by `origin`."""

    def __init__(self) -> None:
        super().__init__()
        self.by_origin: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.by_origin[origin(traceback.extract_stack())] += 1
        return func(*args, **(kwargs or {}))


def ours(cfg: PipelineConfig) -> CallCount:
    """The calls of a real run's steps (`lejepa.train.rank.train` in this process), after the first three."""
    calls, seen = CallCount(), [0]

    def counted(_: Any, step: Callable[[], Any]) -> Any:
        seen[0] += 1
        if seen[0] <= UNCOUNTED_STEPS:
            return step()
        with calls:
            return step()

    with around_each_step(counted), contextlib.redirect_stdout(io.StringIO()):
        lejepa.train.rank.train(cfg)
    return calls


def plain(cfg: PipelineConfig, manifest: ShardManifest, steps: int) -> CallCount:
    """The calls of the plain loop's steps on precomputed views, after the first three."""
    trainer, views = plain_trainer(cfg, manifest, torch.device("cpu"))
    for group in trainer.optimizer.param_groups:
        group["foreach"] = True  # AdamW's multi-tensor form, the one it takes on a GPU
    calls = CallCount()
    for step in range(UNCOUNTED_STEPS + steps):
        with contextlib.ExitStack() as stack:
            if step >= UNCOUNTED_STEPS:
                stack.enter_context(calls)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=trains_in_bf16(cfg, use_cuda=False)):
                trainer.step_on_views(*views[step % len(views)])
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="counted steps (after three uncounted ones)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        total = UNCOUNTED_STEPS + args.steps
        cfg, manifest = sharded_run(None, root, "step-calls", total, [*TINY, *args.set])
        our_calls = ours(cfg)
    plain_calls = plain(cfg, manifest, args.steps)
    per_step = {name: count / args.steps for name, count in our_calls.by_origin.most_common()}
    ours_total, plain_total = sum(per_step.values()), sum(plain_calls.by_origin.values()) / args.steps
    print(f"operator calls per training step: ours {ours_total:.0f}, plain loop {plain_total:.0f}")
    print(f"ratio ours / plain: {ours_total / plain_total:.2f}")
    print("ours, by origin:")
    for name, count in per_step.items():
        print(f"  {name:45s} {count:8.0f}")


if __name__ == "__main__":
    main()
