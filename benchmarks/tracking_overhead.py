"""Per-step cost of experiment tracking: the same small CPU run with MLflow on and off, in one process.

Both sides train the same tiny encoder on the digits (one rank, `lejepa.train.rank.train` in this process) for
the same steps; the step time is the median over the timed steps of each run's metrics log (the first
`--warmup` steps aside: they include the tracker's imports on its thread). After one untimed run (the
first one in a process pays for one-off set-up), the runs alternate off, on, off, on, ... (`--repeats`
pairs) so a machine that speeds up or slows down meanwhile biases neither side. MLflow is a real tracking
server on this machine (started before the clock), sent a point every `pretrain.log_every` steps (the
default, 10; `--set pretrain.log_every=1` is the worst case: a request every step).

On a shared machine the step time moves by more than 1% from run to run, so the cost is also counted
directly: the seconds the training thread spends in the tracker's hook, plus the CPU seconds the MLflow
thread spends sending the points (its one-off start aside), per step, as a fraction of a step.

Target: on / off < 1.01, and a direct cost under 1% of a step.

    python benchmarks/tracking_overhead.py [--steps N] [--warmup N] [--repeats N] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lejepa.config import load_config
from lejepa.data.shard import write_shards
from lejepa.store.storage import Storage
from lejepa.testing import mlflow_server
from lejepa.tracking import MLflowBackend, Tracker
from lejepa.train.rank import train
from lejepa.train.training_log import read_training_log

SMALL = [
    "data.source=digits",
    "model.backbone=resnet10t",
    "model.proj_hidden_dim=256",
    "model.proj_dim=64",
    "views.local_views=2",
    "loss.num_slices=128",
    "pretrain.batch_size=64",
    "pretrain.num_workers=1",
]


def step_seconds(root: str, run_name: str, steps: int, warmup: int, sets: list[str]) -> float:
    """The median seconds of a step of a fresh run, over its steps after `warmup`."""
    cfg = load_config(
        None,
        [
            f"storage.root={root}",
            *SMALL,
            f"pretrain.run_name={run_name}",
            f"pretrain.max_steps={warmup + steps}",
            f"pretrain.checkpoint_every={10**6}",
            *sets,
        ],
    )
    summary = train(cfg)
    log = read_training_log(Storage.from_config(cfg.storage), summary.run_dir)[warmup:]
    return statistics.median(cfg.pretrain.batch_size / r["images_per_s"] for r in log)


@contextlib.contextmanager
def tracker_seconds() -> Iterator[dict[str, float]]:
    """{"hook": wall seconds of the training thread in Tracker.log_metrics and Tracker.sync, "sender": CPU
    seconds of the MLflow thread in MLflowBackend.log_metrics}, counted while the block runs."""
    spent = {"hook": 0.0, "sender": 0.0}
    watched = [
        (Tracker, "log_metrics", "hook", time.perf_counter),
        (Tracker, "sync", "hook", time.perf_counter),
        (MLflowBackend, "log_metrics", "sender", time.thread_time),  # the CPU time of the sending thread
    ]
    saved = [(cls, name, getattr(cls, name)) for cls, name, _, _ in watched]

    def counted(method: Callable[..., Any], kind: str, clock: Callable[[], float]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            tick = clock()
            try:
                return method(*args, **kwargs)
            finally:
                spent[kind] += clock() - tick

        return call

    for (cls, name, kind, clock), (_, _, method) in zip(watched, saved, strict=True):
        setattr(cls, name, counted(method, kind, clock))
    try:
        yield spent
    finally:
        for cls, name, method in saved:
            setattr(cls, name, method)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs (off, on)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, mlflow_server(Path(tmp)) as uri:
        root = f"{tmp}/store"
        write_shards(load_config(None, [f"storage.root={root}", "data.source=digits"]), progress=False)
        step_seconds(root, "warm-up", 5, 0, args.set)
        off, on, costs = [], [], []
        for i in range(args.repeats):
            off.append(step_seconds(root, f"off-{i}", args.steps, args.warmup, args.set))
            tracked = [*args.set, f"tracking.mlflow_uri={uri}"]
            with tracker_seconds() as spent:
                on.append(step_seconds(root, f"on-{i}", args.steps, args.warmup, tracked))
            costs.append((spent["hook"] + spent["sender"]) / (args.warmup + args.steps))
        print(f"tracking off: {[round(s * 1000, 1) for s in off]} ms a step (median of each run)")
        print(f"MLflow on:    {[round(s * 1000, 1) for s in on]} ms a step (median of each run)")
        ratio = statistics.median(on) / statistics.median(off)
        print(f"on / off = {ratio:.4f} (target < 1.01)")
        cost = statistics.median(costs)
        share = cost / statistics.median(off)
        print(f"direct cost: {cost * 1000:.3f} ms a step = {100 * share:.3f}% of a step (target < 1%)")


if __name__ == "__main__":
    main()
