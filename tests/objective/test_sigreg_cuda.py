"""SIGReg on CUDA: the Triton path and the pure-torch fallback against the straightforward
formulation, and that ours is faster, smaller, and free of per-step host syncs."""

import statistics

import pytest
import torch
from test_sigreg import assert_float32_agreement, float32_case, force_path, values_and_grads

from lejepa.objective import sigreg
from lejepa.objective.sigreg import SIGReg, ecf_path, reference_sliced_epps_pulley, sliced_epps_pulley

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
# (N, D) and (V, N, D) batches; the last one has ragged tiles, and the sums kernel splits its rows
# into 16 segments.
CASES = [((600, 32), 512), ((3, 257, 24), 512), ((4099, 64), 300)]
BENCH_SHAPE, BENCH_SLICES = (8, 512, 128), 1024  # views x N x D, as in benchmarks/sigreg.py


def cuda_case(shape: tuple[int, ...], slices: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 inputs of test_sigreg's float32 tests, on the GPU."""
    return tuple(tensor.to(CUDA) for tensor in float32_case(shape, slices))


def float32_value_and_grad(z: torch.Tensor, directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.float().requires_grad_()
    value = sliced_epps_pulley(z, directions.float())
    return value.detach(), torch.autograd.grad(value, z)[0]


@pytest.mark.parametrize(("shape", "slices"), CASES, ids=str)
def test_triton_path_value_and_gradient_agree_within_1e5_and_1e4(shape, slices):
    z, directions = cuda_case(shape, slices)
    assert ecf_path(CUDA, torch.float32) == "triton"
    assert_float32_agreement(*float32_value_and_grad(z, directions), z, directions)
    assert sigreg._triton_error is None


def test_the_triton_kernels_run_on_cuda_not_the_fallback(monkeypatch):
    kernels, calls = sigreg._triton_kernels(), []
    assert kernels is not None, sigreg._triton_error
    for name in ("ecf_sums", "ecf_grad"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *args, name=name, kernel=kernel: calls.append(name) or kernel(*args)
        )
    float32_value_and_grad(*cuda_case((3, 257, 24), 512))
    assert calls == ["ecf_sums", "ecf_grad"]
    assert sigreg._triton_error is None


@pytest.mark.parametrize(("shape", "slices"), CASES, ids=str)
def test_pure_torch_fallback_agrees_within_1e5_and_1e4(shape, slices, monkeypatch):
    force_path(monkeypatch, "torch")
    z, directions = cuda_case(shape, slices)
    assert_float32_agreement(*float32_value_and_grad(z, directions), z, directions)


def test_float64_takes_the_torch_path_and_equals_the_straightforward_formulation():
    assert ecf_path(CUDA, torch.float64) == "torch"
    z, directions = cuda_case((3, 257, 24), 512)
    fast = values_and_grads(sliced_epps_pulley, z, directions)
    ref = values_and_grads(reference_sliced_epps_pulley, z, directions)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-12, atol=0)
    for fast_grad, ref_grad in zip(fast[1:], ref[1:], strict=True):
        torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-10, atol=1e-12 * ref_grad.abs().max().item())


def bench_inputs(shape: tuple[int, ...], slices: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(shape, generator=generator)
    directions = torch.randn(shape[-1], slices, generator=generator)
    return z.to(CUDA).requires_grad_(), (directions / directions.norm(dim=0)).to(CUDA)


def one_pass(fn, z: torch.Tensor, directions: torch.Tensor) -> None:
    fn(z, directions).backward()
    z.grad = None


def median_ms(fn, z: torch.Tensor, directions: torch.Tensor, reps: int = 15) -> float:
    """Median GPU time of forward+backward between CUDA events, after warm-up (and compilation)."""
    for _ in range(3):
        one_pass(fn, z, directions)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        one_pass(fn, z, directions)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_extra_bytes(fn, z: torch.Tensor, directions: torch.Tensor) -> int:
    one_pass(fn, z, directions)  # warm-up: kernels compiled, the allocator's pools made
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    one_pass(fn, z, directions)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def test_ours_is_faster_than_the_straightforward_formulation():
    z, directions = bench_inputs(BENCH_SHAPE, BENCH_SLICES)
    ours = median_ms(sliced_epps_pulley, z, directions)
    straightforward = median_ms(reference_sliced_epps_pulley, z, directions)
    assert ours < straightforward, f"ours {ours:.2f} ms, straightforward {straightforward:.2f} ms"


@pytest.mark.parametrize("shape", [(512, 128), BENCH_SHAPE], ids=str)
def test_ours_needs_at_most_a_quarter_of_the_memory(shape):
    z, directions = bench_inputs(shape, BENCH_SLICES)
    ours = peak_extra_bytes(sliced_epps_pulley, z, directions)
    straightforward = peak_extra_bytes(reference_sliced_epps_pulley, z, directions)
    assert ours <= straightforward / 4, (
        f"ours {ours / 2**20:.1f} MiB, straightforward {straightforward / 2**20:.1f}"
    )


def test_module_steps_without_host_syncs():
    module = SIGReg(num_slices=256).to(CUDA)
    z = torch.randn(512, 64, device=CUDA, requires_grad=True)
    module(z).backward()  # the first call reads the step buffer once (and compiles the kernels)
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host sync now raises
    try:
        for _ in range(2):
            module(z).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert module.step.item() == module._host_step == 3
