"""Faults during training on the real path (2 gloo processes, DeepSpeed ZeRO bf16): non-finite
losses and gradients (injected with ``VITSCALE_FAULT``) and a rank that dies."""

from __future__ import annotations

import pytest
import torch

from pretrain.formats import consolidate_deepspeed
from tests.helpers import cli_env, vitscale
from tests.runs import (
    check_ema_chain,
    events,
    kill_job,
    latest,
    logged_step,
    output,
    rank_process,
    records,
    start,
    wait_until,
)
from tests.runs import pretrain_args as _args

pytestmark = pytest.mark.slow


def _weights(run, step: int) -> dict[str, torch.Tensor]:
    sd, _, meta = consolidate_deepspeed(run / "checkpoints" / f"step_{step:08d}")
    assert meta["step"] == step
    return sd


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _run(run, fault: str, *extra: str):
    return vitscale(*_args(run, "checkpoint.every=1", "checkpoint.keep=20", "data.val=null", *extra),
                    env={**cli_env(), "VITSCALE_FAULT": fault})


def test_nonfinite_gradient_or_loss_skips_the_step_on_every_rank(tmp_path):
    """ZeRO-2 with an EMA: a NaN gradient norm with a finite loss (step 3, all ranks) and a NaN loss
    on rank 1 only (step 5) are both skipped on every rank and counted; neither the weights nor
    the EMA move, and every other step's EMA is the average of the gathered master weights."""
    run = tmp_path / "run"
    proc = _run(run, "nangrad@3;nan@5:rank1", "train.steps=7", "ema.decay=0.8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [e["step"] for e in events(run, "nonfinite_grad_skipped")] == [3]
    assert [e["step"] for e in events(run, "nonfinite_loss_skipped")] == [5]
    assert "non-finite loss on some rank, step skipped" in proc.stdout
    last = [r for r in records(run) if "loss" in r and "kind" not in r][-1]
    assert last["step"] == 7 and last["bad_steps_total"] == 2
    w = {s: _weights(run, s) for s in range(2, 7)}
    assert _same(w[2], w[3]) and _same(w[4], w[5])
    assert not _same(w[3], w[4]) and not _same(w[5], w[6])
    check_ema_chain(run, 7, 0.8, skipped=(3, 5))


def test_repeated_nonfinite_steps_stop_the_run_and_keep_finite_checkpoints(tmp_path):
    """ZeRO-3: skipped steps (a NaN gradient at 3, a NaN loss on rank 1 at 5), then NaN losses from
    step 8 on: with train.max_bad_steps=3 the run stops at step 10 with a message and a non-zero
    exit; every checkpoint holds finite weights, the ones of skipped steps those of the step before."""
    run = tmp_path / "run"
    proc = _run(run, "nangrad@3;nan@5:rank1;nan@8-16", "train.steps=16", "train.max_bad_steps=3", "zero.stage=3")
    assert proc.returncode != 0
    assert "3 steps in a row had a non-finite loss or gradient" in proc.stderr
    assert [e["step"] for e in events(run, "nonfinite_grad_skipped")] == [3]
    assert [e["step"] for e in events(run, "nonfinite_loss_skipped")] == [5, 8, 9, 10]
    assert latest(run) == "step_00000009"
    w = {s: _weights(run, s) for s in range(2, 10)}
    assert all(torch.isfinite(t).all() for sd in w.values() for t in sd.values())
    assert _same(w[2], w[3]) and _same(w[4], w[5]) and _same(w[7], w[8]) and _same(w[7], w[9])
    assert not _same(w[5], w[6])


def test_a_dead_rank_ends_the_job_with_a_message(tmp_path):
    """SIGKILL of one rank mid-run: the job ends on its own with a non-zero exit and the other
    rank says why (no hang; run.timeout_s bounds a peer that hangs instead of dying)."""
    run = tmp_path / "run"
    proc = start(run, "train.steps=100000", "checkpoint.every=0", "run.timeout_s=30")
    try:
        wait_until(lambda: logged_step(run, 3), proc, what="step 3")
        rank_process(proc, 1).kill()
        rc = proc.wait(90)
    finally:
        kill_job(proc)
    assert rc == 1
    assert "rank 1 was killed by SIGKILL; the job stopped" in output(run)
    assert "Traceback" not in output(run) and "ChildFailedError" not in output(run)
