#!/usr/bin/env bash
# The GPU check, for a bare CUDA machine with its own torch and no internet, in under 8 minutes:
#   1. the CUDA tests (SIGReg, training on one GPU rank over NCCL, evaluation on the device) and the launcher's
#      option and error tests against this machine's torch;
#   2. benchmarks/sigreg.py and benchmarks/train_step.py on CUDA (the GPU profile, infra/gpu.yaml, ZeRO 2,
#      1 and 0, and variants: DeepSpeed's contiguous gradients, views made in the loader, no online probe),
#      and benchmarks/step_profile.py: where the step's time goes, ours against the plain loop;
#   3. shard -> pretrain -> evaluate -> publish of Fashion-MNIST with infra/gpu.yaml;
#   4. ViT-S/16 on 2 x 224 px + 6 x 96 px views from a JPEG ImageFolder, views made on the GPU, against
#      the plain loop (at ZeRO 2 and 0), and its profile;
# then prints one table. Each part has its own time limit and a failure does not stop the others. All parts
# share one budget, GPU_CHECK_BUDGET seconds (default 470, so the whole check ends within 8 minutes): a
# part gets at most what is left of it, and is skipped when less than 30 s is left, so the table is always
# printed. Parts run in order of importance. GPU_CHECK_PARTS (names, space-separated) runs only those parts,
# and GPU_CHECK_TESTS replaces the tests part's pytest arguments: both serve a rerun of what failed.
#
#   bash infra/gpu_check.sh          (PY=python3 by default; logs and the table go to $OUT, or a temp folder)
#
# $OUT ends with three files: gpu_check.log (all the output), table.md, and parts.tar.gz (each part's log
# and the profiles), as the device tool brings back at most 8 files.
#
# Packages the machine lacks travel as wheels in .whl/ and Fashion-MNIST's IDX files in .fashion-mnist/, both
# git-ignored: infra/README.md says how to make them.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-$(mktemp -d /tmp/lejepa-gpu-check.XXXXXX)}
WORK=$(mktemp -d /tmp/lejepa-gpu-work.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl || exit 1
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
fi
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -e "$FMNIST/train-images-idx3-ubyte.gz" ] && [ -d .fashion-mnist ]; then
    mkdir -p "$FMNIST" && cp .fashion-mnist/*.gz "$FMNIST/" || exit 1
fi
"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "error: no CUDA device visible")' || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c 'import deepspeed, sys, timm, torch, triton
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, "
      f"timm {timm.__version__}, deepspeed {deepspeed.__version__}")'

BUDGET=${GPU_CHECK_BUDGET:-470}
# part NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, record status and seconds.
part() {
    local name=$1 limit=$2 started=$SECONDS left=$((BUDGET - SECONDS))
    shift 2
    if [ -n "${GPU_CHECK_PARTS:-}" ] && [[ " $GPU_CHECK_PARTS " != *" $name "* ]]; then
        return
    fi
    if [ "$left" -lt 30 ]; then
        echo "=== $name: skipped, ${left}s of the ${BUDGET}s budget left"
        echo "$name skipped 0" >> "$OUT/parts.txt"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/$name.log"
    echo "$name $rc $((SECONDS - started))" >> "$OUT/parts.txt"
}
: > "$OUT/parts.txt"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

TESTS=(tests/objective/test_sigreg_cuda.py tests/train/test_train_cuda.py tests/evaluate/test_evaluate_cuda.py tests/objective/test_sigreg.py
       "tests/train/test_launch.py::test_launcher_commands_use_only_options_the_installed_launchers_have"
       "tests/train/test_launch.py::test_local_rank_that_dies_before_the_program_starts_is_quoted")
[ -n "${GPU_CHECK_TESTS:-}" ] && read -r -a TESTS <<< "$GPU_CHECK_TESTS"
part tests 240 "$PY" -m pytest -q -rs -p no:cacheprovider "${TESTS[@]}"
part sigreg 120 "$PY" benchmarks/sigreg.py --device cuda
part train_step 180 "$PY" benchmarks/train_step.py --config infra/gpu.yaml
part train_step_zero0 150 "$PY" benchmarks/train_step.py --config infra/gpu.yaml --set pretrain.zero_stage=0 \
    --steps 30

STORE=$WORK/store
SETS=(--config infra/gpu.yaml --set "storage.root=$STORE" --set pretrain.max_steps=300
      --set pretrain.checkpoint_every=150)
part shard 90 "$PY" -m lejepa.data.shard "${SETS[@]}"
part pretrain 240 "$PY" -m lejepa.train.pretrain "${SETS[@]}"
part evaluate 150 "$PY" -m lejepa.evaluate.stage "${SETS[@]}"
part publish 60 "$PY" -m lejepa.publish.stage "${SETS[@]}"

IMAGES=$WORK/jpeg
VIT_S16=(--set data.source=imagefolder --set "data.path=$IMAGES" --set model.backbone=vit_small_patch16_224
         "--set=model.backbone_kwargs={patch_size: 16}" --set views.global_size=224 --set views.local_size=96
         --set pretrain.batch_size=128 --set pretrain.num_workers=12)
# 8,192 images: the ViT-S/16 parts' 40 steps of 128 stay inside one epoch of the training split.
part jpeg_folder 60 "$PY" benchmarks/make_imagefolder.py "$IMAGES" --count 8192 --size 256
part vit_s16_device 180 "$PY" benchmarks/train_step.py --config infra/gpu.yaml "${VIT_S16[@]}" \
    --set views.on_device=true --steps 30 --warmup 10
# The same at ZeRO 0, whose step makes about as many host calls as the plain loop (benchmarks/step_calls.py):
# where ViT-S/16's step is bound by the host, this shows what DeepSpeed's ZeRO-2 costs there.
part vit_s16_zero0 150 "$PY" benchmarks/train_step.py --config infra/gpu.yaml "${VIT_S16[@]}" \
    --set views.on_device=true --set pretrain.zero_stage=0 --steps 30 --warmup 10
# DeepSpeed's contiguous gradients, which the generated JSON turns off (benchmarks/step_calls.py): the
# same step with them on, to compare with train_step.
echo '{"zero_optimization": {"contiguous_gradients": true}}' > "$WORK/contiguous.json"
part train_step_contiguous 150 "$PY" benchmarks/train_step.py --config infra/gpu.yaml \
    --set "pretrain.deepspeed_config=$WORK/contiguous.json" --steps 30
part step_profile 150 "$PY" benchmarks/step_profile.py --config infra/gpu.yaml --out "$OUT/step_profile.txt"
part vit_s16_profile 150 "$PY" benchmarks/step_profile.py --config infra/gpu.yaml "${VIT_S16[@]}" \
    --set views.on_device=true --steps 3 --warmup 5 --out "$OUT/vit_s16_profile.txt"
part train_step_zero1 150 "$PY" benchmarks/train_step.py --config infra/gpu.yaml --set pretrain.zero_stage=1 \
    --steps 30
part train_step_loader 150 "$PY" benchmarks/train_step.py --config infra/gpu.yaml --set views.on_device=false \
    --set pretrain.num_workers=12 --steps 30
part train_step_no_probe 150 "$PY" benchmarks/train_step.py --config infra/gpu.yaml \
    --set pretrain.online_probe=false --steps 30

"$PY" - "$OUT" "$STORE" <<'PY'
"""One table: every part's status and time, with the numbers it measured."""
import json, re, statistics, sys
from pathlib import Path

out, store = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for line in (out / "parts.txt").read_text().splitlines():
    name, rc, seconds = line.split()
    log_file = out / f"{name}.log"
    log = log_file.read_text(errors="replace") if log_file.exists() else ""
    results = [json.loads(m) for m in re.findall(r"^RESULT \S+ (.*)$", log, re.M)]
    if name == "tests":
        found = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?) in [\d.]+s", log, re.M)
        what = found[-1] if found else "no pytest summary"
    elif name == "sigreg":
        shapes = [dict(kv.split("=", 1) for kv in m.split()) for m in re.findall(r"^summary (.*)$", log, re.M)]
        what = "; ".join(
            f"{r['views']}x{r['n']}x{r['d']}: {float(r['speedup']):.2f}x the straightforward speed, "
            f"{float(r['memory_ratio']):.3f} of its memory ({r['path']})"
            for r in shapes
        )
    elif name.startswith(("train_step", "vit_s16")):
        what = "; ".join(
            f"ours {r['ours_images_per_s']:.0f} img/s vs plain {r['plain_images_per_s']:.0f}: "
            f"{r['ratio']:.3f}x, data wait {100 * r['data_wait']:.1f}%"
            for r in results
        )
    elif name.endswith("profile"):
        sides = re.findall(r"^== (.*?): .*\nwall per step: ([\d.]+) ms(?:\ndevice busy per step: ([\d.]+) ms)?", log, re.M)
        waits = re.findall(r"^host waits per step: (.*)$", log, re.M)
        what = "; ".join(
            f"{side}: {wall} ms a step, device busy {busy or '?'} ms, host waits: {wait}"
            for (side, wall, busy), wait in zip(sides, waits)
        )
    elif name == "pretrain" and (store / "runs").exists():
        run = next((store / "runs").iterdir())
        log_lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        timed = log_lines[len(log_lines) // 4 :]
        what = (
            f"{len(log_lines)} steps, {statistics.median(r['images_per_s'] for r in timed):.0f} img/s "
            f"(median), data wait {100 * statistics.mean(r['data_wait'] for r in timed):.1f}%, "
            f"final loss {log_lines[-1]['loss']:.4f}"
        )
    elif name == "evaluate" and rc == "0":
        summary = json.loads(log.strip().splitlines()[-1])
        baselines = ", ".join(f"{k} {v:.4f}" for k, v in summary["baselines"].items() if v is not None)
        what = (
            f"linear probe {summary['linear_probe_top1']:.4f}, kNN {summary['knn_top1']:.4f}; "
            f"baselines (linear): {baselines}"
        )
    else:
        tail = [x for x in log.strip().splitlines() if x.strip()]
        what = tail[-1][:300] if tail else ""
    if rc == "skipped":
        rows.append((name, "skipped: the budget was spent", seconds, ""))
        continue
    rows.append((name, "ok" if rc == "0" else f"FAILED ({rc})", seconds, what))
table = "| part | status | seconds | result |\n|---|---|---|---|\n"
table += "".join("| " + " | ".join(row) + " |\n" for row in rows)
(out / "table.md").write_text(table)
print("\n" + table, end="")
PY
(cd "$OUT" && tar -czf parts.tar.gz --remove-files $(ls ./*.log ./*.txt | grep -v '^./gpu_check.log$'))
