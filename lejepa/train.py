"""The pretrain stage's per-rank program: LeJEPA with DeepSpeed, from a dataset manifest to an encoder.

Run one copy per rank (the launcher in `lejepa.launch` does that; `python -m lejepa.train --config FILE`
alone is a one-process run). Each rank streams its share of the shards, makes the multi-crop views,
and steps a DeepSpeed engine on the LeJEPA loss, whose SIGReg term is computed over the global batch.
Restarting the same run resumes from its latest complete checkpoint: model, optimizer, scheduler, SIGReg
step, online probe, RNG and data position. It resumes only under what the checkpoint was trained with (the
model, views and loss sections, the dataset manifest and what fixes the data order: seed, batch size, loader
workers and number of ranks, as the run's config.json records them); anything else is refused, naming the
field. Every rank reads the one manifest `data.manifest` names (the pretrain stage sets it).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lejepa.checkpoint import CheckpointError, CheckpointStore
from lejepa.cli import config_from, run_stage, stage_parser
from lejepa.config import ConfigError, PipelineConfig, redacted
from lejepa.data import TrainStream
from lejepa.export import DESCRIPTION, encoder_description, export_encoder, warm_start
from lejepa.loss import LeJEPALoss, lejepa_loss
from lejepa.model import Encoder, keep_norm_statistics_fp32
from lejepa.precision import describe, resolve_precision
from lejepa.shard import ShardManifest, locate_manifest
from lejepa.sigreg import SIGReg
from lejepa.storage import Storage
from lejepa.views import MultiCropViews
from lejepa.with_parent import die_with_parent


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as the latest."""


class ResumeRefused(ConfigError):
    """A run cannot resume under settings other than those its checkpoint was trained with."""


@dataclass
class TrainSummary:
    run_dir: str
    checkpoint: str
    encoder: str
    steps: int
    final_loss: float
    manifest: str
    """The dataset manifest every rank trained on."""


class LeJEPAModel(nn.Module):
    """What DeepSpeed trains: encoder + projector with the loss, so one forward gives the loss."""

    def __init__(self, encoder: Encoder, sigreg: SIGReg, lamb: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.sigreg = sigreg
        self.lamb = lamb

    def forward(self, global_views: Tensor, local_views: Tensor) -> tuple[LeJEPALoss, Tensor]:
        embeddings, projections = self.encoder.forward_views(global_views, local_views)
        return lejepa_loss(projections, global_views.shape[0], self.sigreg, self.lamb), embeddings


class OnlineProbe:
    """A linear classifier on detached global-view embeddings, trained beside the encoder.

    It has its own optimizer outside DeepSpeed, so it can neither change the encoder's gradients nor
    enter the gradient-norm clipping; its gradients are averaged over ranks to keep replicas equal.
    """

    def __init__(
        self, embed_dim: int, num_classes: int, device: torch.device, seed: int, lr: float = 1e-3
    ) -> None:
        with torch.random.fork_rng(devices=[]):  # the same head on every rank, whatever its RNG
            torch.manual_seed(seed)
            self.head = nn.Linear(embed_dim, num_classes).to(device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=1e-6)

    def step(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """One update; returns [loss, accuracy] on the device, so the training step never waits for it.

        Unlabelled samples (label -1, e.g. a partly labelled webdataset) are left out; a batch without
        labels updates nothing and reports 0.
        """
        features = embeddings.detach().float().flatten(0, 1)
        targets = labels.repeat(embeddings.shape[0])
        logits = self.head(features)
        labelled = targets >= 0
        count = labelled.sum().clamp(min=1)
        loss = nn.functional.cross_entropy(logits, targets, ignore_index=-1, reduction="sum") / count
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dist.is_initialized() and dist.get_world_size() > 1:
            for p in self.head.parameters():
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        self.optimizer.step()
        correct = ((logits.argmax(1) == targets) & labelled).sum()
        return torch.stack([loss.detach(), correct / count])

    def state_dict(self) -> dict[str, Any]:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])


def _is_vit(backbone: str) -> bool:
    return any(key in backbone for key in ("vit", "deit", "eva", "beit"))


def deepspeed_config(cfg: PipelineConfig, world_size: int, use_cuda: bool) -> dict[str, Any]:
    """The DeepSpeed JSON for this run; keys of `pretrain.deepspeed_config` (a file) override ours."""
    p = cfg.pretrain
    bf16 = resolve_precision(p.precision, "cuda" if use_cuda else "cpu") == "bf16"
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": p.batch_size,
        "gradient_accumulation_steps": p.grad_accum,
        "train_batch_size": p.batch_size * p.grad_accum * world_size,
        "gradient_clipping": p.grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": p.zero_stage},
        # Our optimizer is plain torch AdamW (DeepSpeed's fused one needs CUDA): allow it under ZeRO.
        "zero_allow_untested_optimizer": True,
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
    return _merge(generated, override)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (
            _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        )
    return merged


def warmup_cosine(step: int, total_steps: int, warmup_fraction: float, min_ratio: float) -> float:
    """LR multiplier at `step`: linear warm-up over the first steps, then a cosine down to `min_ratio`."""
    warmup = max(1, int(total_steps * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class StepBudget:
    """How many steps the run takes: fixed, or under `pretrain.time_budget_s` re-estimated from the pace.

    `update` gets the same numbers on every rank (the slowest rank's training seconds), so every rank
    computes the same total, the same learning rate and stops at the same step.
    """

    def __init__(self, upper: int, seconds: float | None, step: int, trained_s: float) -> None:
        self.total, self.upper, self.seconds = upper, upper, seconds
        self.since_step, self.since_s = step, trained_s  # where this attempt's pace is measured from

    def update(self, step: int, trained_s: float) -> None:
        if self.seconds is None or step <= self.since_step:
            return
        pace = (trained_s - self.since_s) / (step - self.since_step)
        remaining = max(0.0, self.seconds - trained_s)
        self.total = min(self.upper, step + int(remaining / max(pace, 1e-9)))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Norm weights and biases are 1-D: decaying them only shrinks the scales LayerNorm/BN learn.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the launcher's process group (or make a group of one); returns rank, world size, device."""
    import deepspeed

    if "RANK" not in os.environ:  # started by hand: a group of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    use_cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def _rng_state() -> dict[str, Any]:
    # Plain ints, lists and tensors only: checkpoints load with weights_only=True, which refuses numpy arrays.
    generator, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [generator, key.tolist(), pos, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def agreed_manifest(cfg: PipelineConfig, storage: Storage) -> str:
    """The manifest every rank trains on: `data.manifest`, which the pretrain stage sets (or what each rank
    resolves when a rank program is started by hand); refused when the ranks do not all name the same one."""
    url = locate_manifest(cfg, storage)
    urls: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(urls, url)
    if len(set(urls)) > 1:
        other = next(rank for rank, u in enumerate(urls) if u != urls[0])
        raise ConfigError(
            f"data.manifest: the ranks read different datasets (rank 0: {urls[0]}, rank {other}: "
            f"{urls[other]}): set data.manifest to one of them for every node"
        )
    return url


RESUME_SECTIONS = ("model", "views", "loss")
"""Config sections a checkpoint's weights and optimizer state were trained under."""
DATA_ORDER = ("data.manifest", "seed", "pretrain.batch_size", "pretrain.num_workers", "world_size")
"""What fixes each sample's place in the data order (a checkpoint's data position counts batches per rank
and loader worker): resuming under other values would see some samples of the epoch twice and skip others."""
_ABSENT = object()


def _lookup(tree: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return _ABSENT
        tree = tree[key]
    return tree


def check_resume(run_url: str, stored: dict[str, Any], launched: dict[str, Any]) -> None:
    """Refuse to resume run `run_url` when this launch's record (its config.json) differs from the stored one
    in a field the checkpoint depends on: ResumeRefused, one line naming the field, both values and the fix.

    A field one side lacks (added to or removed from the config since the run started) is not compared.
    """
    fields = [f"{section}.{key}" for section in RESUME_SECTIONS for key in stored.get(section) or {}]
    for name in [*fields, *DATA_ORDER]:
        old, new = _lookup(stored, name), _lookup(launched, name)
        if old is _ABSENT or new is _ABSENT or old == new:
            continue
        if name == "world_size":
            was, now = f"{old} ranks", f"{new}"
            fix = f"the original launch.nproc_per_node (and number of nodes), {old} ranks in all"
        else:
            was, now = f"{name}={json.dumps(old)}", json.dumps(new)
            fix = f"the original {name}={json.dumps(old)}"
        raise ResumeRefused(
            f"run {run_url} was checkpointed with {was}, this launch has {now}: resume it with {fix}, or "
            "start a new run with another pretrain.run_name"
        )


class Progress:
    """A progress bar on a terminal; through a launcher's pipes, a plain line every `log_every` steps."""

    def __init__(self, total: int, initial: int, log_every: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.total, self.log_every = total, log_every
        self.enabled = enabled
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc="pretrain",
            unit="step",
            file=sys.stderr,
            disable=not (enabled and sys.stderr.isatty()),
        )

    def update(self, record: dict[str, Any]) -> None:
        self.bar.update(1)
        if record["step"] % self.log_every and record["step"] != self.total:
            return
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
        if self.enabled and self.bar.disable:
            parts = [
                f"step {record['step']}/{self.total}",
                f"loss {record['loss']:.4f}",
                f"prediction {record['prediction']:.4f}",
                f"sigreg {record['sigreg']:.4f}",
            ]
            if "probe_acc" in record:
                parts.append(f"probe acc {record['probe_acc']:.3f}")
            parts += [
                f"lr {record['lr']:.2e}",
                f"{record['images_per_s']:.0f} img/s",
                f"data wait {100 * record['data_wait']:.1f}%",
            ]
            print("[pretrain] " + "  ".join(parts), flush=True)

    def set_total(self, total: int) -> None:
        self.total = self.bar.total = total

    def close(self) -> None:
        self.bar.close()


class MetricsLog:
    """Rank 0's per-step JSON lines, kept locally and copied to the run folder at every checkpoint."""

    def __init__(self, storage: Storage, run_url: str) -> None:
        self.storage, self.url = storage, f"{run_url}/metrics.jsonl"
        self.local = storage.local_dir(run_url) / "metrics.jsonl"
        self.local.parent.mkdir(parents=True, exist_ok=True)

    def restart_at(self, step: int) -> None:
        """Keep the lines up to `step` (a resumed run repeats nothing after its checkpoint)."""
        lines = (
            self.storage.read_bytes(self.url).decode().splitlines() if self.storage.exists(self.url) else []
        )
        kept = [line for line in lines if line and json.loads(line)["step"] <= step]
        self.local.write_text("".join(line + "\n" for line in kept))

    def append(self, record: dict[str, Any]) -> None:
        with self.local.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def sync(self) -> None:
        if self.local.exists() and self.storage.protocol != "file":
            self.storage.put_file(self.local, self.url)


class DeviceViews:
    """Multi-crop views made on the training device from the uint8 batch the stream just yielded, with the
    generator the loader would have used for that batch (so a resumed run makes the same views)."""

    def __init__(self, views: MultiCropViews, stream: TrainStream) -> None:
        self.views, self.stream = views, stream

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.views(images, self.stream.last_batch_generator(images.device))


def train_step(
    engine: Any,
    batches: Iterator[tuple[Any, Tensor]],
    grad_accum: int,
    device: torch.device,
    dtype: torch.dtype,
    probe: OnlineProbe | None,
    device_views: DeviceViews | None,
) -> tuple[Tensor, float]:
    """One optimizer step over `grad_accum` micro-batches.

    Returns the statistics [loss, prediction, sigreg, probe loss, probe accuracy], averaged over the
    micro-batches and the ranks, as a tensor on the device (nothing here waits for the device: the
    all-reduce runs there too, as NCCL takes device tensors only), and the seconds spent waiting for data.
    """
    stats = torch.zeros(5, device=device)
    waited = 0.0
    for _ in range(grad_accum):
        tick = time.perf_counter()
        inputs, labels = next(batches)
        waited += time.perf_counter() - tick
        if device_views is not None:
            inputs = device_views(inputs.to(device, non_blocking=True))
        global_views, local_views = (v.to(device, non_blocking=True).to(dtype) for v in inputs)
        loss, embeddings = engine(global_views, local_views)
        engine.backward(loss.total)
        engine.step()
        stats[:3] += torch.stack([loss.total, loss.prediction, loss.sigreg]).detach().float()
        if probe is not None:
            stats[3:] += probe.step(embeddings[: global_views.shape[0]], labels.to(device, non_blocking=True))
    world = dist.get_world_size()
    if world > 1:
        dist.all_reduce(stats)
    return stats / (grad_accum * world), waited


class PendingSteps:
    """Steps whose statistics are still on the device; `flush` brings them back in one transfer."""

    def __init__(self, images_per_step: int, with_probe: bool) -> None:
        self.images_per_step, self.with_probe = images_per_step, with_probe
        self.stats: list[Tensor] = []
        self.host: list[dict[str, Any]] = []

    def add(self, stats: Tensor, step: int, epoch: int, lr: float, elapsed: float, waited: float) -> None:
        self.stats.append(stats)
        self.host.append(
            {
                "step": step,
                "epoch": epoch,
                "lr": lr,
                "images_per_s": self.images_per_step / elapsed,
                "data_wait": waited / elapsed,
            }
        )

    def flush(self) -> list[dict[str, Any]]:
        """The steps' metrics records, in order."""
        values = torch.stack(self.stats).double().cpu().tolist()
        records = []
        for host, (loss, prediction, sigreg, probe_loss, probe_acc) in zip(self.host, values, strict=True):
            record = {**host, "loss": loss, "prediction": prediction, "sigreg": sigreg}
            if self.with_probe:
                record.update(probe_loss=probe_loss, probe_acc=probe_acc)
            records.append(record)
        self.stats, self.host = [], []
        return records


def _check_finite(records: list[dict[str, Any]], engine: Any, tag: str, progress: Progress) -> None:
    """Stop every rank (they all hold the same reduced values) before anything non-finite is committed."""
    bad = next(
        (r for r in records if not all(map(math.isfinite, (r["loss"], r["prediction"], r["sigreg"])))), None
    )
    if bad is None and _weights_finite(engine):
        return
    progress.close()
    what = (
        f"loss is {bad['loss']} at step {bad['step']}"
        if bad
        else f"weights are not finite at step {records[-1]['step']}"
    )
    raise TrainingDiverged(
        f"{what}: lower pretrain.lr or raise loss.lamb; "
        f"the last good checkpoint ({tag or 'none'}) stays the latest"
    )


def _slowest(seconds: float, device: torch.device) -> float:
    """The largest of every rank's `seconds`: the number all ranks then agree on."""
    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def _weights_finite(engine: Any) -> bool:
    """Whether every rank's parameters (its ZeRO-3 partition, where parameters are partitioned) are finite."""
    params = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    device = next(engine.module.parameters()).device
    flags = [t.isfinite().all() for t in params if t.numel()]
    finite = torch.stack(flags).all().float() if flags else torch.ones((), device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def train(cfg: PipelineConfig) -> TrainSummary:
    """Train on every rank of the current launch; rank 0 returns the summary (others return it too)."""
    import deepspeed

    rank, world, device = init_distributed()
    p = cfg.pretrain
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)

    storage = Storage.from_config(cfg.storage)
    manifest_url = agreed_manifest(cfg, storage)
    manifest = ShardManifest.load(storage, manifest_url)
    run_url = storage.url("runs", p.run_name)
    checkpoints = CheckpointStore(storage, run_url)
    # The run's config.json: the config with the manifest it resolved to, and the number of ranks.
    record = {**redacted(cfg), "world_size": world}
    record["data"]["manifest"] = manifest_url
    config_url = f"{run_url}/config.json"
    if checkpoints.latest() is not None and storage.exists(config_url):
        check_resume(run_url, storage.read_json(config_url), record)

    views = MultiCropViews.from_config(
        cfg.views,
        resolution=manifest.image_size,
        channels=manifest.channels,
        mean=manifest.mean,
        std=manifest.std,
    )
    stream = TrainStream(
        manifest,
        storage,
        split="train",
        batch_size=p.batch_size,
        transform=None if cfg.views.on_device else views,
        num_workers=p.num_workers,
        seed=cfg.seed,
        rank=rank,
        world_size=world,
        pin_memory=device.type == "cuda",
    )
    micro_steps_per_epoch = stream.steps_per_epoch
    if micro_steps_per_epoch < p.grad_accum:
        raise ConfigError(
            f"pretrain.batch_size: {p.batch_size} x {world} ranks x {p.grad_accum} accumulation exceeds the "
            f"{manifest.num_samples['train']} training images: lower the batch size"
        )
    upper_steps = p.max_steps or max(1, int(p.epochs * micro_steps_per_epoch) // p.grad_accum)
    budget = StepBudget(upper_steps, p.time_budget_s, step=0, trained_s=0.0)  # replaced when resuming

    encoder = Encoder.from_config(cfg.model, in_chans=manifest.channels, img_size=views.global_size)
    if p.init_from:  # a resumed run's checkpoint, loaded below, replaces these weights
        warm_start(encoder, p.init_from, storage)
    model = LeJEPAModel(
        encoder, SIGReg(cfg.loss.num_slices, cfg.loss.knots, cfg.loss.t_max, seed=cfg.seed), cfg.loss.lamb
    )
    weight_decay = (
        p.weight_decay if p.weight_decay is not None else (5e-2 if _is_vit(cfg.model.backbone) else 5e-4)
    )
    ds_config = deepspeed_config(cfg, world, device.type == "cuda")
    optimizer = (
        None if "optimizer" in ds_config else torch.optim.AdamW(_param_groups(model, weight_decay), lr=p.lr)
    )
    scheduler = None
    if optimizer is not None and "scheduler" not in ds_config:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, budget.total, p.warmup_fraction, p.min_lr_ratio)
        )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    if dtype == torch.bfloat16:
        keep_norm_statistics_fp32(engine.module)  # bf16 parameters, fp32 BatchNorm statistics

    probe = (
        OnlineProbe(encoder.embed_dim, len(manifest.classes), device, seed=cfg.seed)
        if p.online_probe and manifest.classes
        else None
    )
    device_views = DeviceViews(views.to(device), stream) if cfg.views.on_device else None
    metrics = MetricsLog(storage, run_url)
    client_state = checkpoints.load(engine)
    step, trained_s = 0, 0.0
    if client_state is not None:
        step, trained_s = client_state["step"], client_state.get("trained_s", 0.0)
        budget.since_step, budget.since_s = step, trained_s
        stream.load_state_dict(client_state["data"])
        _set_rng_state(
            client_state["rng"][rank] if len(client_state["rng"]) == world else client_state["rng"][0]
        )
        if probe is not None and client_state.get("probe"):
            probe.load_state_dict(client_state["probe"])
    if rank == 0:
        metrics.restart_at(step)
        storage.write_json(config_url, record)
        print(
            f"[pretrain] run {run_url}: {'resuming at step ' + str(step) if step else 'starting'}, "
            f"{budget.total} steps{f' at most, {p.time_budget_s:g} s' if p.time_budget_s else ''}, "
            f"{world} rank(s), {manifest.num_samples['train']} training images of "
            f"{manifest_url}, precision {describe(p.precision, device.type)}",
            flush=True,
        )

    def save_checkpoint() -> str:
        rng = [None] * world
        dist.all_gather_object(rng, _rng_state())
        state = {
            "step": step,
            "data": stream.state_dict(),
            "rng": rng,
            "probe": probe.state_dict() if probe else None,
            "trained_s": trained_s,
        }
        tag = checkpoints.save(engine, step, state)
        if rank == 0:
            metrics.sync()
        return tag

    batches = iter(stream)
    progress = Progress(budget.total, step, p.log_every, enabled=rank == 0)
    tag = checkpoints.latest()["tag"] if step else ""
    pending = PendingSteps(p.batch_size * p.grad_accum * world, with_probe=probe is not None)
    final_loss = float("nan")
    skipped = engine.skipped_steps
    while step < budget.total:
        started = time.perf_counter()
        lr = engine.get_lr()[0]  # the rate this step uses (the scheduler advances inside engine.step)
        stats, waited = train_step(engine, batches, p.grad_accum, device, dtype, probe, device_views)
        step += 1
        elapsed = time.perf_counter() - started
        trained_s += elapsed
        pending.add(stats, step, stream.state_dict()["epoch"], lr, elapsed, waited)
        if step % p.checkpoint_every == 0 or step % p.log_every == 0 or step >= budget.total:
            # The only wait for the device between steps: statistics come back every log_every steps, and
            # before a commit, so nothing non-finite is ever committed.
            records = pending.flush()
            final_loss = records[-1]["loss"]
            _check_finite(records, engine, tag, progress)
            skipped, newly = engine.skipped_steps, engine.skipped_steps - skipped
            if newly and rank == 0:  # DeepSpeed drops a step whose gradients are not finite, silently
                print(
                    f"warning: {newly} of the last {len(records)} steps were skipped: their gradients were "
                    "not finite (try pretrain.precision=fp32 or a lower pretrain.lr)",
                    flush=True,
                )
            if p.time_budget_s is not None:
                trained_s = _slowest(trained_s, device)
                budget.update(step, trained_s)
                progress.set_total(budget.total)
            if rank == 0:
                for record in records:
                    metrics.append(record)
                    progress.update(record)
        if step % p.checkpoint_every == 0 or step >= budget.total:
            tag = save_checkpoint()
    progress.close()

    encoder_url = _export(engine, encoder, cfg, manifest, views, storage, run_url, rank)
    summary = TrainSummary(run_url, f"{checkpoints.url}/{tag}", encoder_url, step, final_loss, manifest_url)
    if rank == 0:
        storage.write_json(f"{run_url}/summary.json", asdict(summary))
    dist.barrier()
    return summary


def _export(
    engine: Any,
    encoder: Encoder,
    cfg: PipelineConfig,
    manifest: ShardManifest,
    views: MultiCropViews,
    storage: Storage,
    run_url: str,
    rank: int,
) -> str:
    """Write the backbone for `load_encoder`; under ZeRO-3 its parameters are gathered first."""
    import deepspeed

    description = encoder_description(
        cfg.model.backbone,
        cfg.model.backbone_kwargs,
        manifest.channels,
        views.global_size,
        cfg.model.small_input,
        encoder.embed_dim,
        views.mean.tolist(),
        views.std.tolist(),
        projector={
            "proj_dim": cfg.model.proj_dim,
            "proj_hidden_dim": cfg.model.proj_hidden_dim,
            "proj_layers": cfg.model.proj_layers,
        },
    )
    params = list(encoder.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_partition_weights()):
        if rank == 0:
            export_encoder(encoder.backbone, description, storage, run_url, projector=encoder.projector)
    dist.barrier()
    return f"{run_url}/{DESCRIPTION}"


def cli(argv: list[str] | None = None) -> int:
    # A rank outlives no launcher: one that kept training would write the run beside a retry's ranks.
    die_with_parent(signal.SIGKILL)
    args = stage_parser("python -m lejepa.train", __doc__.splitlines()[0]).parse_args(argv)
    # Every rank runs this; only rank 0 prints the summary line.
    return run_stage(lambda: _rank0_only(train(config_from(args))), TrainingDiverged, CheckpointError)


def _rank0_only(summary: TrainSummary) -> TrainSummary | None:
    return summary if int(os.environ.get("RANK", "0")) == 0 else None


if __name__ == "__main__":
    sys.exit(cli())
