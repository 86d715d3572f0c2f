"""Which arithmetic a network runs in: the one owner of what `precision: auto` and `native` mean.

- `auto`: bf16 on CUDA, fp32 on the CPU. Safe for any model: a stock ResNet's steps came out non-finite
  under CPU bf16, and DeepSpeed then skips them.
- `native`: bf16 wherever the hardware computes it natively (CUDA, CPUs with AVX512-BF16 or AMX), else
  fp32. On such a CPU the tuned profile's step ran ~1.6x faster than fp32 and its feature extraction 2.6x;
  on a 2-core Xeon without either, a step took 5.1-5.4 s under bf16 autocast against 3.1-3.4 s in fp32.
  `infra/cpu.yaml` and the demo use it.
- `fp32`, `bf16`: as named.
"""

from __future__ import annotations

import functools
from pathlib import Path

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (Linux: its flags in /proc/cpuinfo; elsewhere: no)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def resolve_precision(requested: str, device_type: str) -> str:
    """fp32 or bf16 for `requested` (auto | native | fp32 | bf16) on a `device_type` (cpu, cuda, ...)."""
    if requested == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if requested == "native":
        native = device_type == "cuda" or (device_type == "cpu" and cpu_has_native_bf16())
        return "bf16" if native else "fp32"
    return requested


def describe(requested: str, device_type: str) -> str:
    """One phrase for logs: what was chosen and why."""
    chosen = resolve_precision(requested, device_type)
    if requested == "native" and device_type == "cpu":
        has = "has" if cpu_has_native_bf16() else "lacks"
        return f"{chosen} (native: this CPU {has} AVX512-BF16 or AMX)"
    if requested in ("auto", "native"):
        return f"{chosen} ({requested} on {device_type})"
    return chosen
