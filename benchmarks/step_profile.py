"""Where a training step's time goes, ours (DeepSpeed + loader) against the plain loop: torch's profiler.

`benchmarks/train_step.py` gives the ratio; this says what makes it. For each side it profiles `--steps`
steps after `--warmup` and prints, per step:

- wall: the profiled window's length (first operator to the last kernel's end) over its steps;
- device busy: the union of the kernels' intervals (on a GPU; the rest of the wall the device was idle);
- kernels: how many were launched;
- host waits: synchronizes, blocking copies and `.item()`-style reads, by name;

then the operators that took the most device time and the most host time. Same data, model and views as
`train_step.py`; `--out FILE` also writes the report there.

    python benchmarks/step_profile.py [--config infra/gpu.yaml] [--steps N] [--warmup N] [--set key=value]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule
from train_step import plain_loop, sharded_run

import lejepa.train.rank
from lejepa.config import PipelineConfig
from lejepa.data.manifest import ShardManifest
from lejepa.testing import around_each_step
from lejepa.train.engine import trains_in_bf16

HOST_WAITS = ("Synchronize", "cudaMemcpy")
"""CUDA runtime calls where the host waits for the device: `.item()` and the like show up as a stream
synchronize, and a `cudaMemcpy` without `Async` blocks."""


def _profiler(warmup: int, steps: int) -> profile:
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    return profile(
        activities=activities, schedule=schedule(wait=max(0, warmup - 1), warmup=1, active=steps, repeat=1)
    )


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def _is_kernel(event: Any) -> bool:
    """A device event that is work: not a range the profiler marks on the device's timeline (its
    `ProfilerStep#N`, spanning a whole step), which would make the device look busy all step."""
    annotation = getattr(event, "is_user_annotation", False) or event.name.startswith("ProfilerStep")
    return event.device_type == DeviceType.CUDA and not annotation


def report(name: str, prof: profile, steps: int) -> str:
    events = prof.events()
    kernels = [(e.time_range.start, e.time_range.end) for e in events if _is_kernel(e)]
    host = [e for e in events if e.device_type == DeviceType.CPU]
    first = min(e.time_range.start for e in host)
    last = max([e.time_range.end for e in host] + [end for _, end in kernels])
    wall_ms = (last - first) / 1e3 / steps
    waits = collections.Counter(e.name for e in host if any(w in e.name for w in HOST_WAITS))
    waits = collections.Counter({k: v for k, v in waits.items() if "Async" not in k})
    lines = [f"== {name}: {steps} profiled steps", f"wall per step: {wall_ms:.2f} ms"]
    if kernels:
        busy_ms = _union_us(kernels) / 1e3 / steps
        lines.append(f"device busy per step: {busy_ms:.2f} ms ({100 * busy_ms / wall_ms:.1f}% of the wall)")
        lines.append(f"kernels per step: {len(kernels) / steps:.0f}")
    lines.append(
        "host waits per step: "
        + (", ".join(f"{k} {v / steps:.1f}" for k, v in waits.most_common()) or "none")
    )
    table = prof.key_averages()
    if kernels:
        lines += ["", "by device time:", table.table(sort_by="self_device_time_total", row_limit=30)]
    lines += ["", "by host time:", table.table(sort_by="self_cpu_time_total", row_limit=15)]
    return "\n".join(lines)


def profile_ours(cfg: PipelineConfig, warmup: int, steps: int) -> profile:
    prof = _profiler(warmup, steps)

    def stepped(_: Any, step: Callable[[], Any]) -> Any:  # advance the profiler's schedule after each step
        out = step()
        prof.step()
        return out

    with prof, around_each_step(stepped), contextlib.redirect_stdout(io.StringIO()):
        lejepa.train.rank.train(cfg)
    return prof


def profile_plain(
    cfg: PipelineConfig, manifest: ShardManifest, device: torch.device, bf16: bool, warmup: int, steps: int
) -> profile:
    prof = _profiler(warmup, steps)
    with prof:
        # The same warmup + steps + 1 steps as ours. The loop synchronizes the device at the end of its
        # own warm-up, to start its clock: one step before the profiled ones, so that wait is not counted.
        plain_loop(cfg, manifest, device, bf16, warmup - 1, steps + 2, after_step=prof.step)
    return prof


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config, e.g. infra/gpu.yaml (default: the embedded defaults)")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps for each side")
    parser.add_argument("--warmup", type=int, default=10, help="steps run before profiling")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    total = args.warmup + args.steps + 1  # one step more: the profiler's window closes on the step after

    with tempfile.TemporaryDirectory() as root:
        cfg, manifest = sharded_run(args.config, root, "step-profile", total, args.set)
        bf16 = trains_in_bf16(cfg, use_cuda=device.type == "cuda")
        sides: list[tuple[str, Callable[[], profile]]] = [
            ("ours (DeepSpeed + loader)", lambda: profile_ours(cfg, args.warmup, args.steps)),
            (
                "plain PyTorch loop",
                lambda: profile_plain(cfg, manifest, device, bf16, args.warmup, args.steps),
            ),
        ]
        text = "\n\n".join(report(name, run(), args.steps) for name, run in sides)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
