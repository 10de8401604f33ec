"""The streaming shard loader: layout, equal steps, exact resume, bad samples (no DeepSpeed needed)."""

import dataclasses
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.shard_writer import WriteOptions, write_shards
from data_tools.synth import write_synthetic_folder
from pretrain.core.errors import UserError
from pretrain.data import jpeg
from pretrain.data.loader import ShardEval, ShardTrain
from pretrain.train.config_file import load_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    write_synthetic_folder(root / "img", classes=4, per_class=20, img_size=16, seed=0)
    write_shards(root / "img", root / "sh", WriteOptions(samples_per_shard=10, workers=1, progress=False))
    return root / "sh"


def _cfg(train: str, **kw):
    over = {"model.name": "vit_test4", "model.img_size": "16", "model.num_classes": "4", "data.train": train,
            "data.workers": "2", "train.micro_batch": "5", "data.shuffle_buffer": "7", **kw}
    return load_config(None, [f"{k}={v}" for k, v in over.items()])


def _keys(src, n):
    out = []
    for _ in range(n):
        b = src.next_batch()
        assert b.images.shape == (5, 3, 16, 16) and b.images.dtype == torch.uint8  # normalised on the device
        out.append(list(b.keys))
    return out


def test_ranks_and_workers_see_disjoint_keys_whose_union_is_the_epoch(shards):
    cfg = _cfg(str(shards))
    per_rank = [[k for batch in _keys(ShardTrain(cfg.loader(), r, 2), 8) for k in batch] for r in range(2)]
    assert len(set(per_rank[0]) & set(per_rank[1])) == 0
    union = set(per_rank[0]) | set(per_rank[1])
    assert len(union) == 80 and all(len(k) == 40 for k in per_rank)


def test_order_is_a_pure_function_of_seed_and_changes_per_epoch(shards):
    cfg = _cfg(str(shards))
    a, b = _keys(ShardTrain(cfg.loader(), 0, 1), 32), _keys(ShardTrain(cfg.loader(), 0, 1), 32)
    assert a == b
    epoch0, epoch1 = sum(a[:16], []), sum(a[16:], [])
    assert len(set(epoch0)) == 80 and sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    other = _keys(ShardTrain(_cfg(str(shards), **{"run.seed": 1}).loader(), 0, 1), 16)
    assert other != a[:16]


@pytest.mark.parametrize("stop", [3, 9])
def test_resume_mid_epoch_gives_the_identical_key_sequence(shards, stop):
    cfg = _cfg(str(shards))
    straight = _keys(ShardTrain(cfg.loader(), 1, 2), 14)
    first = ShardTrain(cfg.loader(), 1, 2)
    head = _keys(first, stop)
    state = first.state_dict()
    resumed = ShardTrain(cfg.loader(), 1, 2)
    resumed.load_state_dict(state)
    assert head + _keys(resumed, 14 - stop) == straight


def test_streams_that_do_not_fit_the_batch_or_the_ranks_are_an_error_with_the_fix(shards):
    with pytest.raises(UserError, match=r"data.streams=3 does not divide train.global_batch=10.*data.streams"):
        ShardTrain(_cfg(str(shards), **{"data.streams": "3"}).loader(), 0, 2)
    with pytest.raises(UserError, match=r"data.streams=5 is not a multiple of the 2 ranks.*set data.streams=2"):
        ShardTrain(_cfg(str(shards), **{"data.streams": "5"}).loader(), 0, 2)
    more = ShardTrain(_cfg(str(shards), **{"data.workers": "8"}).loader(), 0, 2)  # more workers than streams
    assert more.workers == more.plan.count // 2 and len(more.next_batch().keys) == 5


def test_brace_pattern_without_index_is_counted(shards):
    cfg = _cfg(str(shards / "train-{000000..000007}.tar"))
    src = ShardTrain(cfg.loader(), 0, 2)
    assert src.shards.counts == (10,) * 8
    assert len({k for b in _keys(src, 8) for k in b}) == 40


def _corrupt_copy(shards: Path, dst: Path) -> Path:
    dst.mkdir()
    for i, tar_path in enumerate(sorted(shards.glob("train-*.tar"))):
        with tarfile.open(tar_path) as src, tarfile.open(dst / tar_path.name, "w") as out:
            for m in src.getmembers():
                data = src.extractfile(m).read()
                if i == 0 and m.name.endswith(".jpg"):
                    data = b"not a jpeg"
                    m.size = len(data)
                out.addfile(m, io.BytesIO(data))
    return dst


def test_corrupt_samples_are_skipped_counted_and_named(shards, tmp_path):
    bad_dir = _corrupt_copy(shards, tmp_path / "bad")
    cfg = _cfg(str(bad_dir / "train-{000000..000007}.tar"), **{"data.max_bad_frac": "0.05", "data.workers": "1"})
    src = ShardTrain(cfg.loader(), 0, 1)
    keys = _keys(src, 16)  # epoch 0: the 70 good samples, each bad one's row filled from its micro batch
    assert all(len(b) == 5 for b in keys) and len({k for b in keys for k in b}) == 70
    stats = src.stats()
    assert stats["bad_samples"] == 10 and stats["bad_by_reason"] == {"undecodable": 10}
    _keys(src, 12)  # past the minimum sample count the share is judged
    assert "train-000000.tar" in src.problem() and "max_bad_frac" in src.problem()
    lenient = ShardTrain(_cfg(str(bad_dir / "train-{000000..000007}.tar"), **{"data.max_bad_frac": "0.5",
                                                                               "data.workers": "1"}).loader(), 0, 1)
    _keys(lenient, 28)
    assert lenient.problem() is None


def test_eval_gives_every_rank_the_same_number_of_batches(tmp_path):
    write_synthetic_folder(tmp_path / "img", classes=4, per_class=9, img_size=16, seed=0)
    write_shards(tmp_path / "img", tmp_path / "sh", WriteOptions(samples_per_shard=7, workers=1, val_fraction=0.5,
                                                                 progress=False))
    cfg = _cfg(str(tmp_path / "sh"), **{"data.val": str(tmp_path / "sh")})
    runs = [list(ShardEval(cfg.loader(), r, 2, cfg.data.val)) for r in range(2)]
    assert len(runs[0]) == len(runs[1])
    from pretrain.data.shards import load_index

    n_val = load_index(tmp_path / "sh")["splits"]["val"]["samples"]
    assert sum(int(b.valid.sum()) for run in runs for b in run) == n_val


def test_multi_label_manifest_gives_multi_hot_targets(tmp_path):
    import json as _json

    write_synthetic_folder(tmp_path / "img", classes=3, per_class=8, img_size=16, seed=0)
    rows = []
    for i, path in enumerate(sorted((tmp_path / "img").rglob("*.jpg"))):
        rows.append({"path": str(path.relative_to(tmp_path)), "labels": sorted({i % 5, (i * 3) % 5})})
    (tmp_path / "m.jsonl").write_text("\n".join(_json.dumps(r) for r in rows))
    write_shards(tmp_path / "m.jsonl", tmp_path / "sh", WriteOptions(samples_per_shard=6, workers=1, progress=False))
    with pytest.raises(UserError, match="data.multi_label=true"):
        ShardTrain(_cfg(str(tmp_path / "sh"), **{"model.num_classes": "5"}).loader(), 0, 1)
    cfg = _cfg(str(tmp_path / "sh"), **{"model.num_classes": "5", "data.multi_label": "true", "train.loss": "sigmoid"})
    batch = ShardTrain(cfg.loader(), 0, 1).next_batch()
    assert batch.targets.shape == (5, 5) and batch.targets.dtype == torch.float32
    want = {r["path"].rsplit("/", 1)[-1].split(".")[0]: r["labels"] for r in rows}  # file stem -> labels
    for key, row in zip(batch.keys, batch.targets, strict=True):
        stem = next(s for s in want if key.endswith(s))
        assert sorted(torch.nonzero(row).flatten().tolist()) == want[stem]


@pytest.mark.parametrize("stop", [1, 6])
def test_the_device_prefetcher_keeps_resume_exact(shards, stop):
    """One batch is held ahead (on its way to the device); a checkpoint taken meanwhile does not
    count it, so the resumed stream is the uninterrupted one."""
    from pretrain.train.prefetch import DevicePrefetcher

    cfg = _cfg(str(shards), **{"data.workers": "1"})
    straight = _keys(DevicePrefetcher(ShardTrain(cfg.loader(), 0, 1), "cpu"), 12)
    first = DevicePrefetcher(ShardTrain(cfg.loader(), 0, 1), "cpu")
    head = _keys(first, stop)
    resumed = DevicePrefetcher(ShardTrain(cfg.loader(), 0, 1), "cpu")
    resumed.load_state_dict(first.state_dict())
    assert head + _keys(resumed, 12 - stop) == straight


# ---- decoders: simplejpeg, its Pillow fallback, data.decode=gpu (run on the CPU) ----

def _smooth_jpeg(path: Path, width: int, height: int, seed: int) -> None:
    """A photo-like JPEG: smooth colour fields and a soft blob (crops of it differ clearly)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(seed)
    chans = []
    for _ in range(3):
        c = 128 + 70 * np.sin(x / rng.uniform(8, 30) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(8, 30))
        c += 50 * np.exp(-((x - rng.uniform(0, width)) ** 2 + (y - rng.uniform(0, height)) ** 2) / (width * 3))
        chans.append(np.clip(c, 0, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.stack(chans, -1).astype(np.uint8)).save(path, quality=92)


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory) -> Path:
    """Larger, smoother JPEGs than the layout tests need, so that crops and decoders can be told apart."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(40):
        _smooth_jpeg(root / "img" / f"c{i % 4}" / f"{i:03d}.jpg", 96 + 8 * (i % 5), 80 + 6 * (i % 3), i)
    write_shards(root / "img", root / "sh", WriteOptions(samples_per_shard=10, workers=1, progress=False))
    return root / "sh"


def _photo_cfg(shards: Path, **kw):
    return _cfg(str(shards), **{"model.img_size": "32", **kw})


def _batches(spec, n, rank=0, world=2, state=None):
    src = ShardTrain(spec, rank, world)
    if state is not None:
        src.load_state_dict(state)
    return [src.next_batch() for _ in range(n)], src


def _gpu_spec(cfg):
    return dataclasses.replace(cfg.loader(), decode_device="cpu")


@pytest.mark.parametrize("decoder", ["simplejpeg", "pillow"])
def test_resume_is_exact_in_pixels_with_either_decoder(photo_shards, monkeypatch, decoder):
    if decoder == "pillow":
        monkeypatch.setattr(jpeg, "AVAILABLE", False)  # inherited by the forked workers
    spec = _photo_cfg(photo_shards).loader()
    straight, _ = _batches(spec, 6)
    head, first = _batches(spec, 2)
    rest, _ = _batches(spec, 4, state=first.state_dict())
    for a, b in zip(straight, head + rest, strict=True):
        assert a.keys == b.keys and torch.equal(a.images, b.images)


def test_fallback_decodes_the_same_crops(photo_shards, monkeypatch):
    spec = _photo_cfg(photo_shards).loader()
    fast, _ = _batches(spec, 4)
    monkeypatch.setattr(jpeg, "AVAILABLE", False)
    slow, _ = _batches(spec, 4)
    for a, b in zip(fast, slow, strict=True):
        assert a.keys == b.keys
        assert (a.images.float() - b.images.float()).abs().mean() < 3.0
    assert not all(torch.equal(a.images, b.images) for a, b in zip(fast, slow, strict=True))


def test_batches_stay_valid_while_workers_reuse_their_buffers(photo_shards):
    spec = _photo_cfg(photo_shards, **{"data.workers": "1"}).loader()
    held, _ = _batches(spec, 16, world=1)  # more batches than a worker has buffers
    src = ShardTrain(spec, 0, 1)
    for kept in held:
        fresh = src.next_batch()
        assert kept.keys == fresh.keys and torch.equal(kept.images, fresh.images.clone())


def test_gpu_decode_gives_the_same_samples_and_crops(photo_shards):
    cfg = _photo_cfg(photo_shards)
    cpu, _ = _batches(cfg.loader(), 4)
    gpu, _ = _batches(_gpu_spec(_photo_cfg(photo_shards, **{"data.decode": "gpu"})), 4)
    for a, b in zip(cpu, gpu, strict=True):
        assert a.keys == b.keys and torch.equal(a.targets, b.targets)
        assert b.images.shape == (5, 3, 32, 32) and b.images.dtype == torch.uint8
        assert (a.images.float() - b.images.float()).abs().mean() < 2.0


def test_gpu_decode_resumes_exactly(photo_shards):
    spec = _gpu_spec(_photo_cfg(photo_shards, **{"data.decode": "gpu"}))
    straight, _ = _batches(spec, 6)
    head, first = _batches(spec, 3)
    rest, _ = _batches(spec, 3, state=first.state_dict())
    for a, b in zip(straight, head + rest, strict=True):
        assert a.keys == b.keys and torch.equal(a.images, b.images)


def test_gpu_decode_eval_scores_the_whole_set(tmp_path):
    for i in range(36):
        _smooth_jpeg(tmp_path / "img" / f"c{i % 4}" / f"{i:03d}.jpg", 60 + 4 * (i % 3), 50, i)
    write_shards(tmp_path / "img", tmp_path / "sh", WriteOptions(samples_per_shard=7, workers=1, val_fraction=0.5,
                                                                 progress=False))
    cfg = _cfg(str(tmp_path / "sh"), **{"data.val": str(tmp_path / "sh")})
    cpu = list(ShardEval(cfg.loader(), 0, 1, cfg.data.val))
    gcfg = _cfg(str(tmp_path / "sh"), **{"data.val": str(tmp_path / "sh"), "data.decode": "gpu"})
    gpu = list(ShardEval(_gpu_spec(gcfg), 0, 1, gcfg.data.val))
    assert len(cpu) == len(gpu)
    for a, b in zip(cpu, gpu, strict=True):
        assert torch.equal(a.valid, b.valid) and torch.equal(a.targets, b.targets)
        assert (a.images.float() - b.images.float()).abs().mean() < 2.0


def test_decode_setting_is_checked(shards):
    with pytest.raises(UserError, match=r"data.decode='nvjpeg': use one of cpu, gpu"):
        _cfg(str(shards), **{"data.decode": "nvjpeg"})
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"data.decode.*no CUDA device.*data.decode=cpu"):
            ShardTrain(_cfg(str(shards), **{"data.decode": "gpu"}).loader(), 0, 1)


# ---- elastic determinism: the global sample stream does not depend on ranks or workers ----

def _steps(shards, world, workers, steps, **kw):
    """Per step, the sorted keys of the whole global batch (16 samples) over ``world`` ranks."""
    cfg = _cfg(str(shards), **{"data.workers": str(workers), "train.micro_batch": "4", **kw})
    srcs = [ShardTrain(dataclasses.replace(cfg.loader(), grad_accum=4 // world), r, world) for r in range(world)]
    out = []
    for _ in range(steps):
        out.append(sorted(k for s in srcs for _ in range(4 // world) for k in s.next_batch().keys))
    return out, srcs


def test_every_step_holds_the_same_samples_on_any_ranks_and_workers(shards):
    """1x1, 1x2, 2x1, 2x2 (ranks x workers), global batch 16: the same keys in every global step,
    two epochs long, and each epoch holds every sample once."""
    want, _ = _steps(shards, 1, 1, 10)
    for world, workers in ((1, 2), (2, 1), (2, 2)):
        got, _ = _steps(shards, world, workers, 10)
        assert got == want, (world, workers)
    epoch0 = [k for step in want[:5] for k in step]
    assert len(epoch0) == 80 and len(set(epoch0)) == 80


def test_a_2_to_1_to_2_rank_resume_repeats_and_skips_nothing(shards):
    want, _ = _steps(shards, 2, 1, 10)
    head, srcs = _steps(shards, 2, 1, 2)
    parts = [s.state_dict() for s in srcs]
    one = ShardTrain(dataclasses.replace(_cfg(str(shards), **{"train.micro_batch": "4"}).loader(), grad_accum=4), 0, 1)
    one.reshard(parts)
    middle = [sorted(k for _ in range(4) for k in one.next_batch().keys) for _ in range(3)]
    two = [ShardTrain(dataclasses.replace(_cfg(str(shards), **{"train.micro_batch": "4", "data.workers": "2"})
                                          .loader(), grad_accum=2), r, 2) for r in range(2)]
    for src in two:
        src.reshard([one.state_dict()])
    tail = [sorted(k for s in two for _ in range(2) for k in s.next_batch().keys) for _ in range(5)]
    assert head + middle + tail == want
    assert sum(s.stats()["samples_seen"] for s in two) == 160  # rank 0 carries the earlier ranks' counts


def test_a_set_without_counts_keeps_each_streams_place_across_layouts(shards, tmp_path):
    """Remote shards without an index: streams read whole shards and the checkpoint keeps every
    stream's (epoch, item); a 2 -> 1 rank resume continues each one where it was."""
    import shutil

    from tests.shard_server import ShardServer

    bare = tmp_path / "bare"  # the tars alone, no index.json beside them
    bare.mkdir()
    for tar in shards.glob("train-*.tar"):
        shutil.copy(tar, bare / tar.name)
    server = ShardServer(bare)
    try:
        url = server.url("train-{000000..000007}.tar")
        kw = {"data.samples_per_epoch": "80", "data.streams": "4"}
        want, _ = _steps(url, 2, 1, 6, **kw)
        head, srcs = _steps(url, 2, 1, 2, **kw)
        assert not srcs[0].plan.counted
        one = ShardTrain(dataclasses.replace(_cfg(url, **{"train.micro_batch": "4", **kw}).loader(), grad_accum=4),
                         0, 1)
        one.reshard([s.state_dict() for s in srcs])
        tail = [sorted(k for _ in range(4) for k in one.next_batch().keys) for _ in range(4)]
        assert head + tail == want
    finally:
        server.close()


# ---- weighted mixtures: part of the same global stream ----

@pytest.fixture(scope="module")
def second(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("second")
    write_synthetic_folder(root / "img", classes=4, per_class=5, img_size=16, seed=3, start=1000)  # own keys
    write_shards(root / "img", root / "sh", WriteOptions(samples_per_shard=5, workers=1, progress=False))
    return root / "sh"


def _mix(shards, second):
    return f"[{{source: {shards}, weight: 3}}, {{source: {second}, weight: 1}}]"


def test_a_mixture_gives_each_source_its_exact_share_of_every_step_on_any_layout(shards, second):
    """3:1 over 80 + 20 samples, global batch 16 (4 streams: 3 + 1): every step holds 12 samples of
    the first set and 4 of the second, the small set cycles four times as fast, and the key sets
    are the same for 1 or 2 ranks, 1 or 2 workers."""
    mix = _mix(shards, second)
    want, srcs = _steps(mix, 1, 1, 10, **{"data.streams": "4"})
    first_keys = {s.key for s in _all_samples(shards)}
    for step in want:
        assert sum(k in first_keys for k in step) == 12
    assert srcs[0].stats()["samples_by_source"] == {str(shards): 120, str(second): 40}
    for world, workers in ((2, 1), (2, 2)):
        got, _ = _steps(mix, world, workers, 10, **{"data.streams": "4"})
        assert got == want, (world, workers)


def test_a_mixture_resumes_every_source_exactly(shards, second):
    mix = _mix(shards, second)
    cfg = _cfg(mix, **{"data.streams": "5", "data.workers": "1"})  # 4 + 1 streams of one row
    straight = _keys(ShardTrain(cfg.loader(), 0, 1), 20)
    first = ShardTrain(cfg.loader(), 0, 1)
    head = _keys(first, 7)
    resumed = ShardTrain(cfg.loader(), 0, 1)
    resumed.load_state_dict(first.state_dict())
    assert head + _keys(resumed, 13) == straight


def test_a_mixture_names_a_wrong_source_and_refuses_duplicates(shards, tmp_path):
    with pytest.raises(UserError, match=r"data.train source .*nowhere"):
        ShardTrain(_cfg(f"[{{source: {shards}}}, {{source: {tmp_path / 'nowhere'}}}]").loader(), 0, 1)
    with pytest.raises(UserError, match=r"data.train.*names a source twice"):
        _cfg(f"[{{source: {shards}}}, {{source: {shards}}}]")
    with pytest.raises(UserError, match=r"data.train\[.*\].weight"):
        _cfg(f"[{{source: {shards}, weight: 0}}]")


def _all_samples(shards: Path):
    from pretrain.data.shards import iter_tar_samples

    return [s for tar in sorted(shards.glob("train-*.tar")) for s in iter_tar_samples(tar)]
