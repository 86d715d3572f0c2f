"""Test program: train one rank in this process and report what its training steps read back to the host.

On a GPU, every read of a tensor's value by the host (`.item()`, `bool(t)`, `.tolist()`, ...), every
tensor built from host values onto the device (`torch.tensor(x, device=...)`: a copy from pageable
memory) and every device synchronize stops the host until the device has drained. This machine's CPU
cannot show the stall, but it can count the causes: the steps after the first few run under a torch
function mode that records each read and copy with where it came from, and DeepSpeed's accelerator
`synchronize` is counted. On a GPU those steps also run under torch's sync debug mode, so anything else
that waits for the device raises. The steps' all-reduces are counted too. Prints one JSON line:
{"reads": [[name, where, count], ...], "synchronizes": N, "all_reduces": N, "steps": N,
"autocast": bool, "parameters": dtype}, the last two saying how the model ran.

    python tests/programs/step_host_reads.py --set key=value ...
"""

from __future__ import annotations

import argparse
import collections
import json
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

import lejepa.train.rank
from lejepa.config import load_config
from lejepa.data.shard import write_shards
from lejepa.testing import around_each_step

HOST_READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "nonzero"}
HOST_COPIES = {"tensor", "as_tensor"}
"""Tensors built from host values onto a device: on a GPU a copy from pageable memory, which waits for it."""
UNWATCHED_STEPS = 3
"""The first steps build state (optimizer moments, DeepSpeed buffers) and are not counted."""


class HostReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in HOST_READS or (name in HOST_COPIES and (kwargs or {}).get("device") is not None):
            frames = traceback.extract_stack(limit=4)[:-1]
            where = " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in reversed(frames))
            self.seen[(name, where)] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(None, args.set)
    write_shards(cfg, progress=False)

    import deepspeed.accelerator

    accelerator = deepspeed.accelerator.get_accelerator()
    synchronizes, watching = [0], [False]
    synchronize = accelerator.synchronize

    def counted(*a: Any, **k: Any) -> Any:
        synchronizes[0] += watching[0]
        return synchronize(*a, **k)

    accelerator.synchronize = counted
    collectives, all_reduce = [0], torch.distributed.all_reduce

    def counted_all_reduce(*a: Any, **k: Any) -> Any:
        collectives[0] += watching[0]
        return all_reduce(*a, **k)

    torch.distributed.all_reduce = counted_all_reduce
    reads, steps, model = HostReads(), [0], []

    def watched(train_step: Any, step: Callable[[], Any]) -> Any:
        steps[0] += 1
        model[:] = [train_step.engine.module]
        if steps[0] <= UNWATCHED_STEPS:
            return step()
        watching[0] = True
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("error")
        try:
            with reads:
                return step()
        finally:
            watching[0] = False
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("default")

    with around_each_step(watched):
        lejepa.train.rank.train(cfg)
    report = {
        "reads": [[name, where, count] for (name, where), count in reads.seen.most_common()],
        "synchronizes": synchronizes[0],
        "all_reduces": collectives[0],
        "steps": steps[0] - UNWATCHED_STEPS,
        "autocast": model[0].autocast,
        "parameters": str(next(model[0].parameters()).dtype),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
