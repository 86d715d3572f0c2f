"""SIGReg across 2 real gloo processes equals one process on the concatenated batch."""

from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lejepa.objective.sigreg import SIGReg, sliced_epps_pulley

WORLD_SIZE = 2
DIM, SLICES = 8, 32
# Rows of each rank: uneven for the (N, D) batch, along dim 1 for the (V, N, D) one.
SPLIT_2D = [7, 13]
SPLIT_3D = [9, 9]
RANK_1_START_STEP = 7


def _rows(tensor: torch.Tensor, split: list[int], rank: int, dim: int) -> torch.Tensor:
    return tensor.split(split, dim=dim)[rank]


def _worker(
    rank: int,
    store: str,
    out_dir: str,
    batch_2d: torch.Tensor,
    batch_3d: torch.Tensor,
    directions: torch.Tensor,
) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60)
    )
    try:
        results = {}
        for name, batch, split, dim in (("2d", batch_2d, SPLIT_2D, 0), ("3d", batch_3d, SPLIT_3D, 1)):
            z = _rows(batch, split, rank, dim).clone().requires_grad_()
            value = sliced_epps_pulley(z, directions)
            value.backward()
            results[name] = (value.detach(), z.grad)

        module = SIGReg(num_slices=SLICES, seed=5)
        if rank == 1:  # e.g. resumed from a different checkpoint: rank 0's counter must win
            module.step.fill_(RANK_1_START_STEP)
        z = _rows(batch_2d, SPLIT_2D, rank, 0)
        results["module"] = (module(z).detach(), module.step.clone())
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _single_process(batch: torch.Tensor, directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = batch.clone().requires_grad_()
    value = sliced_epps_pulley(z, directions, distributed=False)
    value.backward()
    return value.detach(), z.grad


def test_two_gloo_ranks_give_the_statistic_and_gradients_of_the_concatenated_batch(tmp_path):
    generator = torch.Generator().manual_seed(0)
    batch_2d = torch.randn(sum(SPLIT_2D), DIM, generator=generator, dtype=torch.float64) * 1.2
    batch_3d = torch.randn(2, sum(SPLIT_3D), DIM, generator=generator, dtype=torch.float64) + 0.3
    directions = torch.randn(DIM, SLICES, generator=generator, dtype=torch.float64)
    directions /= directions.norm(dim=0)

    mp.spawn(
        _worker,
        args=(str(tmp_path / "store"), str(tmp_path), batch_2d, batch_3d, directions),
        nprocs=WORLD_SIZE,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]

    for name, batch, split, dim in (("2d", batch_2d, SPLIT_2D, 0), ("3d", batch_3d, SPLIT_3D, 1)):
        value, grad = _single_process(batch, directions)
        for rank, results in enumerate(ranks):
            rank_value, rank_grad = results[name]
            torch.testing.assert_close(rank_value, value, rtol=1e-12, atol=0)
            # Documented convention: each rank's samples get WORLD_SIZE x their single-process
            # gradient, which DDP's averaging over ranks cancels.
            expected_grad = WORLD_SIZE * _rows(grad, split, rank, dim)
            torch.testing.assert_close(rank_grad, expected_grad, rtol=1e-10, atol=1e-12)

    # The module's step was broadcast from rank 0 before drawing, so both ranks projected on the
    # step-0 directions: the statistic of one process with a fresh module on the whole batch.
    expected = SIGReg(num_slices=SLICES, seed=5)(batch_2d)
    for value, step in (results["module"] for results in ranks):
        assert step.item() == 1
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
