"""The pretrain stage's per-rank program: LeJEPA with DeepSpeed, from a dataset manifest to an encoder.

Run one copy per rank (the launcher in `lejepa.train.launch` does that; `python -m lejepa.train.rank --config
FILE` alone is a one-process run). Each rank streams its share of the shards, makes the multi-crop views, and
steps a DeepSpeed engine on the LeJEPA loss, whose SIGReg term is computed over the global batch. Every rank
reads the one manifest `data.manifest` names (the pretrain stage sets it).

`train` reads top to bottom: the run's inputs (`_prepare`), the engine (`lejepa.train.engine`), the checkpoint
manager that restores every stateful part of a resumed run (`lejepa.train.checkpoint`; what a run may resume
under is `lejepa.train.resume`'s), the loop (`Trainer`, one `train_step` per optimizer step), the export.
Rank 0 also mirrors the run to the trackers `tracking` turns on (`lejepa.tracking`), from the records it
already has on the host at each flush.

SIGTERM (a Slurm requeue, preemption, time limit or scancel; a launcher stopping its ranks; a pod's
eviction) stops the run at its next log step with a checkpoint committed (`StopRequest`): a new launch
resumes from it. The rank then exits with status 143.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from lejepa.cli import config_from, run_stage, stage_parser
from lejepa.config import ConfigError, PipelineConfig, PretrainConfig, redacted
from lejepa.data.manifest import ShardManifest, locate_manifest
from lejepa.data.stream import TrainStream
from lejepa.objective.model import Encoder
from lejepa.objective.views import MultiCropViews
from lejepa.store import layout
from lejepa.store.storage import Storage
from lejepa.tracking import Tracker, dataset_tags, training_point
from lejepa.train.checkpoint import CheckpointError, CheckpointManager, CheckpointStore, TrainingDiverged
from lejepa.train.engine import build_engine, follow_schedule, init_distributed
from lejepa.train.export import encoder_description, export_encoder, warm_start
from lejepa.train.online_probe import OnlineProbe
from lejepa.train.optimizer import DeviceAdamW
from lejepa.train.precision import describe
from lejepa.train.resume import check_resume
from lejepa.train.schedule import StepBudget
from lejepa.train.training_log import MetricsLog, Progress
from lejepa.with_parent import die_with_parent


@dataclass
class TrainSummary:
    run_dir: str
    checkpoint: str
    encoder: str
    steps: int
    final_loss: float
    manifest: str
    """The dataset manifest every rank trained on."""


@dataclass
class RunInputs:
    """What a rank reads before it builds anything: the run, its dataset, and how batches become views."""

    storage: Storage
    url: str
    manifest_url: str
    manifest: ShardManifest
    record: dict[str, Any]
    """The run's config.json: the config with the manifest it resolved to, and the number of ranks."""
    views: MultiCropViews
    stream: TrainStream


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


def _prepare(cfg: PipelineConfig, rank: int, world: int, device: torch.device) -> RunInputs:
    """Resolve the dataset, refuse a resume under other settings, and set up the views and the stream."""
    storage = Storage.from_config(cfg.storage)
    manifest_url = agreed_manifest(cfg, storage)
    manifest = ShardManifest.load(storage, manifest_url)
    url = layout.run_url(storage, cfg.pretrain.run_name)
    record = {**redacted(cfg), "world_size": world}
    record["data"]["manifest"] = manifest_url
    config_url = f"{url}/{layout.CONFIG}"
    if CheckpointStore(storage, url).latest() is not None and storage.exists(config_url):
        check_resume(url, storage.read_json(config_url), record)
    views = MultiCropViews.from_config(
        cfg.views,
        resolution=manifest.longer_side,
        channels=manifest.channels,
        mean=manifest.mean,
        std=manifest.std,
    )
    stream = TrainStream(
        manifest,
        storage,
        split="train",
        batch_size=cfg.pretrain.batch_size,
        transform=None if cfg.views.on_device else views,
        num_workers=cfg.pretrain.num_workers,
        seed=cfg.seed,
        rank=rank,
        world_size=world,
        pin_memory=device.type == "cuda",
    )
    return RunInputs(storage, url, manifest_url, manifest, record, views, stream)


def _step_budget(p: PretrainConfig, run: RunInputs, world: int) -> StepBudget:
    micro_steps_per_epoch = run.stream.steps_per_epoch
    if micro_steps_per_epoch < p.grad_accum:
        raise ConfigError(
            f"pretrain.batch_size: {p.batch_size} x {world} ranks x {p.grad_accum} accumulation exceeds the "
            f"{run.manifest.num_samples['train']} training images: lower the batch size"
        )
    upper = p.max_steps or max(1, int(p.epochs * micro_steps_per_epoch) // p.grad_accum)
    return StepBudget(upper, p.time_budget_s)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def train(cfg: PipelineConfig, stop: StopRequest | None = None) -> TrainSummary:
    """Train on every rank of the current launch; every rank returns the summary. A `stop` request ends
    the run early, at a committed step (TrainingStopped)."""
    rank, world, device = init_distributed()
    _seed(cfg.seed + rank)
    run = _prepare(cfg, rank, world, device)
    budget = _step_budget(cfg.pretrain, run, world)
    encoder = Encoder.from_config(cfg.model, in_chans=run.manifest.channels, img_size=run.views.global_size)
    if cfg.pretrain.init_from:  # a resumed run's checkpoint, restored below, replaces these weights
        warm_start(encoder, cfg.pretrain.init_from, run.storage)
    engine, dtype, optimizer = build_engine(cfg, encoder, world, device, lambda: budget.total)
    classes = len(run.manifest.classes) if cfg.pretrain.online_probe and run.manifest.classes else 0
    probe = OnlineProbe(encoder.embed_dim, classes, device, seed=cfg.seed) if classes else None
    checkpoints = CheckpointManager(CheckpointStore(run.storage, run.url), engine, run.stream, probe)
    if checkpoints.restore():
        budget.resume_at(checkpoints.step, checkpoints.trained_s)
        follow_schedule(engine)
    if rank == 0:
        run.storage.write_json(f"{run.url}/{layout.CONFIG}", run.record)
        _announce(cfg, run, budget, checkpoints.step, world, device)

    views = DeviceViews(run.views.to(device), run.stream) if cfg.views.on_device else None
    train_step = TrainStep(engine, optimizer, cfg.pretrain.grad_accum, device, dtype, probe, views, stop)
    with _tracker(cfg, run, checkpoints.step, rank) as tracker:
        final_loss = Trainer(cfg.pretrain, run, budget, checkpoints, train_step, rank, tracker).run()

    encoder_url = _export(engine, encoder, cfg, run, rank)
    checkpoint = f"{checkpoints.store.url}/{checkpoints.tag}"
    summary = TrainSummary(run.url, checkpoint, encoder_url, checkpoints.step, final_loss, run.manifest_url)
    if rank == 0:
        run.storage.write_json(f"{run.url}/{layout.SUMMARY}", asdict(summary))
    dist.barrier()
    return summary


def _tracker(cfg: PipelineConfig, run: RunInputs, step: int, rank: int) -> Tracker:
    """Rank 0's trackers (the others have none), given the run's config and dataset."""
    if rank != 0:
        return Tracker.off()
    tracker = Tracker.for_run(cfg, run.storage, run.url, first_step=step)
    tracker.log_params(run.record)
    tracker.set_tags(dataset_tags(run.manifest_url, run.manifest.name, run.manifest.version))
    return tracker


def _announce(
    cfg: PipelineConfig, run: RunInputs, budget: StepBudget, step: int, world: int, device: torch.device
) -> None:
    p = cfg.pretrain
    print(
        f"[pretrain] run {run.url}: {'resuming at step ' + str(step) if step else 'starting'}, "
        f"{budget.total} steps{f' at most, {p.time_budget_s:g} s' if p.time_budget_s else ''}, "
        f"{world} rank(s), {run.manifest.num_samples['train']} training images of "
        f"{run.manifest_url}, precision {describe(p.precision, device.type)}",
        flush=True,
    )


class TrainingStopped(Exception):
    """The run stopped early on request (SIGTERM), its latest step committed."""


class StopRequest:
    """A request to stop, set by SIGTERM. A rank cannot stop alone (the next collective would hang its
    peers), so the request travels with the step's statistics, which every rank all-reduces: every rank
    sees it in the same step, at the next flush, and stops there after a commit."""

    def __init__(self) -> None:
        self.requested = False

    @classmethod
    def on_sigterm(cls) -> StopRequest:
        request = cls()

        def note(signum: int, frame: object) -> None:
            request.requested = True

        signal.signal(signal.SIGTERM, note)
        return request


class DeviceViews:
    """Multi-crop views made on the training device from the uint8 batch the stream just yielded, with the
    generator the loader would have used for that batch (so a resumed run makes the same views)."""

    def __init__(self, views: MultiCropViews, stream: TrainStream) -> None:
        self.views, self.stream = views, stream

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.views(images, self.stream.last_batch_generator(images.device))


@dataclass
class TrainStep:
    """One optimizer step over `grad_accum` micro-batches, with what stays the same from step to step."""

    engine: Any
    optimizer: DeviceAdamW | None
    grad_accum: int
    device: torch.device
    dtype: torch.dtype
    probe: OnlineProbe | None
    device_views: DeviceViews | None
    stop: StopRequest | None = None

    def __call__(self, batches: Iterator[tuple[Any, Tensor]]) -> tuple[Tensor, float]:
        """Returns the statistics [loss, prediction, sigreg, probe loss, probe accuracy, stop requested],
        averaged over the micro-batches and the ranks (stop > 0: some rank was asked to stop), then the
        optimizer's [gradient norm, skipped], as a tensor on the
        device (nothing here waits for the device: the all-reduce runs there too, as NCCL takes device
        tensors only), and the seconds spent waiting for data.
        """
        device, engine = self.device, self.engine
        stats = torch.zeros(6, device=device)
        if self.stop is not None and self.stop.requested:
            stats[5] = 1.0
        waited = 0.0
        for _ in range(self.grad_accum):
            tick = time.perf_counter()
            inputs, labels = next(batches)
            waited += time.perf_counter() - tick
            if self.device_views is not None:
                inputs = self.device_views(inputs.to(device, non_blocking=True))
            global_views, local_views = (v.to(device, non_blocking=True).to(self.dtype) for v in inputs)
            loss, embeddings = engine(global_views, local_views)
            engine.backward(loss.total)
            engine.step()
            stats[:3] += torch.stack([loss.total, loss.prediction, loss.sigreg]).detach().float()
            if self.probe is not None:
                labels = labels.to(device, non_blocking=True)
                stats[3:5] += self.probe.step(embeddings[: global_views.shape[0]], labels)
        world = dist.get_world_size()
        if world > 1:
            dist.all_reduce(stats)
        return torch.cat([stats / (self.grad_accum * world), self._optimizer_outcome()]), waited

    def _optimizer_outcome(self) -> Tensor:
        """[gradient norm before clipping, 1 if skipped else 0] of the latest optimizer step; [NaN, 0] when
        DeepSpeed's own optimizer steps (it reports skips through `engine.skipped_steps`)."""
        o = self.optimizer
        if o is None or o.last_norm is None or o.last_skipped is None:
            nan = torch.full((1,), float("nan"), device=self.device)
            return torch.cat([nan, torch.zeros(1, device=self.device)])
        return torch.stack([o.last_norm, o.last_skipped])


class PendingSteps:
    """Steps whose statistics are still on the device; `flush` brings them back in one transfer."""

    def __init__(self, images_per_step: int, with_probe: bool) -> None:
        self.images_per_step, self.with_probe = images_per_step, with_probe
        self.stats: list[Tensor] = []
        self.host: list[dict[str, Any]] = []
        self.stop_requested = False

    def add(self, stats: Tensor, step: int, epoch: int, lr: float, elapsed: float, waited: float) -> None:
        self.stats.append(stats)
        self.host.append({"step": step, "epoch": epoch, "lr": lr, "seconds": elapsed, "waited": waited})

    def flush(self) -> tuple[list[dict[str, Any]], float]:
        """The steps' metrics records, in order, and the seconds spent waiting for the device to finish them.

        On a GPU the host runs ahead of the device: a step's own host time is little more than the time
        to launch its kernels, and the rest of the device's work is waited for here. The wait is shared
        evenly by the pending steps, so their images/s and data-wait fractions follow the device's pace.
        """
        tick = time.perf_counter()
        values = torch.stack(self.stats).double().cpu().tolist()
        drained = time.perf_counter() - tick
        records = []
        for host, (loss, prediction, sigreg, probe_loss, probe_acc, stop, grad_norm, skipped) in zip(
            self.host, values, strict=True
        ):
            seconds = host["seconds"] + drained / len(self.host)
            record = {
                "step": host["step"],
                "epoch": host["epoch"],
                "lr": host["lr"],
                "images_per_s": self.images_per_step / seconds,
                "data_wait": host["waited"] / seconds,
                "loss": loss,
                "prediction": prediction,
                "sigreg": sigreg,
            }
            if self.with_probe:
                record.update(probe_loss=probe_loss, probe_acc=probe_acc)
            if math.isfinite(grad_norm) and grad_norm >= 0:
                record["grad_norm"] = grad_norm
            if skipped:
                record["skipped"] = True
            self.stop_requested |= stop > 0
            records.append(record)
        self.stats, self.host = [], []
        return records, drained


def _slowest(seconds: float, device: torch.device) -> float:
    """The largest of every rank's `seconds`: the number all ranks then agree on."""
    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    if dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


class Trainer:
    """The loop: steps until the budget is spent. Statistics come back every `log_every` steps and before
    every commit (the only wait for the device between steps); every `checkpoint_every` steps and at the
    end, the checkpoint manager commits every part."""

    def __init__(
        self,
        p: PretrainConfig,
        run: RunInputs,
        budget: StepBudget,
        checkpoints: CheckpointManager,
        train_step: TrainStep,
        rank: int,
        tracker: Tracker | None = None,
    ) -> None:
        self.p, self.inputs, self.budget, self.checkpoints = p, run, budget, checkpoints
        self.train_step, self.rank = train_step, rank
        self.tracker = tracker or Tracker.off()
        world = dist.get_world_size()
        self.pending = PendingSteps(
            p.batch_size * p.grad_accum * world, with_probe=train_step.probe is not None
        )
        self.metrics = MetricsLog(run.storage, run.url)
        if rank == 0:
            self.metrics.restart_at(checkpoints.step)
        self.progress = Progress(budget.total, checkpoints.step, p.log_every, enabled=rank == 0)
        self.skipped = train_step.engine.skipped_steps
        self.final_loss = float("nan")

    def run(self) -> float:
        """Train to the end of the budget; returns the last step's loss."""
        batches, state, p = iter(self.inputs.stream), self.checkpoints, self.p
        engine = self.train_step.engine
        try:
            while state.step < self.budget.total:
                started = time.perf_counter()
                lr = engine.get_lr()[0]  # this step's rate (the scheduler advances in engine.step)
                stats, waited = self.train_step(batches)
                state.step += 1
                elapsed = time.perf_counter() - started
                state.trained_s += elapsed
                epoch = self.inputs.stream.state_dict()["epoch"]
                self.pending.add(stats, state.step, epoch, lr, elapsed, waited)
                due = state.step % p.checkpoint_every == 0 or state.step % p.log_every == 0
                if due or self._done() or self.budget.due(state.step):
                    self._flush()
                stopping = self.pending.stop_requested
                if state.step % p.checkpoint_every == 0 or self._done() or stopping:
                    if self.rank == 0:  # the log first: a resume trims what lies past its checkpoint
                        self.metrics.sync()
                        self.tracker.sync()
                    state.commit()
                if stopping:
                    raise TrainingStopped(
                        f"stopped at step {state.step} on SIGTERM, checkpoint {state.tag} committed: "
                        "a new launch of the run resumes from it"
                    )
        finally:
            self.progress.close()
        return self.final_loss

    def _done(self) -> bool:
        return self.checkpoints.step >= self.budget.total

    def _flush(self) -> None:
        """Bring the pending steps' statistics back, check them, re-plan a timed run, and log them."""
        records, drained = self.pending.flush()
        self.final_loss = records[-1]["loss"]
        state = self.checkpoints
        state.trained_s += drained
        state.verify(records)
        engine = self.train_step.engine
        # Ours (DeviceAdamW) or DeepSpeed's own optimizer (with a DeepSpeed optimizer, or under ZeRO-3)
        # dropped the steps whose gradients were not finite, silently.
        newly = sum(1 for r in records if r.get("skipped")) + engine.skipped_steps - self.skipped
        self.skipped = engine.skipped_steps
        if newly and self.rank == 0:
            print(
                f"warning: {newly} of the last {len(records)} steps were skipped: their gradients were "
                "not finite (try pretrain.precision=fp32 or a lower pretrain.lr)",
                flush=True,
            )
        if self.p.time_budget_s is not None:
            state.trained_s = _slowest(state.trained_s, self.train_step.device)
            self.budget.update(state.step, state.trained_s)
            self.progress.set_total(self.budget.total)
        if self.rank == 0:
            for record in records:
                self.metrics.append(record)
                self.progress.update(record)
            # One point per flush (every log_every steps, each commit, the end), from the records already
            # on the host: the tracker's thread sends it, the step never waits for it.
            self.tracker.log_metrics(records[-1]["step"], training_point(records[-1], newly))


def _export(engine: Any, encoder: Encoder, cfg: PipelineConfig, run: RunInputs, rank: int) -> str:
    """Write the backbone for `load_encoder`; under ZeRO-3 its parameters are gathered first."""
    import deepspeed

    description = encoder_description(
        cfg.model.backbone,
        cfg.model.backbone_kwargs,
        run.manifest.channels,
        run.views.global_size,
        cfg.model.small_input,
        encoder.embed_dim,
        run.views.mean.tolist(),
        run.views.std.tolist(),
        projector={
            "proj_dim": cfg.model.proj_dim,
            "proj_hidden_dim": cfg.model.proj_hidden_dim,
            "proj_layers": cfg.model.proj_layers,
        },
    )
    params = list(encoder.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_partition_weights()):
        if rank == 0:
            export_encoder(encoder.backbone, description, run.storage, run.url, projector=encoder.projector)
    dist.barrier()
    return f"{run.url}/{layout.DESCRIPTION}"


def cli(argv: list[str] | None = None) -> int:
    # A rank outlives no launcher: one that kept training would write the run beside a retry's ranks.
    die_with_parent(signal.SIGKILL)
    args = stage_parser("python -m lejepa.train.rank", __doc__.splitlines()[0]).parse_args(argv)
    # Every rank runs this; only rank 0 prints the summary line.
    try:
        stop = StopRequest.on_sigterm()
        return run_stage(
            lambda: _rank0_only(train(config_from(args), stop)), TrainingDiverged, CheckpointError
        )
    except TrainingStopped as stopped:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"[pretrain] {stopped}", flush=True)
        return 128 + signal.SIGTERM


def _rank0_only(summary: TrainSummary) -> TrainSummary | None:
    return summary if int(os.environ.get("RANK", "0")) == 0 else None


if __name__ == "__main__":
    status = cli()
    if status:
        # A failing rank leaves its peers mid-collective, and tearing the process group down at interpreter
        # exit then aborts (SIGABRT: "terminate called without an active exception"), which hides the
        # status from the launcher: leave at once, with the output flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
