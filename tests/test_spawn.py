"""The launcher itself (``pretrain.train.spawn``: torch's elastic agent in a thread, the signal
supervisor, the error folder, the parent-death binding) on a job whose ranks import neither
DeepSpeed nor torch (tests/scripts/light_job.py): every way a job can be stopped or can fail, in
about a second of CPU each. What the trainer does on the same signals (save after the step,
resume exactly) is tests/test_resume.py's and tests/test_fault_tolerance.py's, on real jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import ROOT, cli_env
from tests.runs import wait_until

pytestmark = pytest.mark.slow


def _start(run: Path, mode: str = "") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.scripts.light_job", str(run), mode], cwd=ROOT,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _ranks(run: Path) -> list[dict]:
    out = []
    for rank in (0, 1):
        path = run / f"rank{rank}.json"
        out.append(json.loads(path.read_text()) if path.is_file() else {})
    return out


def _running(run: Path, proc: subprocess.Popen) -> None:
    wait_until(lambda: all(r.get("step", 0) >= 3 for r in _ranks(run)), proc, 60, "both ranks' step 3")


def test_repeated_sigterm_to_the_process_group_stops_every_rank_once_and_exits_0(tmp_path):
    """How SLURM stops a job step: SIGTERM to the launcher's process group, more than once; the
    second one lands while the launcher is on its way out (it used to kill it there: status 143)."""
    for gap in (0.0, 0.2):
        run = tmp_path / f"gap{gap}"
        proc = _start(run)
        _running(run, proc)
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(gap)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (gap, err)
        assert [r["saves"] for r in _ranks(run)] == [1, 1], gap
        assert "Traceback" not in err and "SignalException" not in err


def test_ctrl_c_asks_every_rank_to_save_and_a_second_ctrl_c_kills_them(tmp_path):
    run = tmp_path / "run"
    proc = _start(run, "slowsave")
    _running(run, proc)
    proc.send_signal(signal.SIGINT)
    wait_until(lambda: all(r["stop_requests"] == 1 for r in _ranks(run)), proc, 60, "the stop request in both ranks")
    proc.send_signal(signal.SIGINT)  # the ranks are still saving: kill them
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "interrupted: every rank saves after this step and stops (Ctrl-C again" in err
    assert "was killed by SIGKILL; the job stopped" in err and "Traceback" not in err
    assert [r["saves"] for r in _ranks(run)] == [0, 0]


def test_kill_9_of_the_launcher_ends_every_rank_within_seconds(tmp_path):
    run = tmp_path / "run"
    proc = _start(run)
    _running(run, proc)
    ranks = [psutil.Process(r["pid"]) for r in _ranks(run)]
    proc.kill()
    proc.communicate(timeout=30)
    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, f"ranks outlived their launcher: {alive}"


def test_a_user_error_in_one_rank_is_printed_once_and_the_job_exits_2(tmp_path):
    run = tmp_path / "run"
    proc = _start(run, "usererror")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert err.strip().splitlines() == ["vitscale light: error: rank 1 found data.train unreadable (a test's user "
                                        "error)"]


def test_a_crashing_rank_ends_the_job_naming_the_rank(tmp_path):
    run = tmp_path / "run"
    proc = _start(run, "crash")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert err.count("RuntimeError: a bug in rank 1") == 1  # the rank's own traceback, once
    assert err.strip().splitlines()[-1].startswith("vitscale light: rank 1 exited with status 1 (its traceback is "
                                                   "above); the job stopped")
    assert "ChildFailedError" not in err
