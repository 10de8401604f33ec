"""Shards vitscale did not write, and shards on remote storage: what users start with.

Every third-party set here is written by the `webdataset` library itself (`ShardWriter`), in the
layouts public sets use: `KEY.jpg` + `KEY.cls` (imagenet-1k-wds style), labels in `.txt`,
ImageNet keys with dots (`n01440764_10.JPEG`), and an img2dataset-like set (caption `.txt`,
metadata `.json`, no class). Remote storage is a real `http.server` on 127.0.0.1 that the tests
start, stop and bring back (tests/shard_server.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.cli import main as shards_main
from pretrain.core.errors import UserError
from pretrain.data.config import DataConfig, LoaderSpec
from pretrain.data.loader import ShardTrain
from pretrain.data.shard_sets import resolve_shards
from pretrain.data.stream import Retry, read_shard
from tests.helpers import ROOT, TINY, cli_env, read_metrics, vitscale, vitscale_here
from tests.shard_server import ShardServer

CLASSES, SHARDS, PER_SHARD = 4, 4, 16


def _jpeg(label: int, i: int) -> bytes:
    rng = np.random.default_rng(i)
    pixels = np.full((16, 16, 3), 60 * label, np.uint8) + rng.integers(0, 40, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write(folder: Path, sample) -> Path:
    """``SHARDS`` shards of ``PER_SHARD`` samples written by webdataset's ShardWriter;
    ``sample(i, label)`` gives the dict of sample ``i`` without ``jpg``."""
    import webdataset as wds

    folder.mkdir(parents=True)
    with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=PER_SHARD, verbose=0) as sink:
        for i in range(SHARDS * PER_SHARD):
            label = i % CLASSES
            sink.write({"jpg": _jpeg(label, i), **sample(i, label)})
    return folder


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wds")
    return {
        "cls": _write(root / "cls", lambda i, y: {"__key__": f"s{i:05d}", "cls": y}),
        "txt": _write(root / "txt", lambda i, y: {"__key__": f"s{i:05d}", "txt": str(y)}),
        "dots": _write(root / "dots", lambda i, y: {"__key__": f"n0144076{y}_{i}.JPEG", "cls": y}),
        "img2dataset": _write(root / "i2d", lambda i, y: {"__key__": f"{i:09d}", "txt": f"a photo of thing {y}",
                                                           "json": {"url": f"http://x/{i}.jpg", "width": 16}}),
    }


def _sha(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


# ---------------------------------------------------------------- verify, stats, index

def test_verify_and_stats_read_webdataset_shards_as_a_folder_a_pattern_and_a_glob(sets, capsys):
    folder = sets["cls"]
    for spec in (str(folder), f"{folder}/shard-{{000000..000003}}.tar", f"{folder}/shard-*.tar"):
        assert shards_main(["verify", spec, "--workers", "1", "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert f"{SHARDS * PER_SHARD} good samples of {SHARDS * PER_SHARD}" in out and "all shards OK" in out
        assert "labels (single-label): 0..3, so model.num_classes must be at least 4" in out
        assert "no index.json" in out
        assert shards_main(["stats", spec, "--json", "--workers", "1", "--no-progress"]) == 0
        stats = json.loads(capsys.readouterr().out)
        assert stats["samples"] == SHARDS * PER_SHARD and stats["num_classes"] == CLASSES
        assert [r["count"] for r in stats["top_classes"]] == [PER_SHARD] * CLASSES


def test_verify_reads_labels_in_txt_and_imagenet_keys_with_dots(sets, capsys):
    for name in ("txt", "dots"):
        assert shards_main(["verify", str(sets[name]), "--workers", "1", "--no-progress"]) == 0, name
        assert f"{SHARDS * PER_SHARD} good samples" in capsys.readouterr().out
    first = next(read_shard(str(sets["dots"] / "shard-000000.tar"), PER_SHARD, {}))
    assert first.key == "n01440760_0" and set(first.files) == {"jpeg.jpg", "jpeg.cls"}  # WebDataset's key rule
    assert shards_main(["verify", str(sets["img2dataset"]), "--workers", "1", "--no-progress"]) == 1
    assert "missing label" in capsys.readouterr().out


def test_shards_index_writes_an_index_in_place_without_changing_a_byte(sets, tmp_path, capsys):
    import shutil

    folder = tmp_path / "in1k"
    shutil.copytree(sets["cls"], folder)
    before = _sha(folder)
    assert shards_main(["index", f"{folder}/shard-{{000000..000002}}.tar", "--workers", "1", "--no-progress"]) == 0
    assert shards_main(["index", f"{folder}/shard-000003.tar", "--split", "val", "--workers", "1",
                        "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "the shards were not changed" in out
    assert _sha(folder) == before
    index = json.loads((folder / "index.json").read_text())
    assert index["num_classes"] == CLASSES and not index["multi_label"]
    assert index["splits"]["train"]["samples"] == 3 * PER_SHARD and index["splits"]["val"]["samples"] == PER_SHARD
    assert index["splits"]["train"]["shards"][0]["sha256"] == before["shard-000000.tar"]
    train, val = resolve_shards(str(folder), "train"), resolve_shards(str(folder), "val", key="data.val")
    assert train.counts == (PER_SHARD,) * 3 and val.counts == (PER_SHARD,) and train.num_classes == CLASSES
    assert shards_main(["verify", str(folder), "--workers", "1", "--no-progress"]) == 0  # sizes and sha256 too
    with pytest.raises(UserError, match="already indexes split 'train'"):
        shards_main(["index", str(folder / "shard-000000.tar"), "--no-progress"])


# ---------------------------------------------------------------- before any rank starts

def test_a_set_without_readable_labels_is_one_line_before_any_rank_starts(sets, tmp_path):
    t0 = time.monotonic()
    proc = vitscale_here("pretrain", *TINY, f"data.train={sets['img2dataset']}", "data.val=null", "train.steps=2",
                         f"run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "data.train" in err and "sample 000000000 has members .jpg, .json, .txt" \
        in err and "'a photo of thing 0'" in err and "data.label_key" in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and time.monotonic() - t0 < 60
    pre = vitscale("preflight", "--config", "configs/demo_cpu.yaml", f"data.train={sets['img2dataset']}",
                   "data.val=null", f"run.dir={tmp_path / 'run'}")
    assert pre.returncode == 1 and "FAIL" in pre.stdout and "sample 000000000" in pre.stdout


def test_a_local_folder_without_an_index_is_counted_from_its_tar_headers(sets):
    """Training on it (labels in .txt, 2 processes) is the outage case below."""
    shard_set = resolve_shards(str(sets["txt"]))
    assert shard_set.counts == (PER_SHARD,) * SHARDS
    (note,) = shard_set.notes
    assert "4 shards were counted from their tar headers" in note and "vitscale shards index" in note


# ---------------------------------------------------------------- no silent hang

def _spec(data: DataConfig, workers_micro: int = 8) -> LoaderSpec:
    return LoaderSpec(data, micro_batch=workers_micro, img_size=16, num_classes=CLASSES, seed=0)


def test_a_stream_that_finds_no_usable_sample_ends_with_a_message_naming_its_shards(sets, tmp_path):
    import shutil

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(sets["cls"] / "shard-000000.tar", mixed / "a.tar")
    shutil.copy(sets["img2dataset"] / "shard-000001.tar", mixed / "b.tar")
    source = ShardTrain(_spec(DataConfig(train=str(mixed), workers=2)), rank=0, world=1)
    try:
        with pytest.raises(UserError, match=r"stream \d found no usable sample in a whole epoch of its shards b\.tar "
                                            r"\(missing_label \d+; e\.g\. 0000000"):
            for _ in range(8):
                source.next_batch()
    finally:
        source.close()


def test_a_rank_that_gets_no_batch_stops_naming_its_streams_shards_and_last_key(sets):
    server = ShardServer(sets["cls"])
    server.hang = True
    urls = server.url("shard-{000000..000003}.tar")
    data = DataConfig(train=urls, workers=1, samples_per_epoch=SHARDS * PER_SHARD, stall_timeout_s=3)
    source = ShardTrain(_spec(data), rank=0, world=1)
    t0 = time.monotonic()
    try:
        with pytest.raises(UserError, match=r"rank 0 got no batch for \d+ s \(data.stall_timeout_s=3\) from "
                                            r"streams 0, 1, 2, 3 \(shards shard-00000\d.tar, .*; last key none yet\)"):
            source.next_batch()
        assert time.monotonic() - t0 < 30
    finally:
        source.close()
        server.close()


def test_sigterm_while_every_rank_waits_for_data_ends_the_job(sets, tmp_path):
    server = ShardServer(sets["cls"])
    proc = None
    try:
        server.hang = True  # preflight's probe would hang too: it fails in seconds instead, so let it through first
        urls = server.url("shard-{000000..000003}.tar")
        server.hang = False
        run = tmp_path / "run"
        args = [*TINY, f"data.train={urls}", f"data.samples_per_epoch={SHARDS * PER_SHARD}", "data.val=null",
                "data.workers=1", "train.steps=50", f"run.dir={run}", "--nproc-per-node", "2"]
        proc = subprocess.Popen([sys.executable, "-m", "pretrain", "pretrain", *args], cwd=ROOT, env=cli_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.monotonic() + 120
        while server.requests < 6 and time.monotonic() < deadline:  # the probe's reads, then the ranks' first
            time.sleep(0.05)
        server.hang = True
        time.sleep(1)  # the ranks use up what their workers had read, then wait
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=90)
        assert time.monotonic() - t0 < 60, "SIGTERM must end a job whose ranks wait for data"
        assert "stop signal received while rank" in out or "stop signal received" in out, out[-3000:]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        server.close()


# ---------------------------------------------------------------- remote storage

def test_preflight_fails_in_seconds_on_a_wrong_port_or_a_wrong_name(sets, tmp_path):
    server = ShardServer(sets["cls"])
    try:
        wrong_name = server.url("train-{000000..000003}.tar")
        free = ShardServer(sets["cls"])
        wrong_port = free.url("shard-{000000..000003}.tar")
        free.close()
        for urls, said in ((wrong_name, "HTTP 404"), (wrong_port, "refused")):
            t0 = time.monotonic()
            pre = vitscale("preflight", "--config", "configs/demo_cpu.yaml", f"data.train={urls}",
                           f"data.samples_per_epoch={SHARDS * PER_SHARD}", "data.val=null", f"run.dir={tmp_path}/r")
            assert pre.returncode == 1 and said in pre.stdout, pre.stdout
            assert time.monotonic() - t0 < 30
        urls = server.url("shard-{000000..000003}.tar")
        ok = vitscale("preflight", "--config", "configs/demo_cpu.yaml", f"data.train={urls}",
                      f"data.samples_per_epoch={SHARDS * PER_SHARD}", "data.val=null", "model.num_classes=4",
                      "data.workers=1", f"run.dir={tmp_path}/r")
        assert "PASS  data.train" in ok.stdout or "PASS" in ok.stdout.split("data.train")[1][:40], ok.stdout
    finally:
        server.close()


def test_pipe_curl_reads_every_sample_of_every_shard(sets):
    server = ShardServer(sets["cls"])
    try:
        for _ in range(5):
            for i in range(SHARDS):
                lost: dict = {}
                got = list(read_shard(f"pipe:curl -s {server.url(f'shard-{i:06d}.tar')}", PER_SHARD, lost))
                assert len(got) == PER_SHARD and not lost, lost
    finally:
        server.close()


def test_an_http_outage_mid_read_is_retried_and_the_read_continues_where_it_stopped(sets):
    server = ShardServer(sets["cls"], outage_s=2.0)
    try:
        whole = [s.key for s in read_shard(str(sets["cls"] / "shard-000001.tar"), PER_SHARD, {})]
        server.cut_next = True
        lost: dict = {}
        got = [s.key for s in read_shard(server.url("shard-000001.tar"), PER_SHARD, lost, Retry(first_s=0.5))]
        assert server.cuts == 1 and got == whole and not lost  # nothing repeated, nothing skipped
        lost = {}
        server.cut_next = True
        got = list(read_shard(server.url("shard-000002.tar"), PER_SHARD, lost, Retry(retries=1, first_s=0.2)))
        assert lost == {("unreachable", "shard-000002.tar"): PER_SHARD - len(got)}  # past the window: counted
    finally:
        server.close()


def test_training_through_a_ten_second_outage_loses_nothing_and_equals_the_local_run(sets, tmp_path):
    """The acceptance case, on webdataset-written shards with labels in .txt (2 processes, val on the
    set with ImageNet keys with dots): a loopback server stops mid-transfer for 10 s and comes back;
    the run rides it out (retries with backoff, capped at 2 s here), loses no sample, and its
    losses equal, bit for bit, a run on the same shards read from local disk
    (`run.deterministic=true`)."""
    common = [*TINY, "model.num_classes=4", f"data.samples_per_epoch={SHARDS * PER_SHARD}", "data.workers=1",
              f"data.val={sets['dots']}", "train.steps=12", "checkpoint.every=0", "run.deterministic=true",
              "--nproc-per-node", "2"]
    local = tmp_path / "local"
    vitscale("pretrain", *common, f"data.train={sets['txt']}/shard-{{000000..000003}}.tar", f"run.dir={local}",
             check=True)
    server = ShardServer(sets["txt"], outage_s=10.0)
    try:
        remote = tmp_path / "remote"
        server.cut_next = False
        proc = subprocess.Popen([sys.executable, "-m", "pretrain", "pretrain", *common,
                                 f"data.train={server.url('shard-{000000..000003}.tar')}", f"run.dir={remote}",
                                 "data.retry_max_s=2"],  # waits 1, 2, 2, ... s: back within 2 s of the end
                                cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while not (remote / "metrics.jsonl").is_file() or not [r for r in read_metrics(remote) if r["step"] >= 2]:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        server.cut_next = True  # the next shard request gets half its bytes, then 10 s of refused connections
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    finally:
        server.close()
    assert server.cuts == 1 and server.up_again_at - server.down_at >= 10.0
    assert "retry 1/8" in out and "health @ step 12 (since step 0): 0 lost samples" in out, out[-3000:]
    assert "lost" not in out.replace("0 lost samples", ""), out[-3000:]
    for run in (local, remote):
        summary = json.loads((run / "summary.json").read_text())
        assert summary.get("bad_samples", 0) == 0 and summary["eval_samples"] == SHARDS * PER_SHARD
    losses = {r["step"]: r["loss"] for r in read_metrics(remote) if "loss" in r}
    assert losses == {r["step"]: r["loss"] for r in read_metrics(local) if "loss" in r}


def test_few_shot_refuses_a_train_set_that_is_its_val_set(sets):
    from pretrain.train.fewshot import resolve_dataset
    from pretrain.train.fewshot_config import FewshotDataset

    with pytest.raises(UserError, match="train and val name the same shards"):
        resolve_dataset(FewshotDataset(name="mine", train=str(sets["cls"]), val=str(sets["cls"])))
