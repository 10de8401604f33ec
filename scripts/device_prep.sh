#!/usr/bin/env bash
# Before a GPU run, on this machine: put the Python 3.12 wheels the device image lacks into .whl/
# (the project's .gitignore leaves it out; the `run` call carries it): the shared set in
# shared/device/wheels (DeepSpeed, WebDataset, simplejpeg and what they need; what
# shared/device/prep.sh copies, done here so that it also works in a git worktree) and torchao for
# model.fp8, which the image lacks too (one abi3 wheel from the package registry).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
for d in "$root/../shared/device" "$root/../../shared/device" "$root/shared/device"; do
  if [ -d "$d/wheels" ]; then wheels="$d/wheels"; break; fi
done
[ -n "${wheels:-}" ] || { echo "shared/device/wheels not found near $root" >&2; exit 1; }
mkdir -p "$root/.whl"
cp -f "$wheels"/*.whl "$root/.whl/"
py=${PYTHON:-python3}
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 "torchao==${TORCHAO_VERSION:-0.18.0}" -d "$root/.whl"
echo "$(ls "$root/.whl" | wc -l) wheels in .whl/ ($(du -sh "$root/.whl" | cut -f1)); carry [\".whl\"] in the run call"
