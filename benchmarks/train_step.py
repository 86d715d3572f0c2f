"""Training-step throughput: our DeepSpeed step against the paper's plain PyTorch loop, in one run.

Both train the same encoder (the CPU default config), on the same views and batch size, for the same
number of steps after a warm-up:

- ours: `lejepa.train.train` in this process (a one-rank DeepSpeed engine), fed by the streaming loader
  from Fashion-MNIST shards, with the multi-crop views made in the loader's worker process; images/s and
  the fraction of each step spent waiting for data come from the run's metrics log;
- baseline: `lejepa.minimal.MinimalTrainer`, a plain loop (forward, backward, AdamW) on views that are
  made before the clock starts, so it measures pure compute: the strictest baseline there is. When ours
  trains in bf16 (`pretrain.precision=bf16`), the baseline runs under bf16 autocast, so both sides use
  the same arithmetic.

Targets: ours >= 0.9x the baseline's images/s, data wait < 5%.

    python benchmarks/train_step.py [--steps 20] [--warmup 3] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lejepa.config import load_config
from lejepa.minimal import MinimalTrainer
from lejepa.shard import ShardManifest, locate_manifest, write_shards
from lejepa.storage import Storage
from lejepa.train import deepspeed_config, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps for each side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        total = args.warmup + args.steps
        cfg = load_config(
            None,
            [
                f"storage.root={root}",
                "data.limit=20000",
                f"pretrain.max_steps={total}",
                f"pretrain.checkpoint_every={10**6}",
                *args.set,
            ],
        )
        write_shards(cfg, progress=False)
        storage = Storage.from_config(cfg.storage)
        manifest = ShardManifest.load(storage, locate_manifest(cfg, storage))

        summary = train(cfg)
        log = [json.loads(line) for line in Path(summary.run_dir, "metrics.jsonl").read_text().splitlines()]
        timed = log[args.warmup :]
        ours = statistics.median(r["images_per_s"] for r in timed)
        data_wait = statistics.mean(r["data_wait"] for r in timed)

        torch.manual_seed(cfg.seed)
        trainer = MinimalTrainer(cfg, resolution=manifest.image_size, channels=manifest.channels)
        generator = torch.Generator().manual_seed(cfg.seed)
        images = torch.randint(
            0, 256, (cfg.pretrain.batch_size, manifest.channels, 28, 28), dtype=torch.uint8
        )
        views = [trainer.views(images, generator) for _ in range(4)]
        bf16 = deepspeed_config(cfg, 1, use_cuda=False)["bf16"]["enabled"]
        rates = []
        for step in range(total):
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                trainer.step_on_views(*views[step % len(views)])
            if step >= args.warmup:
                rates.append(cfg.pretrain.batch_size / (time.perf_counter() - started))
        baseline = statistics.median(rates)

    v = trainer.views
    print(
        f"model {cfg.model.backbone}, batch {cfg.pretrain.batch_size},"
        f" views {v.global_views}x{v.global_size}px"
        f" + {v.local_views}x{v.local_size}px, {'bf16' if bf16 else 'fp32'},"
        f" {args.steps} timed steps after {args.warmup} warm-up steps"
    )
    print(f"{'':28s}{'images/s':>10s}")
    print(f"{'plain PyTorch loop':28s}{baseline:10.1f}")
    print(f"{'ours (DeepSpeed + loader)':28s}{ours:10.1f}")
    print(f"ratio ours / plain: {ours / baseline:.3f}   (target >= 0.9)")
    print(f"data wait: {100 * data_wait:.2f}% of step time   (target < 5%)")


if __name__ == "__main__":
    main()
