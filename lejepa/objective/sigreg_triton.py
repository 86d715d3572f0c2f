"""Triton kernels for SIGReg's ECF sums on CUDA (float32), used by `lejepa.objective.sigreg`.

x is (N, M): one column of N samples per (view, slice); the knots are t_j = j * dt.
- `ecf_sums`: cos_sums[m, j] = sum_i cos(t_j x[i, m]), sin_sums likewise. One program per (knot,
  block of columns, segment of rows) walks down its rows in tiles, keeping running sums in
  registers; there is one segment unless N is large, and then the segments' sums are added up.
  Programs of the same columns are launched next to each other, so x comes from HBM about once
  and from L2 for the other knots.
- `ecf_grad`: grad_x[i, m] = sum_j t_j (g_s[m, j] cos(t_j x[i, m]) - g_c[m, j] sin(t_j x[i, m])),
  the gradient through upstream gradients g_c, g_s of the sums. One program per tile of x reads
  it once, loops over the knots and writes its tile of grad_x once.
cos and sin are evaluated directly at every knot (no recurrence), and nothing of size
N x M x knots is ever stored. Sums are deterministic: no atomics.

Importing this module imports Triton: `lejepa.objective.sigreg` imports it on first use and falls back to
pure torch when that, or a kernel, fails. With TRITON_INTERPRET=1 set before Triton is imported,
the kernels run on CPU tensors (slowly): that is how the CPU test suite checks them.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

# (rows, columns) per tile and warps per program: 8 values per thread. libdevice's accurate cos
# and sin are long (their slow path for huge arguments included): at 16 values per thread or more
# the kernels need 150-255 registers on sm_90 and spill, and fewer programs fit on an SM.
SUMS_BLOCK_ROWS, SUMS_BLOCK_COLS, SUMS_WARPS = 8, 128, 4
GRAD_BLOCK_ROWS, GRAD_BLOCK_COLS, GRAD_WARPS = 8, 128, 4
# The sums kernel has only knots x column-blocks programs (136 for 1024 slices): too few to fill a
# GPU when N is large. Then the rows are split into up to this many programs' worth of segments,
# of at least SUMS_MIN_SPLIT_ROWS rows each, and the partial sums added up after.
SUMS_MIN_PROGRAMS, SUMS_MIN_SPLIT_ROWS = 1024, 256


@triton.jit
def _ecf_sums_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    n_rows,
    n_cols,
    rows_per_split,
    dt,
    knots,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    knot = tl.program_id(0)
    t = knot * dt
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    split = tl.program_id(2)
    first_row = split * rows_per_split
    rows = tl.arange(0, BLOCK_ROWS)
    # Advancing the pointers keeps the integer offsets small; the segment's start may pass 2**31.
    x_ptrs = x_ptr + first_row.to(tl.int64) * n_cols + rows[:, None] * n_cols + cols[None, :]
    cos_acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    sin_acc = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    # Segments are rows_per_split long (the last one may end early), a multiple of BLOCK_ROWS.
    for start in range(0, rows_per_split, BLOCK_ROWS):
        mask = ((first_row + start + rows) < n_rows)[:, None] & col_mask[None, :]
        tx = t * tl.load(x_ptrs, mask=mask, other=0.0)
        cos_acc += tl.where(mask, tl.cos(tx), 0.0)  # padding loads 0, whose cos is 1
        sin_acc += tl.sin(tx)
        x_ptrs += BLOCK_ROWS * n_cols
    # Outputs are (splits, M, knots), row-major.
    out = split * n_cols * knots + cols * knots + knot
    tl.store(cos_ptr + out, tl.sum(cos_acc, axis=0), mask=col_mask)
    tl.store(sin_ptr + out, tl.sum(sin_acc, axis=0), mask=col_mask)


@triton.jit
def _ecf_grad_kernel(
    x_ptr,
    grad_cos_ptr,
    grad_sin_ptr,
    grad_x_ptr,
    n_rows,
    n_cols,
    grad_col_stride,
    grad_knot_stride,
    dt,
    knots,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]  # N * M may pass 2**31
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    grad = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    # The upstream gradients (M, knots) are read in place, by their strides: they are small and stay in
    # cache, so a transposed copy would cost more (a kernel launch each) than it saves.
    grad_offsets = cols * grad_col_stride
    for knot in range(knots):
        t = knot * dt
        at_knot = grad_offsets + knot * grad_knot_stride
        cos_coefficient = t * tl.load(grad_sin_ptr + at_knot, mask=col_mask, other=0.0)
        sin_coefficient = t * tl.load(grad_cos_ptr + at_knot, mask=col_mask, other=0.0)
        tx = t * x
        grad += cos_coefficient[None, :] * tl.cos(tx) - sin_coefficient[None, :] * tl.sin(tx)
    tl.store(grad_x_ptr + offsets, grad, mask=mask)


def _on_device_of(x: Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it x's (CPU tensors: the interpreter)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _rows_per_split(n_rows: int, programs: int) -> int:
    """Rows per segment for the sums kernel: a multiple of its tile, all of them when N is small."""
    splits = max(1, min(triton.cdiv(SUMS_MIN_PROGRAMS, programs), n_rows // SUMS_MIN_SPLIT_ROWS))
    return triton.cdiv(triton.cdiv(n_rows, splits), SUMS_BLOCK_ROWS) * SUMS_BLOCK_ROWS


def ecf_sums(x: Tensor, dt: float, knots: int) -> tuple[Tensor, Tensor]:
    """(cos_sums, sin_sums), each (M, knots), of float32 x (N, M)."""
    x = x.contiguous()
    n_rows, n_cols = x.shape
    grid = (knots, triton.cdiv(n_cols, SUMS_BLOCK_COLS))
    rows_per_split = _rows_per_split(n_rows, grid[0] * grid[1])
    splits = triton.cdiv(n_rows, rows_per_split)
    # Partial sums per segment, (splits, M, knots); with one segment, the sums themselves.
    shape = (n_cols, knots) if splits == 1 else (splits, n_cols, knots)
    cos_sums, sin_sums = x.new_empty(shape), x.new_empty(shape)
    blocks = {"BLOCK_ROWS": SUMS_BLOCK_ROWS, "BLOCK_COLS": SUMS_BLOCK_COLS, "num_warps": SUMS_WARPS}
    with _on_device_of(x):
        _ecf_sums_kernel[(*grid, splits)](
            x, cos_sums, sin_sums, n_rows, n_cols, rows_per_split, dt, knots, **blocks
        )
    if splits > 1:  # added in a fixed order: deterministic
        cos_sums, sin_sums = cos_sums.sum(0), sin_sums.sum(0)
    return cos_sums, sin_sums


def ecf_grad(x: Tensor, dt: float, knots: int, grad_cos: Tensor, grad_sin: Tensor) -> Tensor:
    """Gradient for float32 x (N, M) from the gradients (M, knots) of cos_sums and sin_sums."""
    x = x.contiguous()
    n_rows, n_cols = x.shape
    grad_x = torch.empty_like(x)
    grid = (triton.cdiv(n_rows, GRAD_BLOCK_ROWS), triton.cdiv(n_cols, GRAD_BLOCK_COLS))
    if grad_cos.stride() != grad_sin.stride():  # one set of strides serves both
        grad_cos, grad_sin = grad_cos.contiguous(), grad_sin.contiguous()
    col_stride, knot_stride = grad_cos.stride()
    blocks = {"BLOCK_ROWS": GRAD_BLOCK_ROWS, "BLOCK_COLS": GRAD_BLOCK_COLS, "num_warps": GRAD_WARPS}
    with _on_device_of(x):
        _ecf_grad_kernel[grid](
            x, grad_cos, grad_sin, grad_x, n_rows, n_cols, col_stride, knot_stride, dt, knots, **blocks
        )
    return grad_x
