"""Benchmark SIGReg forward+backward: the straightforward formulation against lejepa.objective.sigreg's.

    python benchmarks/sigreg.py [--device cuda|cpu] [--reps R] [--threads T]

Both variants compute the same statistic on the same seeded input: z (N, D), or (V, N, D) for V
views, with requires_grad, K fixed unit-norm directions, 17 knots; one pass is
`fn(z, directions).backward()`. The straightforward one is `reference_sliced_epps_pulley` (cos and
sin of the V x N x K x knots tensor, differentiated by autograd); ours is `sliced_epps_pulley`.
--device defaults to cuda when a GPU is visible, else cpu.

CPU: every measurement runs in a fresh subprocess, so one variant's allocations, caches or thread
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

CUDA: one process; the caching allocator counts exactly what each pass allocates.
- time: median over --reps passes (after 3 warm-up passes, which also compile the Triton kernels)
  of the GPU time between two CUDA events around the pass; launch gaps count, as in training;
- peak extra memory: torch.cuda.max_memory_allocated during one pass, reset just before it, minus
  torch.cuda.memory_allocated before it.

A table is printed, then one summary line per shape, key=value pairs, for scripts:
    summary device=cuda path=triton views=8 n=512 d=128 slices=1024 straightforward_ms=4.000 ...
path names the implementation of the ECF sums that ran (lejepa.objective.sigreg.ecf_path): recurrence (the
CPU path), triton, or torch (the pure-torch GPU path, used when Triton is missing or failed).
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

from lejepa.objective.sigreg import ecf_path, reference_sliced_epps_pulley, sliced_epps_pulley

VARIANTS: dict[str, Callable[..., torch.Tensor]] = {
    "straightforward": reference_sliced_epps_pulley,
    "lejepa.objective.sigreg": sliced_epps_pulley,
}
Size = tuple[int, int, int, int]  # (V, N, D, K)
SIZES: dict[str, list[Size]] = {
    "cpu": [(1, 512, 128, 1024), (1, 4096, 256, 1024)],
    "cuda": [(1, 512, 128, 1024), (1, 4096, 256, 1024), (8, 512, 128, 1024), (8, 2048, 128, 1024)],
}
WARMUP = {"cpu": 2, "cuda": 3}
DEFAULT_REPS = {"cpu": 7, "cuda": 25}


def make_inputs(size: Size, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    views, n, dim, slices = size
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(*([views] if views > 1 else []), n, dim, generator=generator)
    directions = torch.randn(dim, slices, generator=generator)
    directions = directions / directions.norm(dim=0)
    return z.to(device).requires_grad_(), directions.to(device)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1])


def _one_pass(fn: Callable[..., torch.Tensor], z: torch.Tensor, directions: torch.Tensor) -> None:
    fn(z, directions).backward()
    z.grad = None


def measure_cpu(metric: str, variant: str, size: Size, reps: int) -> float:
    """Seconds per pass (median) or peak extra MiB of one pass; runs inside the child process."""
    fn, (z, directions) = VARIANTS[variant], make_inputs(size)
    for _ in range(WARMUP["cpu"]):
        _one_pass(fn, z, directions)
    if metric == "time":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            _one_pass(fn, z, directions)
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak (VmHWM) to the current RSS
    _one_pass(fn, z, directions)
    return (_status_kib("VmHWM") - before) / 1024


def run_child(metric: str, variant: str, size: Size, reps: int, threads: int) -> float:
    env = dict(os.environ)
    if metric == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    command = [sys.executable, __file__, "--child", metric, variant, *map(str, size)]
    command += ["--reps", str(reps), "--threads", str(threads)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def measure_cuda(variant: str, size: Size, reps: int) -> tuple[float, float]:
    """(median ms per pass, peak extra MiB of one pass) on the current CUDA device."""
    fn, (z, directions) = VARIANTS[variant], make_inputs(size, "cuda")
    for _ in range(WARMUP["cuda"]):
        _one_pass(fn, z, directions)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _one_pass(fn, z, directions)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _one_pass(fn, z, directions)
    torch.cuda.synchronize()
    return statistics.median(times), (torch.cuda.max_memory_allocated() - before) / 2**20


def relative_errors(size: Size, device: str) -> tuple[float, float]:
    """Ours against the straightforward one: |value - ref| / |ref| and ||grad - ref|| / ||ref||."""
    results = []
    for fn in VARIANTS.values():
        z, directions = make_inputs(size, device)
        value = fn(z, directions)
        value.backward()
        results.append((value.detach(), z.grad))
    (ref, ref_grad), (ours, grad) = results
    return (abs(ours - ref) / abs(ref)).item(), ((grad - ref_grad).norm() / ref_grad.norm()).item()


def measure(device: str, size: Size, reps: int, threads: int) -> dict[str, float]:
    """Both variants' ms and MiB, and ours relative to the straightforward one."""
    if device == "cuda":
        (ref_ms, ref_mib), (our_ms, our_mib) = (measure_cuda(v, size, reps) for v in VARIANTS)
    else:
        ref_ms, our_ms = (1000 * run_child("time", v, size, reps, threads) for v in VARIANTS)
        ref_mib, our_mib = (run_child("memory", v, size, reps, threads) for v in VARIANTS)
    value_err, grad_err = relative_errors(size, device)
    return {
        "straightforward_ms": ref_ms,
        "ours_ms": our_ms,
        "speedup": ref_ms / our_ms,
        "straightforward_mib": ref_mib,
        "ours_mib": our_mib,
        "memory_ratio": our_mib / ref_mib,
        "value_rel_err": value_err,
        "grad_rel_err": grad_err,
    }


def print_header(device: str, reps: int) -> None:
    if device == "cuda":
        where = f"{torch.cuda.get_device_name()}, CUDA events"
    else:
        where = f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    print(f"SIGReg forward+backward, 17 knots, {where}, median of {reps} after {WARMUP[device]} warm-up")
    print(
        f"{'V':>2} {'N':>5} {'D':>4} {'K':>5} | {'straightforward':>18} | {'lejepa.objective.sigreg':>18} | "
        f"{'speed-up':>8} {'memory':>7} | {'value err':>9} {'grad err':>9}"
    )
    units = f"{'ms':>8} {'MiB':>9}"
    print(f"{'':>20}| {units} | {units} | {'x':>8} {'ratio':>7} | {'rel':>9} {'rel':>9}")


def table_row(size: Size, r: dict[str, float]) -> str:
    return (
        f"{size[0]:>2} {size[1]:>5} {size[2]:>4} {size[3]:>5} | {r['straightforward_ms']:>8.2f} "
        f"{r['straightforward_mib']:>9.1f} | {r['ours_ms']:>8.2f} {r['ours_mib']:>9.1f} | "
        f"{r['speedup']:>8.1f} {r['memory_ratio']:>7.3f} | "
        f"{r['value_rel_err']:>9.1e} {r['grad_rel_err']:>9.1e}"
    )


def summary_line(device: str, path: str, size: Size, r: dict[str, float]) -> str:
    shape = dict(zip(("views", "n", "d", "slices"), size, strict=True))
    fields = {"device": device, "path": path, **shape}
    fields.update({key: f"{value:.4g}" for key, value in r.items()})
    return "summary " + " ".join(f"{key}={value}" for key, value in fields.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--reps", type=int, help="timed passes per variant and size (default: cpu 7, cuda 25)"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument(
        "--child", nargs=6, metavar=("METRIC", "VARIANT", "V", "N", "D", "K"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reps = args.reps or DEFAULT_REPS[args.device]
    if args.child:
        metric, variant, *size = args.child
        print(json.dumps(measure_cpu(metric, variant, tuple(map(int, size)), reps)))
        return

    print_header(args.device, reps)
    summaries = []
    for size in SIZES[args.device]:
        result = measure(args.device, size, reps, args.threads)
        # Asked after the passes: a Triton kernel that failed in them has turned itself off.
        path = ecf_path(torch.device(args.device), torch.float32)
        print(table_row(size, result), flush=True)
        summaries.append(summary_line(args.device, path, size, result))
    print("\n".join(summaries))


if __name__ == "__main__":
    main()
