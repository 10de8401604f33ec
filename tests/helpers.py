"""Helpers every test module shares: run the real `vitscale` CLI (CPU, gloo), or a script under
torchrun, in subprocesses; read what a run left behind."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_ENV = "VITSCALE_TEST_SHARED"  # set by tests/conftest.py: the folder of the runs tests share (tests/runs.py)

TINY = ["model.name=vit_test4", "model.img_size=16", "model.num_classes=4", "data.val_samples=64",
        "train.micro_batch=8", "train.log_every=1", "train.eval_every=0", "optim.lr=0.003",
        "optim.warmup_steps=2", "data.workers=0"]


def cli_env() -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    # DeepSpeed JIT-builds its CPU comm op into ~/.cache/torch_extensions at start-up; two virtual
    # environments sharing that folder rebuild it in turn (about 20 s a launch): one folder each
    venv = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions" / f"venv-{venv}"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def vitscale(*args: str, timeout: int = 300, env: dict | None = None, check: bool = False):
    """Run ``python -m pretrain ARGS``; returns the CompletedProcess (text)."""
    proc = subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=ROOT, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"vitscale {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def vitscale_here(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """``vitscale ARGS`` in this process (``pretrain.cli.main``, the console script's own entry):
    for commands that start no job (shard tools, and the checks that stop a job before any
    process starts), without a Python start-up per call. Returns what :func:`vitscale` returns."""
    from pretrain.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse: --help, usage errors
            code = exit_.code if isinstance(exit_.code, int) else 2
    proc = subprocess.CompletedProcess(["vitscale", *args], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"vitscale {' '.join(args)} failed ({code}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def read_metrics(run_dir: Path, kind: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == kind]


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node NPROC --standalone SCRIPT ARGS`` (its own free port), in the
    test environment; fails the test (with the output) on a non-zero exit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",  # own free port
           str(script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc
