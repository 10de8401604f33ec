#!/usr/bin/env bash
# Make a Python environment able to run vitscale; used by `make demo` / `make test` / CI.
# - an active virtualenv is used as it is; otherwise ./.venv is created;
# - torch + torchvision are installed as the pinned pair torch==2.14.1 torchvision==0.29.1 unless the
#   environment already imports both (a cluster's own build is kept). Pinning both keeps pip from
#   pulling another torch build for torchvision or timm; on this project's CPU machines pip takes
#   the pair from local disk (a CUDA build that runs on the CPU);
# - then the project itself with its dev extra (pytest, ruff, scipy, transformers, timm, open_clip), once per
#   change of pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_PAIR=(torch==2.14.1 torchvision==0.29.1)
if [ -n "${VIRTUAL_ENV:-}" ]; then
  py=python
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  py=.venv/bin/python
fi
if ! "$py" -c "import torch, torchvision" 2>/dev/null; then
  "$py" -m pip install -q "${TORCH_PAIR[@]}"
fi
stamp="$("$py" -c 'import sys; print(sys.prefix)')/.vitscale-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$py" -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
