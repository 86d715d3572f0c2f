"""What orchestration costs the training ranks: the demo's step time under the flow against the stage alone.

    .venv/bin/python benchmarks/flow_overhead.py [--steps 60] [--repeats 2]

Both sides train the demo's model and views (`infra/cpu.yaml` with the demo's settings) for the same fixed
number of steps on the same Fashion-MNIST shards, alternating, each in a fresh run:
- flow: `lejepa-pipeline demo`, the whole Prefect flow (the flow engine, its temporary API server and the
  rank logs streamed into the task's log) around the pretrain stage (its evaluation, after the measured
  steps, cut short);
- alone: `lejepa-pipeline pretrain`, the stage's own command, no Prefect involved.
A run's step time is the median of its per-step seconds in `metrics.jsonl` (its first 5 steps left out).
Target: alone / flow >= 0.95, i.e. the flow slows the ranks by at most 5%. Prints a line per run (with the
CPU seconds that the command's own process used, its children aside), the ratio, then a JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from flows.run import DEMO_PROFILE, DEMO_SETTINGS
from lejepa.config import load_config
from lejepa.store import layout
from lejepa.store.storage import Storage
from lejepa.train.training_log import read_training_log

PIPELINE = str(Path(sys.executable).parent / "lejepa-pipeline")
WARMUP_STEPS = 5


def _run(command: list[str]) -> tuple[float, float]:
    """Run `command` to its end; returns its wall seconds and the CPU seconds of its own process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cpu = [0.0]

    def sample() -> None:  # the process's own CPU time, read while it lives
        watched = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                times = watched.cpu_times()
            except psutil.NoSuchProcess:
                return
            cpu[0] = times.user + times.system
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    sampler.join()
    if process.returncode != 0:
        sys.exit(f"error: {' '.join(command[:2])} failed (status {process.returncode}):\n{output[-3000:]}")
    return time.perf_counter() - started, cpu[0]


def _step_seconds(root: str, run_name: str, batch_size: int) -> float:
    storage = Storage(root)
    log = read_training_log(storage, layout.run_url(storage, run_name))
    return statistics.median(batch_size / r["images_per_s"] for r in log[WARMUP_STEPS:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--root", help="store folder (default: a temporary one)")
    args = parser.parse_args(argv)
    root = args.root or tempfile.mkdtemp(prefix="flow-overhead-")
    demo = [a for setting in DEMO_SETTINGS for a in ("--set", setting)]
    batch_size = load_config(DEMO_PROFILE, DEMO_SETTINGS).pretrain.batch_size
    _run([PIPELINE, "shard", "--config", str(DEMO_PROFILE), *demo, "--set", f"storage.root={root}"])

    rows = []
    for repeat in range(args.repeats):
        for side in ("flow", "alone"):
            name = f"{side}-{repeat}"
            run = [f"storage.root={root}", f"pretrain.run_name={name}", "pretrain.time_budget_s=null"]
            run += [f"pretrain.max_steps={args.steps}"]
            stage = ["demo"] if side == "flow" else ["pretrain", "--config", str(DEMO_PROFILE), *demo]
            if side == "flow":  # evaluation comes after the measured steps: keep it short
                run += ["evaluate.baselines=false", "evaluate.probe_epochs=1"]
            wall, cpu = _run([PIPELINE, *stage, *(a for setting in run for a in ("--set", setting))])
            rows.append(
                {"side": side, "step_s": _step_seconds(root, name, batch_size), "wall_s": wall, "cpu_s": cpu}
            )
            print(
                f"{side:5s} run {repeat}: {rows[-1]['step_s']:.3f} s a step; {wall:.0f} s in all, of "
                f"which the command's own process used {cpu:.1f} CPU seconds",
                flush=True,
            )
    flow = statistics.median(r["step_s"] for r in rows if r["side"] == "flow")
    alone = statistics.median(r["step_s"] for r in rows if r["side"] == "alone")
    print(f"step time: under the flow {flow:.3f} s, alone {alone:.3f} s; alone / flow = {alone / flow:.3f}x")
    print(json.dumps({"flow_step_s": flow, "alone_step_s": alone, "ratio": alone / flow, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
