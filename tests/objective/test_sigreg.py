"""SIGReg: the statistic's behaviour, agreement with the straightforward formulation, the module."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

import lejepa.objective
from lejepa.objective import sigreg
from lejepa.objective.sigreg import SIGReg, ecf_path, reference_sliced_epps_pulley, sliced_epps_pulley

REPO = Path(__file__).resolve().parents[2]


def unit_directions(dim: int, slices: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gaussian = torch.randn(dim, slices, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return gaussian / gaussian.norm(dim=0)


def value_and_grad(fn, z: torch.Tensor, directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.detach().clone().requires_grad_()
    value = fn(z, directions)
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


def spec_statistic(x: torch.Tensor, knots: int = 17, t_max: float = 3.0) -> float:
    """The issue's formula written out for the projections x (N, K), independent of lejepa."""
    n, slices = x.shape
    dt = t_max / (knots - 1)
    total = 0.0
    for k in range(slices):
        for j in range(knots):
            t = j * dt
            phi = math.exp(-t * t / 2)
            weight = phi * (dt if j in (0, knots - 1) else 2 * dt)
            mean_cos = sum(math.cos(t * xi) for xi in x[:, k].tolist()) / n
            mean_sin = sum(math.sin(t * xi) for xi in x[:, k].tolist()) / n
            total += n * weight * ((mean_cos - phi) ** 2 + mean_sin**2)
    return total / slices


def test_statistic_matches_the_formula_written_out():
    z = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    directions = unit_directions(3, 4, seed=1, dtype=torch.float64)
    expected = spec_statistic(z @ directions)
    assert sliced_epps_pulley(z, directions).item() == pytest.approx(expected, rel=1e-12)
    assert reference_sliced_epps_pulley(z, directions).item() == pytest.approx(expected, rel=1e-12)


N_LARGE, DIM = 4096, 64
# Under the null, E|exp(itx) - phi(t)|^2 = 1 - phi(t)^2, so the statistic's mean is
# integral (1 - exp(-t^2)) exp(-t^2/2) dt over [-3, 3] (1.05 with the 17-knot quadrature),
# whatever N: "near zero" means O(1), while a fixed departure from N(0, 1) grows like N.
NULL_MEAN = 1.05


def test_statistic_is_order_one_for_gaussian_samples():
    z = torch.randn(N_LARGE, DIM, generator=torch.Generator().manual_seed(0))
    value = sliced_epps_pulley(z, unit_directions(DIM, 256, seed=1)).item()
    assert 0.6 * NULL_MEAN < value < 1.5 * NULL_MEAN


def _non_gaussian(kind: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    gaussian = torch.randn(N_LARGE, DIM, generator=generator)
    if kind == "collapsed":  # every embedding the same point
        return torch.ones(N_LARGE, DIM) / math.sqrt(DIM)
    if kind == "low_rank":  # dimensional collapse onto 2 directions
        return gaussian[:, :2] @ torch.randn(2, DIM, generator=generator) / math.sqrt(2)
    if kind == "uniform":  # unit variance, but uniform in 2 dimensions
        return (torch.rand(N_LARGE, 2, generator=generator) - 0.5) * math.sqrt(12)
    if kind == "shifted":
        return gaussian + 0.5
    if kind == "scaled":
        return gaussian * 1.5
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["collapsed", "low_rank", "uniform", "shifted", "scaled"])
def test_statistic_is_large_for_non_gaussian_samples(kind):
    z = _non_gaussian(kind)
    value = sliced_epps_pulley(z, unit_directions(z.shape[1], 256, seed=1)).item()
    assert value > 15 * NULL_MEAN


def test_collapsed_batch_has_the_closed_form_value():
    # All projections 0: ecf = 1, so the statistic is N * sum_j w_j (1 - phi_j)^2.
    n, knots, t_max = 100, 17, 3.0
    dt = t_max / (knots - 1)
    t = torch.arange(knots, dtype=torch.float64) * dt
    phi = torch.exp(-(t**2) / 2)
    weights = phi * torch.tensor([dt] + [2 * dt] * (knots - 2) + [dt], dtype=torch.float64)
    expected = n * (weights * (1 - phi) ** 2).sum().item()
    z = torch.zeros(n, 5, dtype=torch.float64)
    assert sliced_epps_pulley(z, unit_directions(5, 7, seed=0)).item() == pytest.approx(expected, rel=1e-12)


# (shape, slices) chosen so both the CPU path and the pure-torch GPU path run over two row chunks,
# the last one ragged.
CASES = [((600, 32), 512), ((3, 257, 24), 512)]
CPU_PATHS = ["recurrence", "torch"]  # the pure-torch GPU path runs on CPU tensors too


def force_path(monkeypatch, path: str) -> None:
    monkeypatch.setattr(sigreg, "ecf_path", lambda device, dtype: path)


def values_and_grads(fn, z: torch.Tensor, directions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    z, directions = z.detach().clone().requires_grad_(), directions.detach().clone().requires_grad_()
    value = fn(z, directions)
    return (value.detach(), *torch.autograd.grad(value, (z, directions)))


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize(("shape", "slices"), CASES, ids=str)
def test_float64_value_and_gradients_equal_the_straightforward_formulation(shape, slices, path, monkeypatch):
    force_path(monkeypatch, path)
    z = 1.3 * torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.2
    directions = unit_directions(shape[-1], slices, seed=1, dtype=torch.float64)
    fast = values_and_grads(sliced_epps_pulley, z, directions)
    ref = values_and_grads(reference_sliced_epps_pulley, z, directions)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-12, atol=0)
    # Gradients for z and, through the plain-autograd projection, for the directions.
    for fast_grad, ref_grad in zip(fast[1:], ref[1:], strict=True):
        torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-10, atol=1e-12 * ref_grad.abs().max().item())


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize(("shape", "slices"), CASES, ids=str)
def test_float32_value_and_gradient_agree_within_1e5_and_1e4(shape, slices, path, monkeypatch):
    force_path(monkeypatch, path)
    z, directions = float32_case(shape, slices)
    fast = value_and_grad(sliced_epps_pulley, z.float(), directions.float())
    assert_float32_agreement(*fast, z, directions)


def float32_case(shape: tuple[int, ...], slices: int) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.1
    return z, unit_directions(shape[-1], slices, seed=2, dtype=torch.float64)


def assert_float32_agreement(fast, fast_grad, z: torch.Tensor, directions: torch.Tensor) -> None:
    """`fast` value and gradient, from float32 inputs, agree with the reference within 1e-5 and 1e-4."""
    for ref_dtype in (torch.float32, torch.float64):  # the float32 reference, and the truth
        ref, ref_grad = value_and_grad(
            reference_sliced_epps_pulley, z.to(ref_dtype), directions.to(ref_dtype)
        )
        assert abs(fast.item() - ref.item()) <= 1e-5 * abs(ref.item())
        # Elementwise relative, with an absolute floor for entries near zero.
        scale = ref_grad.abs().max().item()
        torch.testing.assert_close(fast_grad.double(), ref_grad.double(), rtol=1e-4, atol=1e-4 * scale)


def test_bfloat16_input_is_computed_in_float32_and_returns_a_bfloat16_gradient():
    z = torch.randn(300, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    directions = unit_directions(32, 128, seed=1)
    value, grad = value_and_grad(sliced_epps_pulley, z, directions)
    value32, grad32 = value_and_grad(sliced_epps_pulley, z.float(), directions)
    assert value.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert value.item() == pytest.approx(value32.item(), rel=1e-6)
    torch.testing.assert_close(grad, grad32.to(torch.bfloat16))


def test_autocast_does_not_lower_the_precision():
    z = torch.randn(300, 32, generator=torch.Generator().manual_seed(0))
    directions = unit_directions(32, 128, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = sliced_epps_pulley(z, directions)
    assert value.item() == pytest.approx(sliced_epps_pulley(z, directions).item(), rel=1e-6)


def test_views_are_averaged():
    scales = torch.tensor([1.0, 1.5, 0.5])[:, None, None]
    z = torch.randn(3, 200, 16, generator=torch.Generator().manual_seed(0)) * scales
    directions = unit_directions(16, 64, seed=1)
    per_view = torch.stack([sliced_epps_pulley(view, directions) for view in z])
    assert sliced_epps_pulley(z, directions).item() == pytest.approx(per_view.mean().item(), rel=1e-5)


def test_shape_mismatch_names_the_shapes():
    with pytest.raises(ValueError, match=r"got z \(10, 8\) and directions \(4, 16\)"):
        sliced_epps_pulley(torch.randn(10, 8), torch.randn(4, 16))


def test_invalid_grid_is_refused_with_the_values():
    with pytest.raises(ValueError, match="knots=1, t_max=3.0"):
        sliced_epps_pulley(torch.randn(10, 8), unit_directions(8, 4, seed=0), knots=1)
    with pytest.raises(ValueError, match="knots=17, t_max=0"):
        SIGReg(t_max=0)


def test_module_draws_fresh_unit_directions_reproducible_from_the_seed():
    module = SIGReg(num_slices=64, seed=3)
    first, second = module.directions(16, step=0), module.directions(16, step=1)
    assert first.shape == (16, 64)
    torch.testing.assert_close(first.norm(dim=0), torch.ones(64))
    assert not torch.allclose(first, second)
    assert torch.equal(SIGReg(num_slices=64, seed=3).directions(16, step=1), second)
    assert not torch.allclose(SIGReg(num_slices=64, seed=4).directions(16, step=1), second)


def test_module_uses_the_directions_of_its_step_and_advances_it():
    module = SIGReg(num_slices=64, seed=3)
    z = torch.randn(128, 16, generator=torch.Generator().manual_seed(0))
    for step in range(3):
        expected = sliced_epps_pulley(z, module.directions(16, step=step))
        assert module(z).item() == pytest.approx(expected.item(), rel=1e-6)
        assert module.step.item() == step + 1


def test_module_step_is_checkpointed_and_resumes_the_direction_sequence():
    module = SIGReg(num_slices=64, seed=3)
    z = torch.randn(128, 16, generator=torch.Generator().manual_seed(0))
    module(z)
    module(z)
    state = module.state_dict()
    assert state["step"].item() == 2
    resumed = SIGReg(num_slices=64, seed=3)
    resumed.load_state_dict(state)
    assert resumed(z).item() == module(z).item()
    assert resumed.step.item() == module.step.item() == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_module_draws_directions_on_the_device_of_z():
    module = SIGReg(num_slices=64).cuda()
    z = torch.randn(256, 16, device="cuda", requires_grad=True)
    value = module(z)
    value.backward()
    assert value.device.type == "cuda" and z.grad is not None
    ref = reference_sliced_epps_pulley(z, module.directions(16, step=0, device="cuda"))
    assert value.item() == pytest.approx(ref.item(), rel=1e-5)


def test_module_follows_a_loaded_step_backwards_too():
    module = SIGReg(num_slices=64, seed=3)
    z = torch.randn(128, 16, generator=torch.Generator().manual_seed(0))
    first = module(z)
    state = {name: value.clone() for name, value in module.state_dict().items()}
    second = module(z)
    module(z)
    module.load_state_dict(state)
    assert module(z).item() == second.item() != first.item()
    assert module.step.item() == 2


class ReadsBack(TorchFunctionMode):
    """Fails on any read of a tensor's value into Python: on a GPU, each one is a host sync."""

    READS = {torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__float__, torch.Tensor.__bool__}
    READS |= {torch.Tensor.item, torch.Tensor.tolist}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        assert func not in self.READS, f"{func.__name__} reads a tensor back to the host"
        return func(*args, **(kwargs or {}))


def test_module_reads_its_step_back_only_once():
    module = SIGReg(num_slices=64, seed=3)
    z = torch.randn(128, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    module(z)
    with ReadsBack():
        value = module(z)
        value.backward()
        module(z)
    assert module.step.item() == 3
    assert value.item() == sliced_epps_pulley(z, module.directions(16, step=1)).item()


# Which implementation computes the ECF sums, and the fallback when Triton cannot run.


def test_the_path_is_chosen_by_device_and_dtype(monkeypatch):
    monkeypatch.setattr(sigreg, "_triton_kernels", lambda: SimpleNamespace())
    monkeypatch.setattr(sigreg, "_triton_error", None)
    cuda = torch.device("cuda")
    assert ecf_path(torch.device("cpu"), torch.float32) == "recurrence"
    assert ecf_path(cuda, torch.float32) == "triton"
    assert ecf_path(cuda, torch.float64) == "torch"
    monkeypatch.setattr(sigreg, "_triton_kernels", lambda: None)
    assert ecf_path(cuda, torch.float32) == "torch"


def test_a_failing_kernel_turns_triton_off_once_and_the_torch_path_answers(monkeypatch):
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("PTX compilation failed")

    monkeypatch.setattr(sigreg, "_triton_kernels", lambda: SimpleNamespace(ecf_sums=broken, ecf_grad=broken))
    monkeypatch.setattr(sigreg, "_triton_error", None)
    force_path(monkeypatch, "triton")
    z, directions = float32_case((300, 16), 64)
    with pytest.warns(RuntimeWarning, match="PTX compilation failed"):
        fast, fast_grad = value_and_grad(sliced_epps_pulley, z.float(), directions.float())
    assert len(calls) == 1  # the backward did not try again
    assert sigreg._triton_error == "RuntimeError: PTX compilation failed"
    assert_float32_agreement(fast, fast_grad, z, directions)
    monkeypatch.undo()  # the real ecf_path, with Triton still off
    monkeypatch.setattr(sigreg, "_triton_error", "RuntimeError: PTX compilation failed")
    assert ecf_path(torch.device("cuda"), torch.float32) == "torch"


def test_out_of_memory_in_a_kernel_is_raised_and_leaves_triton_on(monkeypatch):
    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    kernels = SimpleNamespace(ecf_sums=out_of_memory)
    monkeypatch.setattr(sigreg, "_triton_kernels", lambda: kernels)
    monkeypatch.setattr(sigreg, "_triton_error", None)
    force_path(monkeypatch, "triton")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        sliced_epps_pulley(torch.randn(10, 4), unit_directions(4, 8, seed=0))
    assert sigreg._triton_error is None


def test_without_triton_the_import_fails_once_with_a_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.delitem(sys.modules, "lejepa.objective.sigreg_triton", raising=False)
    monkeypatch.delattr(lejepa.objective, "sigreg_triton", raising=False)
    monkeypatch.setattr(sigreg, "_triton_error", None)
    with pytest.warns(RuntimeWarning, match=r"unavailable \(ModuleNotFoundError: import of triton halted"):
        assert sigreg._triton_kernels.__wrapped__() is None
    assert sigreg._triton_error.startswith("ModuleNotFoundError")


TRITON_CHILD = """
import sys
import torch
from lejepa.objective import sigreg
from lejepa.objective import sigreg_triton

sigreg.ecf_path = lambda device, dtype: "triton"
inputs, out = torch.load(sys.argv[1]), sys.argv[2]
results = []
for z, directions in inputs:
    z = z.float().requires_grad_()
    value = sigreg.sliced_epps_pulley(z, directions.float())
    results.append((value.detach(), torch.autograd.grad(value, z)[0]))
x = inputs[0][0].float() @ inputs[0][1].float()
sums = [sigreg_triton.ecf_sums(x, 0.25, 9)]
sigreg_triton.SUMS_MIN_SPLIT_ROWS = 16  # rows split into segments of 24, 24 and 22
sums.append(sigreg_triton.ecf_sums(x, 0.25, 9))
torch.save({"results": results, "sums": sums, "error": sigreg._triton_error}, out)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton installed")
def test_triton_kernels_in_the_interpreter_equal_the_straightforward_formulation(tmp_path):
    # TRITON_INTERPRET=1 must be set before Triton is imported, hence a fresh process; the kernels
    # then run on CPU tensors, with numpy's cos and sin.
    # Columns and rows both span two tiles or more, the last ones ragged (blocks of 16 x 128).
    cases = [float32_case((70, 24), 200), float32_case((3, 37, 16), 60)]
    torch.save(cases, tmp_path / "inputs.pt")
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    command = [sys.executable, "-c", TRITON_CHILD, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")]
    child = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    if "only 0-dimensional arrays can be converted to Python scalars" in child.stderr:
        pytest.skip("this Triton's interpreter breaks under NumPy >= 2.4 (triton-lang/triton#9171)")
    assert child.returncode == 0, child.stderr
    out = torch.load(tmp_path / "out.pt")
    assert out["error"] is None  # the kernels ran: no silent fallback
    for (z, directions), (value, grad) in zip(cases, out["results"], strict=True):
        assert_float32_agreement(value, grad, z, directions)
    # The sums themselves, on a grid other than the default one, of the same float32 projections:
    # the rows in one segment, then split into three.
    t = 0.25 * torch.arange(9, dtype=torch.float64)
    tx = (cases[0][0].float() @ cases[0][1].float()).double().unsqueeze(-1) * t
    for sums in out["sums"]:
        for got, expected in zip(sums, (tx.cos().sum(0), tx.sin().sum(0)), strict=True):
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
