#!/usr/bin/env bash
# The demo: a real sequence of vitscale subcommands on a tiny ViT and a synthetic task, on 2 local
# processes (CPU or GPU). Each step is what a user would run on real data.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
run="runs/demo-$(date +%Y%m%d-%H%M%S)"
export PYTHONWARNINGS="ignore::FutureWarning"
echo "== 1. pretrain a tiny ViT (ZeRO-2, bf16, 2 processes) -> $run/pretrain"
"$PY" -m pretrain pretrain --config configs/demo_cpu.yaml --nproc-per-node 2 run.dir="$run/pretrain"
echo
echo "demo finished: run directory $run"
