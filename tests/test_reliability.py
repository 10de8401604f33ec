"""Faults and misuse a real cluster and a hurried user produce: a wrong path over a shard set, two
jobs on one run dir (and kill -9 of the holder's launcher), damaged shards, a damaged `latest`,
impossible values, a full or read-only disk. Real processes, tiny. Every signal to the launcher
(repeated SIGTERM to its process group, Ctrl-C twice, kill -9) is tests/test_spawn.py's."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from data_tools.cli import main as shards_main
from pretrain import cli
from pretrain.data.loader import sum_counts
from tests.helpers import ROOT, TINY, cli_env, read_metrics, vitscale, vitscale_here
from tests.runs import (
    job_processes,
    kill_job,
    latest,
    logged_step,
    output,
    pretrain_args,
    start,
    wait_until,
)

# ---------------------------------------------------------------- shard sets are not overwritten


def _synth(folder: Path, seed: int, per_class: int = 6) -> Path:
    assert shards_main(["synth", str(folder), "--classes", "3", "--per-class", str(per_class), "--img-size", "8",
                        "--seed", str(seed)]) == 0
    return folder


def test_writing_another_source_over_a_shard_set_is_refused_unless_forced(tmp_path, capsys):
    a, b = _synth(tmp_path / "a", 0), _synth(tmp_path / "b", 1)
    out = tmp_path / "shards"
    write = ["write", "--samples-per-shard", "5", "--workers", "1", "--no-progress"]
    assert shards_main([write[0], str(a), str(out), *write[1:]]) == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    proc = vitscale_here("shards", write[0], str(b), str(out), *write[1:])
    assert proc.returncode == 2 and f"holds shards of {a.resolve()}" in proc.stderr and "--force" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before  # nothing lost
    (out / "train-000001.tar").unlink()  # an interrupted write of the same source resumes
    assert shards_main([write[0], str(a), str(out), *write[1:]]) == 0
    assert "shards written 1, reused from an earlier run 3" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before
    assert shards_main([write[0], str(b), str(out), *write[1:], "--force"]) == 0
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} != before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    proc = vitscale_here("shards", write[0], str(a), str(other), *write[1:])
    assert proc.returncode == 2 and "not written by `vitscale shards write`" in proc.stderr
    assert (other / "todo.txt").read_text() == "mine"


# ---------------------------------------------------------------- one job per run dir, launcher signals

LONG = ["train.steps=100000", "checkpoint.every=0", "data.val=null"]


def _ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in job_processes(proc)[1:] if "RANK" in _environ(p)]


def _environ(p: psutil.Process) -> dict:
    with contextlib.suppress(psutil.Error):
        return p.environ()
    return {}


def test_a_second_job_on_the_same_run_dir_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    """A second job on a held run dir is one line; kill -9 of the first job's launcher ends its
    ranks within seconds (parent-death signal) and leaves the lock with a dead holder, which the
    next job takes over."""
    run = tmp_path / "run"
    first = start(run, *LONG)
    try:
        wait_until(lambda: logged_step(run, 2), first, what="step 2")
        second = vitscale_here("pretrain", *TINY, *LONG, f"run.dir={run}")  # refused before it starts anything
        assert second.returncode == 2
        line = second.stderr.strip()
        assert "\n" not in line and "is in use by `vitscale pretrain` (pid" in line and "--force-unlock" in line
        holder = json.loads((run / ".vitscale.lock").read_text())
        assert holder["pid"] == first.pid and holder["command"] == "pretrain"
        steps = [r["step"] for r in read_metrics(run) if "loss" in r]
        assert steps == sorted(set(steps)), "the refused job wrote nothing into the run"
        ranks = _ranks(first)
        assert len(ranks) == 2
        first.kill()  # kill -9 of the launcher alone
        first.wait(10)
        _, alive = psutil.wait_procs(ranks, timeout=10)
        assert not alive, f"ranks outlived their launcher: {alive}"
    finally:
        kill_job(first)
    assert (run / ".vitscale.lock").is_file()
    third = vitscale("pretrain", *TINY, "train.steps=3", "checkpoint.every=0", "data.val=null", f"run.dir={run}",
                     "--nproc-per-node", "1")
    assert third.returncode == 0, third.stderr[-2000:]
    assert not (run / ".vitscale.lock").exists(), "released at exit"


# ---------------------------------------------------------------- damaged shards are counted exactly


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> dict:
    """8 shards of 10 (train) written by the writer; one truncated to half, one deleted."""
    root = tmp_path_factory.mktemp("damaged")
    _synth(root / "img", 0, per_class=27)
    assert shards_main(["write", str(root / "img"), str(root / "sh"), "--samples-per-shard", "10", "--workers", "1",
                        "--no-progress", "--val-fraction", "0.15", "--seed", "3"]) == 0
    index = json.loads((root / "sh" / "index.json").read_text())
    counts = {s["file"]: s["samples"] for s in index["splits"]["train"]["shards"]}
    cut = root / "sh" / "train-000002.tar"
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    (root / "sh" / "train-000005.tar").unlink()
    from pretrain.data.shards import iter_tar_samples

    read = 0
    with contextlib.suppress(OSError):
        for _ in iter_tar_samples(cut, check_end=True):
            read += 1
    return {"shards": root / "sh", "lost_cut": counts["train-000002.tar"] - read,
            "lost_gone": counts["train-000005.tar"], "counts": counts}


def _loader(shards: Path, workers: int = 1, world: int = 1, rank: int = 0, *extra: str):
    from pretrain.data.loader import ShardTrain
    from pretrain.train.config_file import load_config

    cfg = load_config(None, ["model.name=vit_test4", "model.img_size=8", "model.num_classes=3",
                             f"data.train={shards}", f"data.workers={workers}", "train.micro_batch=4",
                             "data.shuffle_buffer=5", "data.max_bad_frac=1.0", *extra])
    return ShardTrain(cfg.loader(), rank, world)


def test_lost_samples_are_counted_from_the_index_by_shard_and_reason(damaged):
    total = sum(damaged["counts"].values())
    src = _loader(damaged["shards"], 1, 1, 0, "train.micro_batch=1")  # one stream of one row a step
    for _ in range(total):  # one epoch: every lost sample keeps its row (filled with the last usable one)
        src.next_batch()
    stats = src.stats()
    assert stats["bad_by_shard"]["train-000002.tar"] == damaged["lost_cut"] > 1
    assert stats["bad_by_shard"]["train-000005.tar"] == damaged["lost_gone"] == damaged["counts"]["train-000005.tar"]
    assert stats["bad_by_reason"] == {"truncated_shard": damaged["lost_cut"], "missing_shard": damaged["lost_gone"]}


@pytest.mark.parametrize("stop", [3, 9, 17])
def test_resume_is_exact_after_lost_samples(damaged, stop):
    """The stream position counts lost samples in index units, so a resume lands on the next
    sample, within the epoch of the losses and across its end."""
    src = _loader(damaged["shards"], workers=2)
    straight = [list(src.next_batch().keys) for _ in range(24)]
    first = _loader(damaged["shards"], workers=2)
    head = [list(first.next_batch().keys) for _ in range(stop)]
    resumed = _loader(damaged["shards"], workers=2)
    resumed.load_state_dict(first.state_dict())
    tail = [list(resumed.next_batch().keys) for _ in range(24 - stop)]
    assert head + tail == straight
    again = _loader(damaged["shards"], workers=2)
    for _ in range(24):
        again.next_batch()
    assert resumed.stats()["bad_by_shard"] == again.stats()["bad_by_shard"], "counts add up over the resume"


def test_training_logs_lost_samples_summed_over_ranks_and_evaluate_reports_a_shortfall(damaged, tmp_path):
    run = tmp_path / "run"
    proc = vitscale("pretrain", *TINY, "model.img_size=8", "model.num_classes=3", f"data.train={damaged['shards']}",
                    "data.val=null", "data.workers=1", "data.max_bad_frac=0.5", "train.steps=24", "train.log_every=24",
                    "checkpoint.every=0", f"run.dir={run}", check=True)
    rec = [r for r in read_metrics(run) if "loss" in r][-1]
    # nothing lost silently: on the console at the log line, and in summary.json
    assert f"data: {rec['bad_samples']} samples lost since the last line" in proc.stdout, proc.stdout[-2000:]
    assert f"lost samples   {rec['bad_samples']}" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["bad_samples"] == rec["bad_samples"] and summary["bad_by_reason"] == rec["bad_by_reason"]
    # 384 samples drawn, ~6 epochs: the job's counts are both ranks' loaders' counts added up
    by_shard = rec["bad_by_shard"]
    assert set(by_shard) == {"train-000002.tar", "train-000005.tar"}
    ranks = [_loader(damaged["shards"], 1, 2, r, "train.micro_batch=8", "data.shuffle_buffer=2000") for r in (0, 1)]
    for src in ranks:
        for _ in range(24):
            src.next_batch()
    assert by_shard == sum_counts([src.stats()["bad_by_shard"] for src in ranks])
    assert rec["bad_by_reason"] == {"truncated_shard": by_shard["train-000002.tar"],
                                    "missing_shard": by_shard["train-000005.tar"]}
    assert rec["bad_samples"] == sum(by_shard.values())
    val = vitscale_here("evaluate", "--checkpoint", str(run), "--data", str(damaged["shards"]), "--workers", "0",
                        "--json", check=True)
    result = json.loads(val.stdout.strip().splitlines()[-1])
    assert result["samples"] == result["expected"]  # the val split is intact
    cut = tmp_path / "val"
    shutil.copytree(damaged["shards"], cut)
    tar = cut / "val-000000.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    val = vitscale_here("evaluate", "--checkpoint", str(run), "--data", str(cut), "--workers", "0", "--json")
    result = json.loads(val.stdout.strip().splitlines()[-1])
    assert result["samples"] < result["expected"] and f"scored {result['samples']} of the {result['expected']}" \
        in val.stderr and "val-000000.tar" in val.stderr


# ---------------------------------------------------------------- a damaged `latest`

# garbage in `latest` (a relaunch falls back to the newest verified checkpoint): tests/test_resume.py,
# test_damaged_checkpoints_are_refused_or_skipped


# ---------------------------------------------------------------- values and inputs checked before anything starts

@pytest.mark.parametrize("argv,expect", [
    (["pretrain", *TINY, "--nproc-per-node", "0"], "--nproc-per-node 0: must be >= 1"),
    (["preflight", "--config", "configs/demo_cpu.yaml", "--nodes", "0"], "--nodes 0: must be >= 1"),
    (["preflight", "--config", "configs/demo_cpu.yaml", "--gpu-mem-gb", "-5"], "--gpu-mem-gb -5"),
    (["pretrain", *TINY, "model.depth=0"], "model.depth=0"),
    (["pretrain", *TINY, "model.width=-8"], "model.width=-8"),
    (["pretrain", *TINY, "train.max_bad_steps=0"], "train.max_bad_steps=0"),
    (["pretrain", *TINY, "optim.lr=.inf"], "optim.lr=inf: must be a finite number"),
    (["pretrain", *TINY, "train.steps=[1,2"], "is not valid YAML"),
    (["pretrain", "--config", "NOTES"], "is not a recipe"),
    (["pretrain", "--config", "configs/"], "is a directory"),
    (["shards", "synth", "OUT", "--classes", "-1"], "--classes -1: must be >= 2"),
    (["shards", "synth", "README.md"], "README.md is a file"),
])
def test_impossible_values_are_one_line_and_exit_2(argv, expect, tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("remember to lower the lr next time\n")
    argv = [a.replace("OUT", str(tmp_path / "out")).replace("NOTES", str(tmp_path / "notes.txt")) for a in argv]
    if argv[0] == "pretrain":
        argv.append(f"run.dir={tmp_path / 'run'}")
    monkeypatch.chdir(ROOT)  # in-process (the command line itself is tested in test_config): the same main()
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- a full or read-only disk

@pytest.fixture
def small_disk(tmp_path):
    """A 12 MiB tmpfs (real ENOSPC / EROFS); skipped where this user may not mount."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()[:80]})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_during_a_save_says_so_and_the_relaunch_resumes(small_disk):
    run = small_disk / "run"
    args = [*TINY, "train.steps=100000", "checkpoint.every=4", "checkpoint.keep=1", "data.val=null"]
    proc = start(run, *args[len(TINY):])
    filler = small_disk / "filler"
    try:
        wait_until(lambda: (run / "checkpoints" / "latest").is_file(), proc, what="the first checkpoint")
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)  # until ENOSPC
        rc = proc.wait(120)
    finally:
        kill_job(proc)
    text = output(run)
    assert rc == 2 and "the disk under" in text and "is full" in text, text[-2000:]
    assert text.count("is full") == 1 and "Traceback" not in text
    step = int(latest(run).split("_")[1])
    filler.unlink()
    again = vitscale(*pretrain_args(run, f"train.steps={step + 2}", "checkpoint.every=0", "data.val=null"),
                     check=True)
    assert f"at step {step}" in again.stdout


def test_a_read_only_run_dir_is_refused_before_anything_starts(small_disk):
    run = small_disk / "run"
    run.mkdir()  # a run dir that exists (a first run would have made it) on a disk that turns read-only
    (run / "config.yaml").write_text("# the earlier run's\n")
    assert subprocess.run(["mount", "-o", "remount,ro", str(small_disk)]).returncode == 0
    proc = vitscale_here("pretrain", *TINY, "train.steps=4", "data.val=null", f"run.dir={run}")
    assert proc.returncode == 2
    assert "cannot write in" in proc.stderr and "Read-only" in proc.stderr and "Traceback" not in proc.stderr


def test_the_launcher_module_is_importable_without_side_effects():
    """Signal handlers are installed by spawn(), not at import (a re-entrant handler once imported
    psutil inside itself)."""
    code = "import signal, pretrain.train.spawn; print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True)
    assert out.stdout.strip() == "True"
