#!/usr/bin/env bash
# The issue-26 GPU measurement, in one call on the device machine (bench/results/README.md has
# the exact `run` command, the wheels and the expected time per configuration):
#
#   bash scripts/device_bench.sh OUT [BUDGET_S] [extra `vitscale bench train` options]
#
# Prints the machine, writes a small real shard set (for the shard-loader configurations), then
# runs `vitscale bench train --suite gpu` with a budget: its records land in OUT/<device>-<date>.json
# as each configuration finishes (a cut keeps them), its progress in OUT/bench.log, the table on
# stdout. Rehearse it on a CPU with tiny stand-ins:
#
#   PYTHON=.venv/bin/python SHARD_IMAGES=20 bash scripts/device_bench.sh /tmp/rehearsal 120 --tiny
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/device_bench.sh OUT [BUDGET_S] [bench options]}
budget=${2:-420}
shift $(( $# >= 2 ? 2 : 1 ))
py=${PYTHON:-python3}
per_class=${SHARD_IMAGES:-200}  # images per class, 12 classes
shards=${SHARDS_DIR:-/tmp/vitscale-bench-shards}
mkdir -p "$out"
start=$(date +%s)

{
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  "$py" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$py" -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -n 1
  "$py" -c "import deepspeed, timm; print('deepspeed', deepspeed.__version__, 'timm', timm.__version__)" 2>&1 | tail -n 1
} | tee "$out/machine.txt"

# ImageNet-like JPEGs: 320 px, about 115 KB each, 50 to a shard (one shard per loader worker at least)
if [ ! -f "$shards/sh/index.json" ]; then
  "$py" -m pretrain shards synth "$shards/img" --classes 12 --per-class "$per_class" --img-size 320 > /dev/null &&
  "$py" -m pretrain shards write "$shards/img" "$shards/sh" --samples-per-shard 50 --no-progress || exit 1
fi
echo "shards ready after $(( $(date +%s) - start )) s"

"$py" -m pretrain bench train --suite gpu --shards "$shards/sh" --budget-s "$budget" --max-micro-batch 256 \
  --steps 8 --warmup 3 --phase-steps 2 --out "$out" "$@" 2> >(tee "$out/bench.log" >&2)
rc=$?
echo "device_bench: exit $rc after $(( $(date +%s) - start )) s; records in $out"
exit $rc
