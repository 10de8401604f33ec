"""`vitscale bench loader` on a few generated shards: the JSON contract and the worker split."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import pretrain.bench.loader as bench_loader
import pretrain.bench.loader_paths as loader_paths
from data_tools.shard_writer import WriteOptions, write_shards


def _shards(root: Path, images: int, per_shard: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(images):
        path = root / "src" / f"c{i:02d}" / "img.jpg"
        path.parent.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    options = WriteOptions(samples_per_shard=per_shard, workers=1, progress=False)
    write_shards(root / "src", root / "out", options)
    return root / "out"


def test_bench_prints_the_json_contract(tmp_path: Path, capsys) -> None:
    out = _shards(tmp_path, images=12, per_shard=4)
    argv = ["--shards", str(out), "--workers", "1", "--img-size", "32", "--batch-size", "4", "--batches", "2",
            "--gpu-device", "cpu", "--json"]
    assert bench_loader.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("images_per_s", "images_per_s_per_core", "baseline_images_per_s",
                "baseline_images_per_s_per_core", "webdataset_images_per_s", "webdataset_images_per_s_per_core",
                "speedup_vs_baseline", "speedup_per_core_vs_baseline", "speedup_per_core_vs_webdataset"):
        assert result[key] > 0
    assert (result["workers"], result["img_size"], result["shards"]) == (1, 32, 3)
    assert set(result["runs"]) == {"ours", "randaug", "pil", "webdataset", "overhead", "gpu"}
    assert (result["randaug"]["layers"], result["randaug"]["magnitude"]) == (2, 15)
    assert result["randaug"]["images_per_s_per_core"] > 0 and "RandAugment(2, 15)" in bench_loader.format_result(result)
    assert all(run["images"] == 8 and run["batches"] == 2 for run in result["runs"].values())
    overhead = result["overhead"]
    assert overhead["us_per_image"] > 0 and overhead["ours_cpu_us_per_image"] > 0 and overhead["share"] > 0
    fidelity = result["fidelity"]
    assert fidelity["ours"]["images"] == 12 and fidelity["gpu_path"]["images"] == 12
    assert "within_bound" in fidelity["ours"] and fidelity["gpu_path"]["device"] == "cpu"  # noise: no bound
    assert {"cpu", "cpu_count", "torch", "simplejpeg"} <= set(result["machine"])
    assert result["decoder"].startswith("simplejpeg")
    assert all(v >= 1 for v in result["cores_needed"].values())
    assert "plain PIL path" in bench_loader.format_result(result)


@pytest.mark.parametrize("images,per_shard,per_worker", [(12, 4, (8, 4)), (6, 6, (3, 3))])
def test_workers_read_disjoint_samples_covering_the_data(tmp_path: Path, monkeypatch, images: int,
                                                         per_shard: int, per_worker: tuple[int, int]) -> None:
    """3 shards over 2 workers split by shard; 1 shard over 2 workers splits by sample."""
    out = _shards(tmp_path, images=images, per_shard=per_shard)
    index = json.loads((out / "index.json").read_text())
    files = [str(out / s["file"]) for s in index["splits"]["train"]["shards"]]
    dataset = loader_paths.ShardImages(files, "ours", img_size=16)
    seen = []
    for worker, count in enumerate(per_worker):
        fake_info = SimpleNamespace(id=worker, num_workers=2)
        monkeypatch.setattr(loader_paths, "get_worker_info", lambda info=fake_info: info)
        seen.append([item[1] for item in itertools.islice(dataset.samples(), count)])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(images))
