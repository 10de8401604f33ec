"""Users' data layouts and mistakes, end to end through the real CLI: ImageNet's separate train/ and
val/ folders, a wrong data path stopped before any rank starts, an eval failure that must not cost
the checkpoint of its step, and a quiet console under ZeRO-3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pretrain.data.shards import decode_label, iter_tar_samples
from pretrain.data.synthetic import synthetic_uint8
from tests.helpers import TINY, read_metrics, vitscale, vitscale_here

CLASSES = ("n01440764", "n01443537", "n01484850", "n01491361")
SIZES = ((40, 30), (36, 48), (44, 44), (32, 40))  # ImageNet-like: mixed sizes and aspect ratios


def _imagenet_tree(root: Path, per_class: dict[str, int]) -> None:
    """``root/{train,val}/<wnid>/<wnid>_<n>.JPEG``: JPEGs of a learnable task (the synthetic task's
    class layouts, resized to mixed sizes), as an ImageNet download is laid out."""
    for split, count in per_class.items():
        for c, wnid in enumerate(CLASSES):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                index = (10_000 if split == "val" else 0) + i * len(CLASSES) + c
                pixels = synthetic_uint8(index, len(CLASSES), 16, seed=0)
                img = Image.fromarray(np.ascontiguousarray(pixels)).resize(SIZES[i % len(SIZES)], Image.BILINEAR)
                img.save(folder / f"{wnid}_{index}.JPEG", quality=92)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("imagenet")
    _imagenet_tree(root / "raw", {"train": 40, "val": 12})
    for split in ("train", "val"):
        vitscale_here("shards", "write", str(root / "raw" / split), str(root / "shards" / split), "--samples-per-shard",
                      "20", "--workers", "1", "--no-progress", check=True)
    return {"root": root, "train": root / "shards" / "train", "val": root / "shards" / "val"}


def test_imagenet_train_and_val_folders_sharded_separately_train_and_evaluate(imagenet):
    """`shards write IN/train OUT/train`, `shards write IN/val OUT/val`, then pretrain with
    data.val=OUT/val on 2 processes under ZeRO-3 (the val set's only split is used, and the log
    says so), and `vitscale evaluate --data OUT/val` scores every val image. With Python's default
    warning filters (as a user has them) the console holds vitscale's own lines only: no
    third-party warning, nothing between the step lines but the evaluations."""
    run = imagenet["root"] / "run"
    proc = vitscale("pretrain", "--config", "configs/demo_cpu.yaml", "--nproc-per-node", "2", *TINY,
                    f"run.dir={run}", f"data.train={imagenet['train']}", f"data.val={imagenet['val']}",
                    "data.workers=1", "train.steps=24", "train.eval_every=12", "checkpoint.every=12",
                    "model.representation_size=null", "optim.lr=0.005", "data.hflip=false",
                    "data.crop_scale_min=0.6", "zero.stage=3", env=_env_with_warnings(), check=True)
    assert f"data.val={imagenet['val']}: no 'val' split there, so its only split 'train' is used" in proc.stdout
    out = (proc.stdout + proc.stderr).splitlines()
    first = next(i for i, line in enumerate(out) if line.startswith("step "))
    last = max(i for i, line in enumerate(out) if line.startswith("step "))
    between = [line for line in out[first:last + 1] if not line.startswith(("step ", "eval @ ", "health @ "))]
    assert between == [], between
    warned = [line for line in out if "Warning" in line or "return func(" in line]
    assert warned == [], warned
    assert sum("built successfully" in line for line in out) <= 1

    evals = read_metrics(run, "eval")
    assert [e["step"] for e in evals] == [12, 24]
    assert all(e["eval_samples"] == e["eval_expected"] == 48 for e in evals)
    out = vitscale("evaluate", "--checkpoint", str(run), "--data", str(imagenet["val"]), "--json", check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["samples"] == result["expected"] == 48
    assert result["top1"] == pytest.approx(evals[-1]["top1"], abs=1e-6)
    assert result["top1"] > 0.4  # 4 classes: chance is 0.25


def test_split_names_and_what_stats_and_verify_show(imagenet, tmp_path):
    out = tmp_path / "val"
    vitscale_here("shards", "write", str(imagenet["root"] / "raw" / "val"), str(out), "--split", "val",
                  "--samples-per-shard", "20", "--workers", "1", "--no-progress", check=True)
    assert sorted(p.name for p in out.glob("*.tar")) == ["val-000000.tar", "val-000001.tar", "val-000002.tar"]
    assert list(json.loads((out / "index.json").read_text())["splits"]) == ["val"]
    stats = json.loads(vitscale_here("shards", "stats", str(out), "--json", "--workers", "1", "--no-progress",
                                     check=True).stdout)
    assert stats["splits"] == {"val": {"samples": 48, "shards": 3, "bytes": stats["splits"]["val"]["bytes"]}}
    verify = vitscale_here("shards", "verify", str(out), "--workers", "1", "--no-progress", check=True).stdout
    assert "split val: 48 good samples of 48 in 3 shards" in verify
    train = vitscale_here("shards", "stats", str(imagenet["train"]), "--workers", "1", "--no-progress", check=True)
    assert "train: 160 samples in 8 shards" in train.stdout


def test_a_val_folder_with_other_classes_is_refused_until_written_with_the_train_table(imagenet, tmp_path):
    """A val/ folder lacking one class folder gets its own class table when sharded alone (index 0 is
    another class there): pretrain refuses it before start, naming data.val and the --classes fix;
    written with `--classes OUT/train`, its labels are the train set's indices and it runs."""
    import shutil

    raw = tmp_path / "val_raw"
    shutil.copytree(imagenet["root"] / "raw" / "val", raw, ignore=lambda d, names: [CLASSES[0]] if d.endswith("val")
                    else [])
    alone, aligned = tmp_path / "alone", tmp_path / "aligned"
    write = ("--samples-per-shard", "20", "--workers", "1", "--no-progress")
    vitscale_here("shards", "write", str(raw), str(alone), *write, check=True)
    args = ("pretrain", "--config", "configs/demo_cpu.yaml", "--nproc-per-node", "2", *TINY,
            f"data.train={imagenet['train']}", "data.workers=1", "data.crop_scale_min=0.6", "train.steps=2")
    proc = vitscale_here(*args, f"data.val={alone}", f"run.dir={tmp_path / 'run1'}")
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "data.val: its class table differs from data.train's (3 vs 4 classes; index 0 is" in line
    assert "--classes" in line and not (tmp_path / "run1").exists()

    bad = vitscale_here("shards", "write", str(imagenet["root"] / "raw" / "train"), str(tmp_path / "x"), "--classes",
                        str(alone), *write)
    assert bad.returncode == 2 and f"--classes {alone}: the source has 1 classes that table lacks" in bad.stderr

    vitscale_here("shards", "write", str(raw), str(aligned), "--classes", str(imagenet["train"]), *write, check=True)
    index = json.loads((aligned / "index.json").read_text())
    assert index["num_classes"] == 4
    labels = {decode_label(s.files, 4, False) for s in _samples(aligned)}
    assert labels == {1, 2, 3}  # the train set's indices of the three classes present
    vitscale(*args, f"data.val={aligned}", f"run.dir={tmp_path / 'run2'}", "--nproc-per-node", "1", check=True)


def _samples(folder: Path) -> list:

    return [s for tar in sorted(folder.glob("*.tar")) for s in iter_tar_samples(str(tar))]


@pytest.mark.parametrize("key,value,expect", [
    ("data.val", "{val}/../nowhere", "data.val="),
    ("data.train", "{train}/train-{{000000..000099}}.tar", "data.train: 92 of 100 shards do not exist"),
    ("data.streams", "3", "data.streams=3 does not divide train.global_batch=16"),
])
def test_a_wrong_data_path_stops_before_any_rank_starts(imagenet, tmp_path, key, value, expect):
    """One line naming the key, exit 2, in the launching process: no run dir, no rank, no traceback."""
    run = tmp_path / "run"
    value = value.format(val=imagenet["val"], train=imagenet["train"])
    proc = vitscale_here("pretrain", "--config", "configs/demo_cpu.yaml", "--nproc-per-node", "2", *TINY,
                         f"data.train={imagenet['train']}", f"data.val={imagenet['val']}", "data.workers=2",
                         f"run.dir={run}", f"{key}={value}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and lines[0].startswith("vitscale pretrain: error: ")
    assert not run.exists() and "Traceback" not in proc.stderr and "DeepSpeed" not in proc.stdout


def test_an_eval_that_fails_where_a_checkpoint_is_due_leaves_the_checkpoint(tmp_path):
    """Steps 4 and 8 are both checkpoint and eval steps; the eval at 4 fails (as unreadable val
    shards would): the checkpoint of step 4 is there, the message is printed once, exit 2."""
    run = tmp_path / "run"
    env_fault = {"VITSCALE_FAULT": "evalfail@4"}
    from tests.helpers import cli_env

    proc = vitscale("pretrain", "--config", "configs/demo_cpu.yaml", "--nproc-per-node", "2", *TINY,
                    f"run.dir={run}", "train.steps=8", "train.eval_every=4", "checkpoint.every=4",
                    env={**cli_env(), **env_fault})
    assert proc.returncode == 2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert proc.stderr.count("evaluation at step 4 failed") == 1
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr


def _env_with_warnings() -> dict:
    """The test environment, but with Python's default warning filters (as a user has them)."""
    from tests.helpers import cli_env

    env = cli_env()
    env.pop("PYTHONWARNINGS", None)
    return env
