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
   data.train="$run/shards" data.val="$run/shards"

echo; echo "demo finished in $(( $(date +%s) - start )) s: run directory $run"
