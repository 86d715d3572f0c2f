"""Training-step throughput: our DeepSpeed step against the paper's plain PyTorch loop, in one run.

Both train the same encoder, on the same views and batch size, for the same number of steps after a
warm-up, on the same device (CUDA when there is a GPU, else the CPU):

- ours: `lejepa.train.rank.train` in this process (a one-rank DeepSpeed engine), fed by the streaming loader
  from shards of the configured source (Fashion-MNIST by default), with the multi-crop views made in the
  loader's worker processes, or on the device with `--set views.on_device=true`; images/s and the
  fraction of each step spent waiting for data come from the run's metrics log;
- baseline: `lejepa.objective.minimal.MinimalTrainer`, a plain loop (forward, backward, AdamW) on views that
  are
  made on the device before the clock starts, so it measures pure compute: the strictest baseline there
  is. When ours trains in bf16, the baseline runs under bf16 autocast, so both sides use the same
  arithmetic.

On the CPU each side's rate is the median over its timed steps. On CUDA, where a step's host time says
little (the host runs ahead of the device), it is the timed steps' images over their total wall time:
the plain loop's from the first timed step to the device finishing the last; ours from its metrics log,
where each step's time includes its share of the wait for the device at the next log line (the timed
steps start on a log line: `--warmup` is a multiple of `pretrain.log_every`).

Targets: ours >= 0.9x the baseline's images/s on the CPU, >= 0.95x on CUDA; data wait < 5%.

    python benchmarks/train_step.py [--config infra/gpu.yaml] [--steps N] [--warmup N] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from lejepa.config import PipelineConfig, load_config
from lejepa.data.manifest import ShardManifest, locate_manifest
from lejepa.data.shard import write_shards
from lejepa.objective.minimal import MinimalTrainer
from lejepa.objective.views import MultiCropViews
from lejepa.store.storage import Storage
from lejepa.train.engine import trains_in_bf16
from lejepa.train.rank import train
from lejepa.train.training_log import read_training_log


def ours(cfg: PipelineConfig, warmup: int, cuda: bool) -> tuple[float, float]:
    """Our images/s and mean data-wait fraction over the timed steps of a real run."""
    summary = train(cfg)
    log = read_training_log(Storage.from_config(cfg.storage), summary.run_dir)
    timed = log[warmup:]
    images_per_step = cfg.pretrain.batch_size * cfg.pretrain.grad_accum
    seconds = [images_per_step / r["images_per_s"] for r in timed]
    rate = (
        len(timed) * images_per_step / sum(seconds)
        if cuda
        else statistics.median(r["images_per_s"] for r in timed)
    )
    return rate, statistics.mean(r["data_wait"] for r in timed)


def plain_trainer(
    cfg: PipelineConfig, manifest: ShardManifest, device: torch.device
) -> tuple[MinimalTrainer, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The plain loop's trainer on `device`, seeded, and four batches of views of random images for it."""
    torch.manual_seed(cfg.seed)
    trainer = MinimalTrainer(cfg, resolution=manifest.longer_side, channels=manifest.channels)
    for module in (trainer.encoder, trainer.sigreg, trainer.views):
        module.to(device)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    size = manifest.longer_side
    shape = (cfg.pretrain.batch_size, manifest.channels, size, size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    return trainer, [trainer.views(images, generator) for _ in range(4)]


def plain_loop(
    cfg: PipelineConfig,
    manifest: ShardManifest,
    device: torch.device,
    bf16: bool,
    warmup: int,
    steps: int,
    after_step: Callable[[], None] | None = None,
) -> float:
    """The plain loop's images/s on precomputed views, on `device`; `after_step` is called after each step."""
    trainer, views = plain_trainer(cfg, manifest, device)
    batch = cfg.pretrain.batch_size
    rates, started = [], 0.0
    for step in range(warmup + steps):
        if step == warmup and device.type == "cuda":
            torch.cuda.synchronize()
            started = time.perf_counter()
        tick = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            trainer.step_on_views(*views[step % len(views)])
        if after_step is not None:
            after_step()
        if step >= warmup:
            rates.append(batch / (time.perf_counter() - tick))
    if device.type == "cuda":
        torch.cuda.synchronize()
        return steps * batch / (time.perf_counter() - started)
    return statistics.median(rates)


def sharded_run(
    config: str | None, root: str, run_name: str, steps: int, sets: list[str]
) -> tuple[PipelineConfig, ShardManifest]:
    """A benchmark run's config (a store in `root`, `steps` steps, no checkpoint before the end) and the
    manifest of its dataset, sharded there (the first 20,000 images)."""
    cfg = load_config(
        config,
        [
            f"storage.root={root}",
            "data.limit=20000",
            f"pretrain.run_name={run_name}",
            f"pretrain.max_steps={steps}",
            f"pretrain.checkpoint_every={10**6}",
            *sets,
        ],
    )
    write_shards(cfg, progress=False)
    storage = Storage.from_config(cfg.storage)
    return cfg, ShardManifest.load(storage, locate_manifest(cfg, storage))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config, e.g. infra/gpu.yaml (default: the embedded defaults)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps for each side (20 CPU, 50 CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (3 CPU, 10 CUDA)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    steps = args.steps or (50 if cuda else 20)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 3)

    with tempfile.TemporaryDirectory() as root:
        cfg, manifest = sharded_run(args.config, root, "train-step-benchmark", warmup + steps, args.set)
        our_rate, data_wait = ours(cfg, warmup, cuda)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        bf16 = trains_in_bf16(cfg, use_cuda=cuda)
        baseline = plain_loop(cfg, manifest, device, bf16, warmup, steps)

    v = cfg.views
    sizes = MultiCropViews.from_config(v, resolution=manifest.longer_side, channels=manifest.channels)
    target = 0.95 if cuda else 0.9
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(
        f"{name}: model {cfg.model.backbone}, batch {cfg.pretrain.batch_size},"
        f" views {v.global_views}x{sizes.global_size}px + {v.local_views}x{sizes.local_size}px"
        f" made {'on the device' if v.on_device else 'in the loader'}, {'bf16' if bf16 else 'fp32'},"
        f" {steps} timed steps after {warmup} warm-up steps"
    )
    print(f"{'':28s}{'images/s':>10s}")
    print(f"{'plain PyTorch loop':28s}{baseline:10.1f}")
    print(f"{'ours (DeepSpeed + loader)':28s}{our_rate:10.1f}")
    print(f"ratio ours / plain: {our_rate / baseline:.3f}   (target >= {target})")
    print(f"data wait: {100 * data_wait:.2f}% of step time   (target < 5%)")
    print(
        "RESULT train_step "
        + json.dumps(
            {
                "device": name,
                "backbone": cfg.model.backbone,
                "views_on_device": v.on_device,
                "plain_images_per_s": round(baseline, 1),
                "ours_images_per_s": round(our_rate, 1),
                "ratio": round(our_rate / baseline, 3),
                "data_wait": round(data_wait, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
