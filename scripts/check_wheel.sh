#!/usr/bin/env bash
# CI: test the package as `pip install .` makes it, not the editable install the tests use.
#   1. build the wheel from a copy of the tree's tracked and new files (a build/ folder left in the
#      tree can hold modules deleted since, which setuptools would ship again);
#   2. install it (not editable) into a new virtualenv; its dependencies (torch 2.14.1, DeepSpeed,
#      ...: 6 GB, not copied) come from the development environment's site-packages, named by a
#      line in a .pth file. Such a line only adds the folder to sys.path: that folder's own .pth
#      files are not run, so the development environment's editable vitscale (an import hook its
#      __editable__*.pth installs) stays off; `import pretrain` must then find the wheel's copy,
#      which is checked;
#   3. from a folder outside the repo, with no PYTHONPATH: vitscale --version, info, recipes, and a
#      3-step pretrain on 2 processes (CPU, gloo) of a recipe given by name.
# Usage: bash scripts/check_wheel.sh  (after scripts/setup_env.sh; prints the seconds it took)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
if [ -n "${VIRTUAL_ENV:-}" ]; then dev_py=$(command -v python); else dev_py=$PWD/.venv/bin/python; fi
work=$(mktemp -d "${TMPDIR:-/tmp}/vitscale-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "== wheel: build"
"$dev_py" - "$work/src" <<'EOF'
import os, shutil, subprocess, sys

listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        check=True, capture_output=True).stdout.decode().split("\0")
for name in filter(os.path.lexists, filter(None, listed)):  # lexists: a deleted tracked file is skipped
    dst = os.path.join(sys.argv[1], name)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy2(name, dst, follow_symlinks=False)  # pretrain/recipes stays a symlink to configs/
EOF
isolation=--no-build-isolation  # the dev environment's setuptools, when new enough: nothing downloaded
"$dev_py" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 68)' 2>/dev/null \
  || isolation=
"$dev_py" -m pip wheel -q --no-deps $isolation -w "$work/dist" "$work/src"
wheel=$(ls "$work"/dist/vitscale-*.whl)
echo "$(basename "$wheel"): $(du -k "$wheel" | cut -f1) KiB, $("$dev_py" -c \
  'import sys, zipfile; print(len(zipfile.ZipFile(sys.argv[1]).namelist()))' "$wheel") files"

echo "== wheel: install into a new virtualenv"
"$dev_py" -m venv --without-pip "$work/venv"
venv_py=$work/venv/bin/python
site=$("$venv_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$dev_py" -c 'import sysconfig; p = sysconfig.get_paths(); print("\n".join(dict.fromkeys([p["purelib"], p["platlib"]])))' \
  > "$site/vitscale-check-deps.pth"
# --no-index: every dependency the wheel declares must already be there (else pip fails here)
"$dev_py" -m pip --python "$venv_py" install -q --no-index "$wheel"

echo "== wheel: run from outside the repo"
mkdir "$work/cwd"
cd "$work/cwd"
unset PYTHONPATH
export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
"$venv_py" - "$work/venv" <<'EOF'
import sys
from pathlib import Path

import pretrain
from pretrain.train.recipes import recipe_dir

venv = Path(sys.argv[1]).resolve()
where = Path(pretrain.__file__).resolve()
print(f"pretrain.__file__ = {where}\nrecipes: {recipe_dir()}")
if venv not in where.parents or venv not in recipe_dir().parents:
    sys.exit(f"FAIL: `import pretrain` found {where}, not the wheel installed in {venv}")
EOF
vs=$work/venv/bin/vitscale
"$vs" --version
"$vs" info --model vit_b16
"$vs" recipes | tee recipes.txt
grep -q "^  demo_cpu " recipes.txt || { echo "FAIL: vitscale recipes does not list demo_cpu" >&2; exit 1; }
"$vs" pretrain --config demo_cpu --nproc-per-node 2 model.name=vit_test4 model.img_size=16 model.num_classes=4 \
  data.val_samples=64 data.workers=0 train.micro_batch=8 train.steps=3 train.log_every=1 train.eval_every=0 \
  checkpoint.every=3 run.dir=run
test "$(cat run/checkpoints/latest)" = step_00000003 || { echo "FAIL: the pretrain left no step-3 checkpoint" >&2; exit 1; }
echo "== wheel: OK in $(( $(date +%s) - start )) s"
