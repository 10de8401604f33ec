#!/usr/bin/env bash
# Make a Python environment able to run vitscale; used by `make demo` / `make test` / CI.
# - an active virtualenv is used as it is; otherwise ./.venv is created;
# - torch already importable is kept; otherwise a GPU machine gets the default (CUDA) torch and a
#   machine without one gets torch==2.13.0, which resolves to a local CPU build here (no CUDA
#   packages are downloaded);
# - then the project itself with its dev extra, once per change of pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${VIRTUAL_ENV:-}" ]; then
  py=python
else
  [ -x .venv/bin/python ] || python3 -m venv .venv
  py=.venv/bin/python
fi
if ! "$py" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$py" -m pip install -q torch
  else
    "$py" -m pip install -q "torch==2.13.0"
  fi
fi
stamp="$("$py" -c 'import sys; print(sys.prefix)')/.vitscale-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$py" -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
