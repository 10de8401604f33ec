"""Helpers for the resume / fault-tolerance tests: start, watch and kill real `vitscale pretrain`
jobs (parent -> torchrun agent -> ranks), and read what they left in the run directory."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

from tests.helpers import ROOT, SHARED_ENV, TINY, cli_env, vitscale

# 16 deterministic steps, a checkpoint every 5 (keep 3: 10, 15, 16 survive), sample keys recorded;
# global batch 16 on the shards of tiny_shards() (96 samples: an epoch is 6 steps)
RUN = [*TINY, "train.steps=16", "checkpoint.every=5", "checkpoint.keep=3", "run.deterministic=true",
       "log.sample_keys=true", "train.global_batch=16"]
EPOCH = 96


def shared(name: str, make: Callable[[Path], None]) -> Path:
    """The folder ``NAME`` of this test session, made once by ``make(folder)`` whichever test (on
    whichever pytest-xdist worker) asks first; the others wait for it (a file lock) and reuse it.
    What is shared is read, never changed: a test that needs to change it copies it first."""
    root = Path(os.environ[SHARED_ENV])
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            make(folder)
            done.touch()
    return folder


def tiny_shards() -> Path:
    """A shard set written with vitscale's own writer (4 classes x 24 images of 16 px, 8 per shard:
    12 shards), once per test session."""
    def make(root: Path) -> None:
        from data_tools.shard_writer import WriteOptions, write_shards
        from data_tools.synth import write_synthetic_folder

        write_synthetic_folder(root / "img", classes=4, per_class=EPOCH // 4, img_size=16, seed=0)
        write_shards(root / "img", root / "shards", WriteOptions(samples_per_shard=8, workers=1, progress=False))

    return shared("tiny-shards", make) / "shards"


def reference_run() -> Path:
    """The uninterrupted run of :data:`RUN` (2 processes, ZeRO-2), once per test session: what the
    resume, multi-node and fault tests compare with. Read it; copy what a test would change."""
    def make(folder: Path) -> None:
        vitscale(*pretrain_args(folder / "run"), check=True)

    run = shared("reference-zero2", make) / "run"
    assert sorted(losses(run)) == list(range(1, 17))
    return run


def pretrain_args(run_dir: Path, *extra: str) -> list[str]:
    return ["pretrain", *RUN, f"data.train={tiny_shards()}", f"run.dir={run_dir}", *extra]


def start(run_dir: Path, *extra: str, fault: str | None = None) -> subprocess.Popen:
    """``vitscale pretrain`` (:data:`RUN` + ``extra``) in the background, see :func:`start_command`."""
    return start_command(run_dir, pretrain_args(run_dir, *extra), fault=fault)


def start_command(run_dir: Path, args: list[str], fault: str | None = None) -> subprocess.Popen:
    """``vitscale ARGS`` in the background (its own session), output to RUN_DIR.out."""
    env = cli_env()
    if fault:
        env["VITSCALE_FAULT"] = fault
    Path(run_dir).parent.mkdir(parents=True, exist_ok=True)
    out = open(f"{run_dir}.out", "w")  # noqa: SIM115 - the child owns it
    return subprocess.Popen([sys.executable, "-m", "pretrain", *args], cwd=ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def output(run_dir: Path) -> str:
    return Path(f"{run_dir}.out").read_text()


def wait_until(cond, proc: subprocess.Popen, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the job exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def job_processes(proc: subprocess.Popen) -> list[psutil.Process]:
    """The parent, the torchrun agent and the ranks (which torchrun puts in sessions of their own,
    so killing the parent's process group would leave them running)."""
    try:
        parent = psutil.Process(proc.pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def rank_process(proc: subprocess.Popen, rank: int) -> psutil.Process:
    for p in job_processes(proc)[1:]:
        try:
            if p.environ().get("RANK") == str(rank) and "pretrain" in p.cmdline():
                return p
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no rank {rank} process")


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL every process of the job at once (a node crash), then reap the parent."""
    for p in job_processes(proc):
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(30)


def records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def logged_step(run_dir: Path, step: int) -> bool:
    return any(r.get("step", 0) >= step and "loss" in r for r in records(run_dir))


def events(run_dir: Path, name: str) -> list[dict]:
    return [r for r in records(run_dir) if r.get("kind") == "event" and r.get("event") == name]


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step; a step run again after a resume keeps its last value."""
    return {r["step"]: r["loss"] for r in records(run_dir) if "kind" not in r and "loss" in r}


def sample_keys(run_dir: Path, rank: int) -> dict[int, list[str]]:
    path = Path(run_dir) / f"sample_keys_rank{rank}.jsonl"
    return {r["step"]: r["keys"] for r in map(json.loads, path.read_text().splitlines())}


def latest(run_dir: Path) -> str:
    return (Path(run_dir) / "checkpoints" / "latest").read_text().strip()


def copy_checkpoint(src_run: Path, dst_run: Path, tag: str) -> None:
    """A run dir holding only ``tag`` of ``src_run`` (as if the run had stopped there)."""
    ck = Path(dst_run) / "checkpoints"
    shutil.copytree(Path(src_run) / "checkpoints" / tag, ck / tag)
    (ck / "latest").write_text(tag)


def final_weights(run_dir: Path, step: int, ema: bool = False) -> dict[str, torch.Tensor]:
    """The fp32 master weights (or the EMA weights) of the checkpoint of ``step``, consolidated."""
    from pretrain.formats import consolidate_deepspeed
    from pretrain.formats.deepspeed_ckpt import consolidate_ema

    tag = Path(run_dir) / "checkpoints" / f"step_{step:08d}"
    return (consolidate_ema(tag) if ema else consolidate_deepspeed(tag))[0]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between same-named tensors (the names of ``a``)."""
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def check_ema_chain(run_dir: Path, steps: int, decay: float, skipped: tuple[int, ...] = ()) -> None:
    """The EMA of every checkpoint 1..STEPS (one a step) is EMA_t = decay EMA_{t-1} + (1 - decay) W_t,
    W_t the gathered fp32 master weights, in float64 from EMA_1 on (to 1e-6); a skipped step
    changes neither."""
    weights = functools.cache(lambda step, ema=False: final_weights(run_dir, step, ema))  # each read once
    want = {k: v.double() for k, v in weights(1, True).items()}
    for t in range(2, steps + 1):
        w, got = weights(t), weights(t, True)
        if t in skipped:
            assert max_diff(w, weights(t - 1)) == 0.0
            assert max_diff(got, weights(t - 1, True)) == 0.0
            continue
        want = {k: decay * want[k] + (1 - decay) * w[k].double() for k in want}
        assert max_diff(got, want) <= 1e-6, (t, max_diff(got, want))


def bitwise_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that differ in any bit (or exist in one only)."""
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))
