"""Building what a rank trains: the process group, the LeJEPA model and its DeepSpeed engine.

`build_engine` wraps the encoder and the loss in one module (one forward gives the loss), gives it
`DeviceAdamW` (torch's fused AdamW, clipping and skipping non-finite steps on the device) with the
warm-up + cosine schedule, and hands both to `deepspeed.initialize` with the JSON `deepspeed_config`
makes from the pretrain section.

Nothing in a training step waits for the device. DeepSpeed does by default, several times a step: its
throughput timer synchronizes the device around every step, and under bf16 its overflow check and its
gradient clipping each read a value back to the host. The generated JSON turns the three off, and the
optimizer clips and skips instead. ZeRO 1-3 mark a gradient norm that is not finite with a constant
that DeepSpeed copies from the host at every step: `_mask_non_finite` replaces that masking. (With a
DeepSpeed optimizer from `pretrain.deepspeed_config`, DeepSpeed clips and checks again. Two paths keep
a wait: ZeRO-3, whose step checks its norm on the host, and ZeRO 1-2 in fp32, likewise.) Under ZeRO-0,
bf16 is torch's autocast over fp32 parameters, as in a plain PyTorch loop: DeepSpeed's bf16 wrapper
there would read every gradient back at each step.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lejepa.config import ConfigError, PipelineConfig
from lejepa.objective.loss import LeJEPALoss, lejepa_loss
from lejepa.objective.model import Encoder, keep_norm_statistics_fp32
from lejepa.objective.sigreg import SIGReg
from lejepa.train.optimizer import DeviceAdamW
from lejepa.train.precision import resolve_precision
from lejepa.train.schedule import warmup_cosine


class LeJEPAModel(nn.Module):
    """What DeepSpeed trains: encoder + projector with the loss, so one forward gives the loss.

    With `autocast`, the forward runs under torch's bf16 autocast (fp32 parameters, bf16 matmuls and
    convolutions), as a plain PyTorch loop does; SIGReg and the loss turn it off for their own arithmetic.
    """

    def __init__(self, encoder: Encoder, sigreg: SIGReg, lamb: float, autocast: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.sigreg = sigreg
        self.lamb = lamb
        self.autocast = autocast

    def forward(self, global_views: Tensor, local_views: Tensor) -> tuple[LeJEPALoss, Tensor]:
        with torch.autocast(global_views.device.type, torch.bfloat16, enabled=self.autocast):
            embeddings, projections = self.encoder.forward_views(global_views, local_views)
            return lejepa_loss(projections, global_views.shape[0], self.sigreg, self.lamb), embeddings


# DeepSpeed announces on stdout, on every rank of every CPU run, that it loaded its CPU collectives.
_START_NOISE = "deepspeed_shm_comm_op built successfully"


@contextlib.contextmanager
def _lines_left_out(noise: str) -> Iterator[None]:
    """What the block prints on stdout, less the lines that hold `noise`."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        kept = [line for line in printed.getvalue().splitlines(keepends=True) if noise not in line]
        sys.stdout.write("".join(kept))
        sys.stdout.flush()


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the launcher's process group (or make a group of one); returns rank, world size, device."""
    use_cuda = torch.cuda.is_available()
    if not use_cuda:  # torch's C++ extension module warns of the missing CUDA runtime on import
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import deepspeed

    if "RANK" not in os.environ:  # started by hand: a group of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    with _lines_left_out(_START_NOISE):
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def deepspeed_config(cfg: PipelineConfig, world_size: int, use_cuda: bool) -> dict[str, Any]:
    """The DeepSpeed JSON for this run; keys of `pretrain.deepspeed_config` (a file) override ours."""
    p = cfg.pretrain
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": p.batch_size,
        "gradient_accumulation_steps": p.grad_accum,
        "train_batch_size": p.batch_size * p.grad_accum * world_size,
        # DeviceAdamW clips at pretrain.grad_clip and skips non-finite steps without a host read.
        "gradient_clipping": 0.0,
        "bf16": {"enabled": _bf16_parameters(cfg, use_cuda), "check_grad_overflow": False},
        # ZeRO 1-2 copy each gradient into a contiguous buffer as it is produced, at about seven operator
        # calls a parameter on the host (1,127 of a ViT-Tiny step's 6,401: benchmarks/step_calls.py), and
        # such calls bound a small step on a GPU. Without it a bucket is flattened once when it is reduced.
        # Turn it back on in `pretrain.deepspeed_config` for models big enough to fragment GPU memory.
        "zero_optimization": {"stage": p.zero_stage, "contiguous_gradients": False},
        # Our optimizer is torch's AdamW, not one of DeepSpeed's: allow it under ZeRO.
        "zero_allow_untested_optimizer": True,
        # The throughput timer would synchronize the device at the start and end of every step.
        "timers": {"throughput": {"enabled": False}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if p.deepspeed_config is None:
        return generated
    path = Path(p.deepspeed_config)
    if not path.is_file():
        raise ConfigError(f"pretrain.deepspeed_config: {path} does not exist: pass a DeepSpeed JSON file")
    try:
        override = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"pretrain.deepspeed_config: {path} is not valid JSON: {exc}") from None
    merged = _merge(generated, override)
    if "optimizer" in override:  # DeepSpeed's own optimizer: DeepSpeed clips and checks, unless told not to
        merged["gradient_clipping"] = override.get("gradient_clipping", p.grad_clip)
        merged["bf16"]["check_grad_overflow"] = override.get("bf16", {}).get("check_grad_overflow", True)
    return merged


DEEPSPEED_FLOOR = (0, 19, 8)
"""The oldest DeepSpeed this runs on. 0.19.7 combined ZeRO's -1 mark of a non-finite group norm into a
finite global norm, so `DeviceAdamW` stepped on NaN gradients instead of skipping the step; older ones
cannot say whether ZeRO computes the norm (`zero_compute_grad_norm`)."""


def require_deepspeed(version: str) -> None:
    """Refuse a DeepSpeed older than `DEEPSPEED_FLOOR`, with the command that fixes it."""
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:3])
    if found < DEEPSPEED_FLOOR:
        floor = ".".join(map(str, DEEPSPEED_FLOOR))
        raise ConfigError(
            f"DeepSpeed {version} is older than {floor}, the oldest this pipeline trains with: "
            f"pip install 'deepspeed>={floor}'"
        )


def _bf16(cfg: PipelineConfig, use_cuda: bool) -> bool:
    return resolve_precision(cfg.pretrain.precision, "cuda" if use_cuda else "cpu") == "bf16"


def trains_in_bf16(cfg: PipelineConfig, use_cuda: bool) -> bool:
    """Whether the step computes in bf16, either way: autocast, or DeepSpeed's bf16 mode (which a
    `pretrain.deepspeed_config` may also turn on)."""
    return _bf16(cfg, use_cuda) or deepspeed_config(cfg, 1, use_cuda)["bf16"]["enabled"]


def _bf16_parameters(cfg: PipelineConfig, use_cuda: bool) -> bool:
    """Whether bf16 runs as DeepSpeed's bf16 mode (bf16 parameters, fp32 master copies in the ZeRO
    optimizer): under ZeRO 1-3. Under ZeRO-0 it runs as torch's autocast instead (`LeJEPAModel`): there
    DeepSpeed wraps the optimizer in one that reads every gradient back to the host at each step."""
    return _bf16(cfg, use_cuda) and cfg.pretrain.zero_stage > 0


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (
            _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        )
    return merged


def _is_vit(backbone: str) -> bool:
    return any(key in backbone for key in ("vit", "deit", "eva", "beit"))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Norm weights and biases are 1-D: decaying them only shrinks the scales LayerNorm/BN learn.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(
    cfg: PipelineConfig, encoder: Encoder, world: int, device: torch.device, total_steps: Callable[[], int]
) -> tuple[Any, torch.dtype, DeviceAdamW | None]:
    """The DeepSpeed engine that trains `encoder` on the LeJEPA loss, the dtype its inputs take, and our
    optimizer inside it (None when `pretrain.deepspeed_config` brings DeepSpeed's own).

    `total_steps` is read at every scheduler step: under a time budget the step count moves, and the
    cosine follows it.
    """
    import deepspeed

    require_deepspeed(deepspeed.__version__)
    p = cfg.pretrain
    sigreg = SIGReg(cfg.loss.num_slices, cfg.loss.knots, cfg.loss.t_max, seed=cfg.seed)
    use_cuda = device.type == "cuda"
    ds_config = deepspeed_config(cfg, world, use_cuda)
    bf16_parameters = ds_config["bf16"]["enabled"]
    model = LeJEPAModel(encoder, sigreg, cfg.loss.lamb, autocast=_bf16(cfg, use_cuda) and not bf16_parameters)
    optimizer, scheduler = None, None
    if "optimizer" not in ds_config:
        vit = _is_vit(cfg.model.backbone)
        weight_decay = p.weight_decay if p.weight_decay is not None else (5e-2 if vit else 5e-4)
        optimizer = DeviceAdamW(_param_groups(model, weight_decay), lr=p.lr, max_norm=p.grad_clip)
        if "scheduler" not in ds_config:
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                lambda step: warmup_cosine(step, total_steps(), p.warmup_fraction, p.min_lr_ratio),
            )
    _without_host_copies()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if world == 1 and not engine.zero_optimization():
        # One rank has nothing to average: DeepSpeed's all-reduce would copy each gradient into a bucket
        # and back at every step (benchmarks/step_calls.py).
        engine.enable_backward_allreduce = False
    if optimizer is not None and engine.zero_optimization():
        # ZeRO steps the optimizer one partition at a time, after computing the norm of all of them.
        if not engine.zero_compute_grad_norm():
            raise ConfigError(
                "pretrain.deepspeed_config: zero_optimization.compute_grad_norm is off, and gradient "
                "clipping needs the norm: remove the setting"
            )
        zero = engine.optimizer
        optimizer.global_norm = lambda: zero._global_grad_norm
    if not bf16_parameters:  # fp32, or bf16 by autocast: the inputs stay fp32
        return engine, torch.float32, optimizer
    keep_norm_statistics_fp32(engine.module)  # bf16 parameters, fp32 BatchNorm statistics
    return engine, torch.bfloat16, optimizer


def _mask_non_finite(norm: Tensor, device: Any = None, val: float = -1.0) -> None:
    """DeepSpeed's `mask_nan_or_inf_with_val_inplace`, without its host copy: the norm's non-finite
    entries become `val` (-1, DeepSpeed's mark of a norm that is not finite).

    DeepSpeed builds its -1 as `torch.tensor(-1.0, device=device)` at every step, a copy from pageable
    host memory that makes the host wait for the GPU to drain. A Python scalar needs no copy.
    """
    norm.masked_fill_(~torch.isfinite(norm), val)


def _without_host_copies() -> None:
    """Point DeepSpeed's ZeRO modules at `_mask_non_finite` (those that have the function)."""
    import deepspeed.runtime.zero.stage3 as stage3
    import deepspeed.runtime.zero.stage_1_and_2 as stage_1_and_2

    for module in (stage_1_and_2, stage3):
        if hasattr(module, "mask_nan_or_inf_with_val_inplace"):
            module.mask_nan_or_inf_with_val_inplace = _mask_non_finite


def follow_schedule(engine: Any) -> None:
    """Set the optimizer's rate to what our schedule gives at the engine's step, now.

    A checkpoint holds the rate its schedule set for the next step. A run resumed under a new total
    (a raised `max_steps`, a re-estimated time budget) would take its first step at that old rate.
    """
    scheduler = engine.lr_scheduler
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # DeepSpeed's own scheduler
        return
    groups = scheduler.optimizer.param_groups
    for group, base, rate in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * rate(scheduler.last_epoch)
