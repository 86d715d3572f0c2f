"""Benchmark SIGReg forward+backward: the straightforward formulation against lejepa.sigreg's.

    python benchmarks/sigreg.py [--reps 7] [--threads T]

Both variants compute the same statistic on the same seeded input: z (N, D) with requires_grad,
K fixed unit-norm directions, 17 knots; one pass is `fn(z, directions).backward()`. The
straightforward one is `reference_sliced_epps_pulley` (cos and sin of the N x K x knots tensor,
differentiated by autograd); ours is `sliced_epps_pulley`.

Every measurement runs in a fresh subprocess, so one variant's allocations, caches or thread
pools never flatter or penalise the other:
- time: median wall time of --reps passes after 2 warm-up passes;
- peak extra memory: the process's peak resident memory during one pass minus its resident
  memory just before it (inputs allocated, one warm-up pass done, gradients dropped). The peak is
  Linux's VmHWM, reset just before the pass by writing 5 to /proc/self/clear_refs. torch's CPU
  allocator is plain malloc, and glibc would keep freed blocks and reuse them without touching
  the RSS, so the child runs with MALLOC_MMAP_THRESHOLD_=65536: every block of 64 KiB or more is
  its own mapping, returned to the OS on free, and the resident memory follows the live tensors
  (the projection x = z @ directions and its gradient included, for both variants). That setting
  slows allocation, so time is measured in a separate child without it.
The machine is shared: the 1-minute load average is printed with the table. With other processes
busy on both cores, torch's 2 intra-op threads wait on each other at every op and times scatter
widely (worst for code made of many small ops); --threads 1 is steadier on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from lejepa.sigreg import reference_sliced_epps_pulley, sliced_epps_pulley

VARIANTS: dict[str, Callable[..., torch.Tensor]] = {
    "straightforward": reference_sliced_epps_pulley,
    "lejepa.sigreg": sliced_epps_pulley,
}
SIZES = [(512, 128, 1024), (4096, 256, 1024)]  # (N, D, K)
WARMUP = 2


def make_inputs(n: int, dim: int, slices: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(n, dim, generator=generator).requires_grad_()
    directions = torch.randn(dim, slices, generator=generator)
    return z, directions / directions.norm(dim=0)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1])


def measure(metric: str, variant: str, n: int, dim: int, slices: int, reps: int) -> float:
    """Seconds per pass (median) or peak extra MiB of one pass; runs inside the child process."""
    fn = VARIANTS[variant]
    z, directions = make_inputs(n, dim, slices)

    def one_pass() -> None:
        fn(z, directions).backward()
        z.grad = None

    for _ in range(WARMUP):
        one_pass()
    if metric == "time":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            one_pass()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak (VmHWM) to the current RSS
    one_pass()
    return (_status_kib("VmHWM") - before) / 1024


def run_child(metric: str, variant: str, size: tuple[int, int, int], reps: int, threads: int) -> float:
    env = dict(os.environ)
    if metric == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    command = [sys.executable, __file__, "--child", metric, variant, *map(str, size)]
    command += ["--reps", str(reps), "--threads", str(threads)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def relative_errors(size: tuple[int, int, int]) -> tuple[float, float]:
    """Ours against the straightforward one: |value - ref| / |ref| and ||grad - ref|| / ||ref||."""
    results = []
    for fn in VARIANTS.values():
        z, directions = make_inputs(*size)
        value = fn(z, directions)
        value.backward()
        results.append((value.detach(), z.grad))
    (ref, ref_grad), (ours, grad) = results
    return (abs(ours - ref) / abs(ref)).item(), ((grad - ref_grad).norm() / ref_grad.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="timed passes per variant and size")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument(
        "--child", nargs=5, metavar=("METRIC", "VARIANT", "N", "D", "K"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        metric, variant, *size = args.child
        print(json.dumps(measure(metric, variant, *map(int, size), reps=args.reps)))
        return

    print(
        f"SIGReg forward+backward, 17 knots, {torch.get_num_threads()} threads, "
        f"median of {args.reps} after {WARMUP} warm-up; load average {os.getloadavg()[0]:.1f}"
    )
    header = (
        f"{'N':>5} {'D':>4} {'K':>5} | {'straightforward':>18} | {'lejepa.sigreg':>18} | "
        f"{'speed-up':>8} {'memory':>7} | {'value err':>9} {'grad err':>9}"
    )
    print(header)
    units = f"{'ms':>8} {'MiB':>9}"
    print(f"{'':>17}| {units} | {units} | {'x':>8} {'ratio':>7} | {'rel':>9} {'rel':>9}")
    for size in SIZES:
        ms = {v: 1000 * run_child("time", v, size, args.reps, args.threads) for v in VARIANTS}
        mib = {v: run_child("memory", v, size, args.reps, args.threads) for v in VARIANTS}
        value_err, grad_err = relative_errors(size)
        (ref_ms, our_ms), (ref_mib, our_mib) = ms.values(), mib.values()
        print(
            f"{size[0]:>5} {size[1]:>4} {size[2]:>5} | {ref_ms:>8.1f} {ref_mib:>9.1f} | {our_ms:>8.1f} "
            f"{our_mib:>9.1f} | {ref_ms / our_ms:>8.1f} {our_mib / ref_mib:>7.3f} | "
            f"{value_err:>9.1e} {grad_err:>9.1e}"
        )


if __name__ == "__main__":
    main()
