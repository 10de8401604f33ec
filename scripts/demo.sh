#!/usr/bin/env bash
# The demo: a real sequence of vitscale subcommands on a tiny ViT and a synthetic task, on 2 local
# processes (CPU or GPU). Each step is what a user runs on real data.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
run="runs/demo-$(date +%Y%m%d-%H%M%S)"
vs() { "$PY" -m pretrain "$@"; }
export PYTHONWARNINGS="ignore::FutureWarning"
start=$(date +%s)

echo "== 1. images -> WebDataset shards ($run/shards)"
vs shards synth "$run/images" --classes 10 --per-class 240 --img-size 32 --seed 0
vs shards write "$run/images" "$run/shards" --samples-per-shard 300 --val-fraction 0.1 --workers 2 --no-progress
vs shards verify "$run/shards" --no-progress | tail -n 1

echo; echo "== 2. pretrain a tiny ViT from the shards (ZeRO-2, bf16, 2 processes) -> $run/pretrain"
vs pretrain --config configs/demo_cpu.yaml --nproc-per-node 2 run.dir="$run/pretrain" \
   data.train="$run/shards" data.val="$run/shards" data.workers=1 data.crop_scale_min=0.6

echo; echo "== 3. fine-tune at 1.5x resolution (48 px) on a new 6-class label set -> $run/finetune"
vs shards synth "$run/images_ft" --classes 6 --per-class 200 --img-size 48 --seed 1
vs shards write "$run/images_ft" "$run/shards_ft" --samples-per-shard 200 --val-fraction 0.15 --workers 2 --no-progress
vs finetune --config configs/demo_finetune_cpu.yaml --init "$run/pretrain" --nproc-per-node 2 \
   run.dir="$run/finetune" data.train="$run/shards_ft" data.val="$run/shards_ft" data.workers=1 data.crop_scale_min=0.6

echo; echo "== 4. evaluate the fine-tuned model on its held-out shards"
vs evaluate --checkpoint "$run/finetune" --data "$run/shards_ft"

echo; echo "== 5. see both runs: figures, health and a header table on one page -> $run/report"
vs report "$run/pretrain" "$run/finetune" --out "$run/report"

echo; echo "demo finished in $(( $(date +%s) - start )) s: run directory $run, report $run/report/index.html"
