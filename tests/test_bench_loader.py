"""`vitscale bench loader` on shards written by `vitscale shards synth` + `write`: it times the
training loader itself (the keys it delivered are a real ShardTrain's), and its JSON contract."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import psutil
import pytest

import pretrain.bench.loader as bench_loader
from data_tools.cli import main as shards_main
from pretrain.core.errors import UserError
from pretrain.data.config import DataConfig, LoaderSpec
from pretrain.data.loader import ShardTrain


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """24 JPEGs of 4 classes in 3 train shards of 8."""
    root = tmp_path_factory.mktemp("bench-loader")
    assert shards_main(["synth", str(root / "img"), "--classes", "4", "--per-class", "6", "--img-size", "48"]) == 0
    assert shards_main(["write", str(root / "img"), str(root / "sh"), "--samples-per-shard", "8", "--workers", "1",
                        "--no-progress"]) == 0
    return root / "sh"


def _no_stopped_children() -> bool:
    return all(p.status() != psutil.STATUS_STOPPED for p in psutil.Process().children())


def test_bench_draws_the_training_loaders_own_batches(shards: Path, capsys) -> None:
    """The ``ours`` path is a ShardTrain: every key it delivered, in order, is what a ShardTrain
    built from the same settings delivers (2 workers: two slots, the shuffle buffer, the hand-over)."""
    argv = ["--shards", str(shards), "--workers", "2", "--img-size", "32", "--batch-size", "4", "--batches", "4",
            "--randaug", "0", "--json"]
    assert bench_loader.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    ours = result["runs"]["ours"]
    assert result["loader"] == ours["loader"] == "pretrain.data.loader.ShardTrain"
    assert ours["batches_drawn"] == 2 * 2 + ours["batches"]  # warm-up (2 per worker) + timed
    spec = LoaderSpec(DataConfig(train=str(shards), val=None, workers=2), micro_batch=4, img_size=32, num_classes=4,
                      seed=0)
    source, digest = ShardTrain(spec, rank=0, world=1), hashlib.sha256()
    try:
        for _ in range(ours["batches_drawn"]):
            digest.update("".join(f"{key}\n" for key in source.next_batch().keys).encode())
    finally:
        source.close()
    assert ours["keys_sha256"] == digest.hexdigest()
    assert set(result["runs"]) == {"ours", "transform", "pil", "webdataset"}
    assert all(run["worker_processes"] == 2 for run in result["runs"].values())  # each path's own workers
    assert _no_stopped_children()


def test_bench_prints_the_json_contract(shards: Path, capsys) -> None:
    argv = ["--shards", str(shards), "--workers", "1", "--img-size", "32", "--batch-size", "4", "--batches", "2",
            "--gpu-device", "cpu", "--json"]
    assert bench_loader.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("images_per_s", "images_per_s_per_core", "baseline_images_per_s",
                "baseline_images_per_s_per_core", "webdataset_images_per_s", "webdataset_images_per_s_per_core",
                "speedup_vs_baseline", "speedup_per_core_vs_baseline", "speedup_per_core_vs_webdataset"):
        assert result[key] > 0
    assert (result["workers"], result["img_size"], result["batch_size"], result["shards"], result["samples"]) == \
        (1, 32, 4, 3, 24)
    assert result["command"] == "vitscale bench loader " + " ".join(argv)
    runs = result["runs"]
    assert set(runs) == {"ours", "randaug", "transform", "pil", "webdataset", "gpu"}
    assert {runs[name]["loader"] for name in ("ours", "randaug", "gpu")} == {"pretrain.data.loader.ShardTrain"}
    assert all(run["images"] == 4 * run["batches"] and run["batches"] >= 2 and run["worker_processes"] == 1
               and run["rank_wait_ms_per_batch"] > 0 for run in runs.values())
    assert (result["randaug"]["layers"], result["randaug"]["magnitude"]) == (2, 15)
    assert result["randaug"]["images_per_s_per_core"] > 0 and "RandAugment(2, 15)" in bench_loader.format_result(result)
    overhead = result["overhead"]
    assert overhead["transform_us_per_image"] == runs["transform"]["transform_cpu_us_per_image"] > 0
    assert overhead["us_per_image"] == pytest.approx(
        overhead["ours_cpu_us_per_image"] - overhead["transform_us_per_image"], abs=0.2)
    assert len(overhead["window_us_per_image"]) == len(result["window_speedups_per_core_vs_baseline"]) >= 1
    fidelity = result["fidelity"]
    assert fidelity["ours"]["images"] == 24 and fidelity["gpu_path"]["images"] == 24
    assert "within_bound" in fidelity["ours"] and fidelity["gpu_path"]["device"] == "cpu"  # noise: no bound
    assert {"cpu", "cpu_count", "torch", "simplejpeg", "load_avg_start", "load_avg_end"} <= set(result["machine"])
    assert result["decoder"].startswith("simplejpeg")
    assert all(v >= 1 for v in result["cores_needed"].values())
    text = bench_loader.format_result(result)
    assert "plain PIL path" in text and "pretrain.data.loader.ShardTrain" in text and "load average" in text
    assert _no_stopped_children()


@pytest.mark.parametrize("flags", [["--workers", "0"], ["--workers", "4"], ["--randaug", "2"], ["--randaug", "2,40"]])
def test_bad_flags_are_user_errors(shards: Path, flags: list[str]) -> None:
    with pytest.raises(UserError):
        bench_loader.main(["--shards", str(shards), *flags])
