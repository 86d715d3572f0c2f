"""SIGReg: Sketched Isotropic Gaussian Regularisation, the LeJEPA anti-collapse term.

LeJEPA pushes embeddings towards an isotropic Gaussian. SIGReg tests that along random 1-D
projections ("slices"): for a unit direction a, the projections x_i = z_i . a should be N(0, 1).
The Epps-Pulley statistic measures how far they are, as the weighted L2 distance between the
empirical characteristic function (ECF) of the x_i and the standard normal one:

    EP(x) = N * integral |ecf(t) - phi(t)|^2 phi(t) dt,   ecf(t) = mean_i exp(i t x_i),
    phi(t) = exp(-t^2 / 2),

integrated with the trapezoidal rule on knots t_j = linspace(0, t_max, knots); the integrand is
even in t, so the negative half is folded in by doubling the weights. SIGReg averages EP over the
slices (and the views).

`reference_sliced_epps_pulley` computes this the straightforward way. `sliced_epps_pulley` gives
the same value and gradient, much faster and in a fraction of the memory. A custom autograd
function computes the ECF sums over the samples; its backward uses the closed form of the
gradient in the upstream gradients g_c, g_s of those sums,
d/dx [g_c cos(t x) + g_s sin(t x)] = t (g_s cos(t x) - g_c sin(t x)), so nothing of size
N x K x knots is ever kept. How the sums are computed depends on the device (`ecf_path` says):
- CPU ("recurrence"): the knots are a uniform grid t_j = j * dt, so exp(i t_j x) = exp(i dt x) ** j:
  one cos and sin per projection, then complex multiplications (angle addition), summed over the
  samples as we go, so only (rows x slices) tensors exist; backward evaluates the gradient, a
  polynomial in exp(i dt x), with Horner's rule. Samples are processed in row chunks that stay in
  cache and bound the memory.
- CUDA, float32 ("triton"): two fused Triton kernels (`lejepa.objective.sigreg_triton`). On a GPU the CPU
  path's hundreds of small per-chunk, per-knot ops cost more in launches than they compute; the
  kernels evaluate cos and sin at every knot directly (more accurate than the recurrence), keep
  the column sums in registers, and read x once and write its gradient once in backward. Where
  Triton is missing, or a kernel fails to compile or run, a warning is issued once and the torch
  path below takes over for the rest of the process.
- Other devices, float64 on CUDA, or no Triton ("torch"): cos and sin of (rows x slices x knots)
  chunks of a few million entries, vectorised over knots and slices.
Computation is in float32 at least: bfloat16/float16 inputs are upcast (their gradient comes
back in the input dtype); float64 stays float64.

Distributed: when a torch.distributed process group is initialised, `sliced_epps_pulley` sums
the ECF sums (small views x slices x knots tensors) over ranks before forming the statistic, so
W ranks holding parts of a batch get exactly the statistic of one process holding the
concatenated batch; ranks may hold different batch sizes. Every rank must call it, with the same
directions (`SIGReg` sees to that). Gradient convention: the all-reduce's backward sums the
gradients over ranks, i.e. autograd differentiates the sum of the W identical per-rank losses,
so each rank's samples get W times their single-process gradient. DDP / DeepSpeed average
gradients over ranks, which cancels the W: parameter gradients equal those of one process on the
whole batch, as for any per-rank mean loss.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

# CPU: rows per chunk are chosen so a chunk holds about this many (row, slice) entries: 2 MiB of
# complex64, which stays in one core's L2 cache and bounds the working memory.
_CPU_CHUNK_ELEMENTS = 1 << 18
# GPU, pure torch: about this many (row, slice, knot) entries per chunk (16 MiB in float32). On a
# GPU each op costs a launch, so chunks are large, yet a few of them stay far below the memory of
# the whole N x slices x knots tensor.
_GPU_CHUNK_ELEMENTS = 1 << 22

_T = TypeVar("_T")


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _cpu_rows_per_chunk(x: Tensor) -> int:
    return max(1, _CPU_CHUNK_ELEMENTS // x.shape[1])


def _gpu_rows_per_chunk(x: Tensor, knots: int) -> int:
    return max(1, _GPU_CHUNK_ELEMENTS // (x.shape[1] * knots))


def _knot_spacing(knots: int, t_max: float) -> float:
    """dt of the grid t_j = j * dt, j = 0 .. knots - 1, that ends at t_max."""
    if knots < 2 or t_max <= 0:
        raise ValueError(f"SIGReg needs knots >= 2 and t_max > 0, got knots={knots}, t_max={t_max}")
    return t_max / (knots - 1)


def _quadrature(knots: int, t_max: float, like: Tensor) -> tuple[Tensor, Tensor]:
    """phi_j = exp(-t_j^2 / 2) at the knots and the weights w_j = phi_j * (trapezoid of t_j)."""
    return _quadrature_on(knots, t_max, like.dtype, like.device)


@functools.lru_cache(maxsize=64)
def _quadrature_on(
    knots: int, t_max: float, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    # Cached: on a GPU each of these small ops is a kernel launch, at every step. Never written to.
    dt = _knot_spacing(knots, t_max)
    t = torch.linspace(0.0, t_max, knots, dtype=dtype, device=device)
    phi = torch.exp(-0.5 * t**2)
    # Trapezoid on [0, t_max], doubled for the mirror half [-t_max, 0]: 2 dt inside, dt at the ends.
    # Built on the device with no element assignment: writing a host scalar into a GPU tensor syncs.
    j = torch.arange(knots, device=device)
    trapezoid = torch.where((j == 0) | (j == knots - 1), dt, 2 * dt).to(dtype)
    return phi, phi * trapezoid


def _project(z: Tensor, directions: Tensor) -> Tensor:
    """The slices x = z @ directions, (N, K) or (V, N, K), in float32 or wider."""
    if z.ndim not in (2, 3) or directions.ndim != 2 or z.shape[-1] != directions.shape[0]:
        raise ValueError(
            f"SIGReg expects z of shape (N, D) or (V, N, D) and directions (D, K), "
            f"got z {tuple(z.shape)} and directions {tuple(directions.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(z.dtype, directions.dtype), torch.float32)
    return z.to(dtype) @ directions.to(dtype)


def _ecf_errors(
    cos_sums: Tensor, sin_sums: Tensor, knots: int, t_max: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ecf(t_j) - phi(t_j), real and imaginary parts (..., knots), from the ECF sums over the samples; then
    the sample count N (..., 1) and the quadrature weights w_j."""
    phi, weights = _quadrature(knots, t_max, cos_sums)
    # t_0 = 0, so cos_sums[..., 0] = sum_i cos(0) = N; after an all-reduce it is the global N.
    n = cos_sums[..., :1].detach()
    return cos_sums / n - phi, sin_sums / n, n, weights


def _statistic(cos_error: Tensor, sin_error: Tensor, n: Tensor, weights: Tensor) -> Tensor:
    """The statistic per slice, N * sum_j w_j |ecf(t_j) - phi(t_j)|^2, from `_ecf_errors`."""
    return n[..., 0] * ((cos_error.square() + sin_error.square()) @ weights)


def _epps_pulley(cos_sums: Tensor, sin_sums: Tensor, knots: int, t_max: float) -> Tensor:
    """The statistic per slice from the ECF sums over the samples, each of shape (..., knots)."""
    return _statistic(*_ecf_errors(cos_sums, sin_sums, knots, t_max))


def reference_sliced_epps_pulley(
    z: Tensor, directions: Tensor, knots: int = 17, t_max: float = 3.0
) -> Tensor:
    """The straightforward formulation: the reference for tests and benchmarks, not for training.

    Materialises cos and sin of the (N x K x knots) tensor t_j * x_ik and lets autograd
    differentiate it: simple to check, slow, and memory-hungry. Single process, no all-reduce.
    """
    with torch.autocast(z.device.type, enabled=False):
        x = _project(z, directions)
        t = torch.linspace(0.0, t_max, knots, dtype=x.dtype, device=x.device)
        tx = x.unsqueeze(-1) * t  # (..., N, K, knots)
        return _epps_pulley(tx.cos().sum(-3), tx.sin().sum(-3), knots, t_max).mean()


def _unit_phasor(x: Tensor, dt: float) -> Tensor:
    """exp(i dt x), complex."""
    return torch.polar(torch.ones_like(x), x * dt)


def _recurrence_sums(x: Tensor, dt: float, knots: int) -> tuple[Tensor, Tensor]:
    """The CPU path's ECF sums: angle addition over the knots, in cache-sized row chunks."""
    sums = x.new_zeros(knots, x.shape[1], dtype=torch.promote_types(x.dtype, torch.complex64))
    for rows in x.split(_cpu_rows_per_chunk(x)):
        phasor = _unit_phasor(rows, dt)
        power = torch.ones_like(phasor)
        # power = exp(i j dt x) by angle addition. Rounding drifts by about j float eps per
        # product: ~1e-6 relative after 16 knots in float32, far below the tolerances tested.
        for j in range(knots):
            sums[j] += power.sum(0)
            power *= phasor
    return sums.real.T.contiguous(), sums.imag.T.contiguous()


def _recurrence_grad(x: Tensor, dt: float, knots: int, grad_cos: Tensor, grad_sin: Tensor) -> Tensor:
    """The CPU path's gradient: Horner's rule in the phasor, in cache-sized row chunks."""
    t = dt * torch.arange(knots, dtype=x.dtype, device=x.device)
    # d/dx of sum_j g_c,j cos(t_j x) + g_s,j sin(t_j x) is Re(sum_j h_j exp(i dt x) ** j)
    # with h_j = t_j (g_s,j + i g_c,j): a polynomial in the phasor, recomputed per chunk.
    coefficients = (t * torch.complex(grad_sin, grad_cos)).T.contiguous()  # (knots, M)
    grad_x = torch.empty_like(x)
    chunk = _cpu_rows_per_chunk(x)
    for rows, grad_rows in zip(x.split(chunk), grad_x.split(chunk), strict=True):
        phasor = _unit_phasor(rows, dt)
        polynomial = torch.zeros_like(phasor)
        for j in reversed(range(knots)):
            polynomial = torch.addcmul(coefficients[j], polynomial, phasor)
        grad_rows.copy_(polynomial.real)
    return grad_x


def _vectorised_sums(x: Tensor, dt: float, knots: int) -> tuple[Tensor, Tensor]:
    """The pure-torch GPU path's ECF sums: cos and sin of (rows, M, knots) chunks, summed over rows."""
    t = dt * torch.arange(knots, dtype=x.dtype, device=x.device)
    cos_sums, sin_sums = (x.new_zeros(x.shape[1], knots) for _ in range(2))
    for rows in x.split(_gpu_rows_per_chunk(x, knots)):
        tx = rows.unsqueeze(-1) * t
        cos_sums += tx.cos().sum(0)
        sin_sums += tx.sin_().sum(0)
    return cos_sums, sin_sums


def _vectorised_grad(x: Tensor, dt: float, knots: int, grad_cos: Tensor, grad_sin: Tensor) -> Tensor:
    """The pure-torch GPU path's gradient, sum_j t_j (g_s,j cos(t_j x) - g_c,j sin(t_j x)), by chunks."""
    t = dt * torch.arange(knots, dtype=x.dtype, device=x.device)
    cos_coefficients, sin_coefficients = t * grad_sin, t * grad_cos  # (M, knots)
    grad_x = torch.empty_like(x)
    chunk = _gpu_rows_per_chunk(x, knots)
    for rows, grad_rows in zip(x.split(chunk), grad_x.split(chunk), strict=True):
        tx = rows.unsqueeze(-1) * t
        terms = tx.cos().mul_(cos_coefficients)
        terms -= tx.sin_().mul_(sin_coefficients)  # in place: two chunk-sized tensors at most
        torch.sum(terms, -1, out=grad_rows)
    return grad_x


# Set to the reason once Triton cannot be imported or a kernel failed: the torch path is used then.
_triton_error: str | None = None


@functools.cache
def _triton_kernels() -> ModuleType | None:
    """lejepa.objective.sigreg_triton, imported on first use; None where Triton is missing or broken."""
    try:
        from lejepa.objective import sigreg_triton
    except Exception as error:  # not installed, or an install that cannot load
        _turn_off_triton(error)
        return None
    return sigreg_triton


def _turn_off_triton(error: Exception) -> None:
    global _triton_error
    _triton_error = f"{type(error).__name__}: {error}"
    warnings.warn(
        f"SIGReg's Triton kernels are unavailable ({_triton_error}); using the pure-torch path",
        RuntimeWarning,
        stacklevel=3,
    )


def _on_triton(kernel: str, fallback: Callable[..., _T], *args: Any) -> _T:
    """Run sigreg_triton's `kernel`; if Triton is unusable, remember why and run `fallback`."""
    kernels = _triton_kernels()
    if kernels is not None and _triton_error is None:
        try:
            return getattr(kernels, kernel)(*args)
        except torch.cuda.OutOfMemoryError:  # not the kernel's fault, and the fallback needs more
            raise
        except Exception as error:  # compilation or launch failed: never crash training for it
            _turn_off_triton(error)
    return fallback(*args)


# Each path's (ECF sums, their gradient), both functions of (x, dt, knots[, grad_cos, grad_sin]).
_PATHS: dict[str, tuple[Callable[..., tuple[Tensor, Tensor]], Callable[..., Tensor]]] = {
    "recurrence": (_recurrence_sums, _recurrence_grad),
    "torch": (_vectorised_sums, _vectorised_grad),
    "triton": (
        functools.partial(_on_triton, "ecf_sums", _vectorised_sums),
        functools.partial(_on_triton, "ecf_grad", _vectorised_grad),
    ),
}


def ecf_path(device: torch.device, dtype: torch.dtype) -> str:
    """Which implementation computes the ECF sums of projections on `device` in `dtype`.

    'recurrence' on the CPU; 'triton' for float32 on CUDA while Triton works; 'torch' otherwise.
    """
    if device.type == "cpu":
        return "recurrence"
    if device.type != "cuda" or dtype != torch.float32:
        return "torch"
    return "triton" if _triton_kernels() is not None and _triton_error is None else "torch"


class _ECFSums(torch.autograd.Function):
    """cos_sums[m, j] = sum_i cos(j dt x[i, m]) and sin_sums likewise, for x of shape (N, M)."""

    @staticmethod
    def forward(ctx, x: Tensor, dt: float, knots: int) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(x)
        ctx.dt, ctx.knots = dt, knots
        sums, _ = _PATHS[ecf_path(x.device, x.dtype)]
        return sums(x, dt, knots)

    @staticmethod
    def backward(ctx, grad_cos: Tensor, grad_sin: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        _, grad = _PATHS[ecf_path(x.device, x.dtype)]
        return grad(x, ctx.dt, ctx.knots, grad_cos, grad_sin), None, None


class _MeanEppsPulley(torch.autograd.Function):
    """`_epps_pulley(...).mean()` over the columns of ECF sums (M, knots), with its gradient in closed form.

    d/dc_j of n * w_j * ((c_j / n - phi_j)^2 + (s_j / n)^2) is 2 w_j (c_j / n - phi_j), and likewise
    2 w_j s_j / n for s_j (n, the sample count, is a constant). A handful of ops each way instead of
    autograd's two dozen: on a GPU at small batches, each op is a kernel launch that costs more than it
    computes.
    """

    @staticmethod
    def forward(ctx, cos_sums: Tensor, sin_sums: Tensor, knots: int, t_max: float) -> Tensor:
        errors = _ecf_errors(cos_sums, sin_sums, knots, t_max)
        cos_error, sin_error, _, weights = errors
        ctx.save_for_backward(cos_error, sin_error, weights)
        return _statistic(*errors).mean()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        cos_error, sin_error, weights = ctx.saved_tensors
        scale = weights * (grad * 2 / cos_error.shape[0])
        return cos_error * scale, sin_error * scale, None, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; backward sums the gradients too (autograd over the sum of per-rank losses)."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def sliced_epps_pulley(
    z: Tensor,
    directions: Tensor,
    knots: int = 17,
    t_max: float = 3.0,
    *,
    distributed: bool = True,
) -> Tensor:
    """Epps-Pulley normality statistic averaged over slices (and views): a scalar.

    z is (N, D) or (V, N, D); directions is (D, K) with unit-norm columns. With an initialised
    process group and `distributed`, the ECF is summed over ranks (see the module docstring for
    the gradient convention); every rank must then call this. Pass distributed=False to compute
    a rank-local statistic.
    """
    with torch.autocast(z.device.type, enabled=False):  # autocast would run the matmuls in bf16
        x = _project(z, directions)
        views = x if x.ndim == 3 else x.unsqueeze(0)
        # Each (view, slice) pair is one column of samples: (N, V * K).
        columns = views.transpose(0, 1).reshape(views.shape[1], -1)
        cos_sums, sin_sums = _ECFSums.apply(columns, _knot_spacing(knots, t_max), knots)
        if distributed and _world_size() > 1:
            cos_sums, sin_sums = _AllReduceSum.apply(torch.stack([cos_sums, sin_sums])).unbind()
        return _MeanEppsPulley.apply(cos_sums, sin_sums, knots, t_max)


def slice_directions(dim: int, num_slices: int, seed: int, device: torch.device | str = "cpu") -> Tensor:
    """(dim, num_slices) unit-norm Gaussian directions from a generator on `device` seeded with `seed`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    gaussian = torch.randn(dim, num_slices, generator=generator, device=device)
    return gaussian / gaussian.norm(dim=0, keepdim=True)


class SIGReg(nn.Module):
    """SIGReg loss: Epps-Pulley statistic on `num_slices` fresh random directions per call.

    Directions are a pure function of (seed, step); `step` is a persistent buffer, so it is saved
    in the state_dict and a resumed run continues the same sequence of directions. Under
    torch.distributed, rank 0's step is broadcast on the first call (and after load_state_dict)
    so all ranks project on the same slices. The buffer is read into a host-side mirror only then:
    reading it every step would stall a GPU run with a device-to-host sync per step.
    """

    step: Tensor

    def __init__(self, num_slices: int = 1024, knots: int = 17, t_max: float = 3.0, seed: int = 0):
        super().__init__()
        _knot_spacing(knots, t_max)  # fail at construction, not at the first step
        self.num_slices, self.knots, self.t_max, self.seed = num_slices, knots, t_max, seed
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._host_step = 0  # equals self.step once _step_synced
        self._step_synced = False
        self.register_load_state_dict_post_hook(lambda module, _keys: setattr(module, "_step_synced", False))

    def extra_repr(self) -> str:
        return f"num_slices={self.num_slices}, knots={self.knots}, t_max={self.t_max}, seed={self.seed}"

    def directions(self, dim: int, step: int, device: torch.device | str = "cpu") -> Tensor:
        """The (dim, num_slices) unit-norm Gaussian directions used at `step`."""
        # The CPU generator (mt19937) only uses the low 32 bits of its seed, so (seed, step) is
        # mixed into 32 bits; consecutive steps of one run never share a seed.
        return slice_directions(dim, self.num_slices, (self.seed * 2_654_435_761 + step) % 2**32, device)

    def _sync_step(self, device: torch.device) -> None:
        """Take rank 0's step under torch.distributed, and mirror the buffer on the host."""
        if _world_size() > 1:
            step = self.step.to(device)  # on the device the process group accepts (NCCL: a GPU)
            dist.broadcast(step, src=0)
            self.step.copy_(step)
        self._host_step = int(self.step)
        self._step_synced = True

    def forward(self, z: Tensor) -> Tensor:
        if not self._step_synced:
            self._sync_step(z.device)
        directions = self.directions(z.shape[-1], self._host_step, z.device)
        self.step += 1
        self._host_step += 1
        return sliced_epps_pulley(z, directions, self.knots, self.t_max)
