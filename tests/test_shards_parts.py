"""`vitscale shards write --part I/N`, `shards merge` and `launch slurm-array`: one shard set written
by many machines is the set one machine writes, byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data_tools.shard_writer as shard_writer
from data_tools.shard_writer import WriteOptions, write_shards
from launch import cli as launch_cli
from pretrain.cli import main as vitscale_main
from pretrain.core.errors import UserError
from tests.helpers import ROOT, cli_env

SET_FILES = ("index.json", "classes.json", "skipped.jsonl")


def _source(root: Path) -> Path:
    """An ImageFolder of 17 JPEG/PNG images in 4 classes (one class folder empty, one image broken)."""
    for c, name in enumerate(("ant", "bee", "cow", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(0 if name == "cow" else 5 + c):
            rng = np.random.default_rng(100 * c + i)
            img = Image.fromarray(rng.integers(0, 255, (12 + i, 16 + c, 3), dtype=np.uint8)).resize((40 + 4 * i, 32))
            img.save(root / name / f"{name}_{i}.{'png' if i == 2 else 'jpg'}", quality=80)
    (root / "bee" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def _opts(**kw) -> WriteOptions:
    return WriteOptions(**{"samples_per_shard": 3, "val_fraction": 0.25, "workers": 1, "progress": False, **kw})


def _files(out: Path) -> dict[str, bytes]:
    """Every shard and set file of ``out``, by name."""
    names = [p.name for p in sorted(out.glob("*.tar"))] + list(SET_FILES)
    return {name: (out / name).read_bytes() for name in names}


@pytest.fixture(scope="module")
def one_machine(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("parts")
    src = _source(root / "src")
    write_shards(src, root / "one", _opts())
    return src, root / "one"


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_n_parts_give_the_bytes_one_machine_writes(one_machine, tmp_path, parts):
    src, one = one_machine
    out = tmp_path / "out"
    owned = []
    for part in range(parts):
        summary = write_shards(src, out, _opts(part=(part, parts)))
        owned.append(summary.shards)
        last = part == parts - 1
        assert (summary.index is not None) == last and (out / "index.json").exists() == last
        if not last:
            assert f"{parts - 1 - part} of {parts} parts have not finished" in summary.not_merged
    expected = _files(one)
    assert _files(out) == expected
    shards = [name for name in expected if name.endswith(".tar")]
    assert sum(owned, []) == shards  # contiguous runs of the plan, every shard written by exactly one part
    index = json.loads(expected["index.json"])
    assert index["num_classes"] == 4 and set(index["splits"]) == {"train", "val"}
    for part in range(parts):  # the class table is the whole listing's, also in a part that sees one class
        record = json.loads((out / "_parts" / f"part-{part}-of-{parts}.json").read_text())
        assert record["classes"] == ["ant", "bee", "cow", "dog"]


def test_parts_started_together_as_processes_merge_into_the_same_set(one_machine, tmp_path):
    src, one = one_machine
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pretrain", "shards", "write", str(src), str(out), "--samples-per-shard", "3",
           "--val-fraction", "0.25", "--workers", "1", "--no-progress"]
    procs = [subprocess.Popen([*cmd, "--part", f"{i}/3"], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert all(f"part {i}/3 of {out}" in o for i, (o, _) in enumerate(outputs))
    assert _files(out) == _files(one)
    done = subprocess.run([sys.executable, "-m", "pretrain", "shards", "merge", str(out)], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "merged" in done.stdout and "train 15 samples in 6 shards" in done.stdout
    assert _files(out) == _files(one)


def test_a_part_resumes_skipping_finished_shards_and_rewriting_a_half_written_one(one_machine, tmp_path,
                                                                                     monkeypatch):
    src, one = one_machine
    out = tmp_path / "out"
    real_encode, calls = shard_writer.encode_image, {"n": 0}

    def dying_encode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # inside the part's second shard
            raise KeyboardInterrupt
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(shard_writer, "encode_image", dying_encode)
    with pytest.raises(KeyboardInterrupt):
        write_shards(src, out, _opts(part=(0, 2)))
    monkeypatch.setattr(shard_writer, "encode_image", real_encode)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar"]
    assert list((out / ".progress").glob("*.partial")) and not (out / "_parts").exists()

    first = write_shards(src, out, _opts(part=(0, 2)))
    assert (first.shards_reused, first.shards_written) == (1, 3) and first.index is None
    assert not list((out / ".progress").glob("*.partial"))
    again = write_shards(src, out, _opts(part=(0, 2)))  # idempotent: everything is reused
    assert (again.shards_reused, again.shards_written) == (4, 0)

    (out / "train-000001.tar").write_bytes(b"cut short")  # a damaged shard is not done: it is rewritten
    repaired = write_shards(src, out, _opts(part=(0, 2)))
    assert (repaired.shards_reused, repaired.shards_written) == (3, 1)
    write_shards(src, out, _opts(part=(1, 2)))
    assert _files(out) == _files(one)


def _merge(out: Path, capsys) -> tuple[int, str]:
    code = vitscale_main(["shards", "merge", str(out)])
    return code, capsys.readouterr().err


def test_merge_refuses_a_missing_part_another_listing_other_options_and_a_lost_shard(tmp_path, capsys):
    src = _source(tmp_path / "src")
    out = tmp_path / "out"
    write_shards(src, out, _opts(part=(0, 3)))
    write_shards(src, out, _opts(part=(2, 3)))
    code, err = _merge(out, capsys)
    assert code == 2 and "1 of 3 parts have not finished: 1/3" in err and len(err.strip().splitlines()) == 1

    Image.new("RGB", (30, 20), (200, 10, 10)).save(src / "ant" / "ant_new.jpg")  # the source changed
    summary = write_shards(src, out, _opts(part=(1, 3)))
    assert summary.index is None and "another source listing" in summary.not_merged
    code, err = _merge(out, capsys)
    assert code == 2 and "part 1/3 was written from another source listing than part 0/3" in err
    assert not (out / "index.json").exists()

    (src / "ant" / "ant_new.jpg").unlink()
    write_shards(src, out, _opts(part=(1, 3), seed=7))
    code, err = _merge(out, capsys)
    assert code == 2 and "other write options" in err and "seed 0 vs 7" in err

    write_shards(src, out, _opts(part=(1, 3)))
    assert (out / "index.json").exists()  # the last part to finish merged
    (out / "val-000000.tar").unlink()
    code, err = _merge(out, capsys)
    assert code == 2 and "val-000000.tar (part 2/3) is missing" in err and "--part 2/3" in err

    with pytest.raises(UserError, match="holds no part records"):
        shard_writer.merge_parts(tmp_path / "src")
    assert vitscale_main(["shards", "write", str(src), str(tmp_path / "x"), "--part", "3/3"]) == 2
    assert "I must be in 0..N-1" in capsys.readouterr().err


def test_slurm_array_scripts_run_every_part_and_the_merge(one_machine, tmp_path, monkeypatch, capsys):
    src, one = one_machine
    out = tmp_path / "out"
    monkeypatch.setattr(launch_cli, "vitscale_command", lambda: [sys.executable, "-m", "pretrain"])
    monkeypatch.chdir(tmp_path)
    own = ["slurm-array", "--shards-write", str(src), str(out), "--parts", "3", "--cpus-per-task", "1",
           "--partition", "cpu", "--time", "2:00:00"]
    write = ["--", "--samples-per-shard", "3", "--val-fraction", "0.25", "--no-progress"]
    assert launch_cli.main([*own, "--dry-run", *write]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()  # a dry run writes nothing
    for line in ("#SBATCH --array=0-2", "#SBATCH --cpus-per-task=1", "#SBATCH --partition=cpu",
                 f"#SBATCH --output={out}/_parts/slurm/%A_%a.log", '--part "$SLURM_ARRAY_TASK_ID/3"',
                 f"shards merge {out}", "sbatch --dependency=afterok:${jid%%;*}"):
        assert line in printed

    assert launch_cli.main([*own, *write]) == 0
    folder = out / "_parts" / "slurm"
    assert "submit with" in capsys.readouterr().out
    env = {**cli_env(), "SLURM_CPUS_PER_TASK": "1"}
    for task in range(3):  # what SLURM does: the script once per array task, then the merge job
        done = subprocess.run(["bash", str(folder / "write.sbatch")], env={**env, "SLURM_ARRAY_TASK_ID": str(task)},
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert f"part {task}/3 on" in done.stdout
    done = subprocess.run(["bash", str(folder / "merge.sbatch")], env=env, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert _files(out) == _files(one)
    no_task = subprocess.run(["bash", str(folder / "write.sbatch")], env=env, capture_output=True, text=True)
    assert no_task.returncode == 2 and "submit this script with sbatch" in no_task.stderr


def test_slurm_array_checks_write_options_and_submits_the_merge_after_the_array(one_machine, tmp_path,
                                                                                  monkeypatch, capsys):
    src, _ = one_machine
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        launch_cli.main(["slurm-array", "--shards-write", str(src), str(out), "--parts", "2", "--",
                         "--resize-maxx", "512"])
    assert exit_.value.code == 2 and "--resize-maxx" in capsys.readouterr().err
    with pytest.raises(UserError, match="the array sets --part"):
        launch_cli.main(["slurm-array", "--shards-write", str(src), str(out), "--parts", "2", "--", "--part", "0/2"])
    with pytest.raises(UserError, match="--quality is 101"):
        launch_cli.main(["slurm-array", "--shards-write", str(src), str(out), "--parts", "2", "--", "--quality", "101"])

    bin_ = tmp_path / "bin"
    bin_.mkdir()
    sbatch = bin_ / "sbatch"
    sbatch.write_text('#!/bin/bash\necho "$*" >> "${0%/*}/calls"\n'
                      'if [[ $1 == --parsable ]]; then echo "4711;cluster"; else echo "Submitted batch job 4712"; fi\n')
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    assert launch_cli.main(["slurm-array", "--shards-write", str(src), str(out), "--parts", "2", "--submit"]) == 0
    calls = (bin_ / "calls").read_text().splitlines()
    folder = out / "_parts" / "slurm"
    assert calls == [f"--parsable {folder / 'write.sbatch'}", f"--dependency=afterok:4711 {folder / 'merge.sbatch'}"]
    assert "Submitted batch job 4712" in capsys.readouterr().out
    summary = write_shards(src, out, _opts(part=(0, 2)))  # the scripts in OUT/_parts do not make OUT foreign
    assert summary.shards
