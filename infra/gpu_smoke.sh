#!/usr/bin/env bash
# A short GPU run of the GPU profile (bf16, ViT): shards Fashion-MNIST (or the bundled digits when the
# Debian package is absent), trains STEPS steps on every local GPU and prints the training images/s.
#   bash infra/gpu_smoke.sh [STEPS]        (needs the venv: make demo or make test creates it)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-60}
PY=${PY:-.venv/bin/python}
ROOT=$(mktemp -d /tmp/lejepa-gpu-smoke.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
SOURCE=fashion-mnist
[ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || SOURCE=digits
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "error: no CUDA device visible: run this on a GPU machine")'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
SETS=(--set "storage.root=$ROOT" --set "data.source=$SOURCE" --set "pretrain.max_steps=$STEPS"
      --set "pretrain.checkpoint_every=$STEPS" --set pretrain.run_name=gpu-smoke)
"$PY" -m lejepa.data.shard --config infra/gpu.yaml "${SETS[@]}" | tail -n 1
"$PY" -m lejepa.train.pretrain --config infra/gpu.yaml "${SETS[@]}" | tail -n 1
"$PY" - "$ROOT/runs/gpu-smoke/metrics.jsonl" <<'PY'
import json, statistics, sys
records = [json.loads(line) for line in open(sys.argv[1])]
timed = records[len(records) // 4 :]  # skip warm-up (compilation, allocator growth)
rate = statistics.median(r["images_per_s"] for r in timed)
wait = statistics.mean(r["data_wait"] for r in timed)
print(f"gpu smoke: {len(records)} steps, {rate:.0f} images/s (median after warm-up), data wait {100 * wait:.1f}%, "
      f"final loss {records[-1]['loss']:.4f}")
PY
