"""`vitscale shards dedup`: near-copies of evaluation images are found among real JPEGs, distinct
images are not, and training leaves the copies out (counted as `excluded`, not as lost samples).

The images are drawn here (a gradient, random shapes, blur, sensor-like noise: distinct photos
for a perceptual hash); the evaluation set is written by the `webdataset` library (a third-party
set, no index), the training set by `vitscale shards write` from an ImageFolder of JPEG files.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from data_tools.cli import main as shards_main
from data_tools.dedup import dedup
from data_tools.shard_writer import WriteOptions, write_shards
from pretrain.core.errors import UserError
from pretrain.data.exclusions import read_exclusions
from pretrain.data.loader import ShardTrain
from pretrain.train.config_file import load_config
from tests.helpers import TINY, read_metrics, vitscale

EVAL, DISTINCT, KINDS, PER_KIND = 60, 200, ("resized", "reencoded", "cropped", "brightened"), 10


def natural_image(seed: int) -> Image.Image:
    """A distinct picture: a colour gradient in a random direction, 5-11 filled ellipses,
    rectangles and triangles, a slight blur and Gaussian noise; 160-224 x 120-168 px."""
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(160, 225)), int(rng.integers(120, 169))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * x / w + np.sin(angle) * y / h
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    pixels = c0 + (c1 - c0) * ((t - t.min()) / (np.ptp(t) + 1e-6))[..., None]
    img = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(5, 12))):
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
        box = [x0, y0, x0 + rng.uniform(0.1, 0.6) * w, y0 + rng.uniform(0.1, 0.6) * h]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = int(rng.integers(3))
        if shape == 0:
            draw.ellipse(box, fill=colour)
        elif shape == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([tuple(p) for p in rng.uniform(0, 1, (3, 2)) * (w, h)], fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.0))
    noisy = np.asarray(img, np.float32) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def near_copy(img: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """``img`` changed the way copies on the web are: (image, JPEG quality to save it at)."""
    w, h = img.size
    if kind == "resized":
        scale = rng.uniform(0.4, 0.8)
        return img.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC), 90
    if kind == "reencoded":
        return img, int(rng.integers(25, 60))
    if kind == "cropped":  # 2-5% of the width and of the height cut, at a random place
        cut = rng.uniform(0.02, 0.05)
        dx, dy = round(w * cut), round(h * cut)
        left, top = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
        return img.crop((left, top, left + w - dx, top + h - dy)), 90
    return ImageEnhance.Brightness(img).enhance(rng.uniform(1.1, 1.2)), 90


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict:
    import webdataset as wds

    root = tmp_path_factory.mktemp("dedup")
    originals = [natural_image(i) for i in range(EVAL)]
    (root / "val").mkdir()
    with wds.ShardWriter(str(root / "val" / "val-%06d.tar"), maxcount=20, verbose=0) as sink:
        for i, img in enumerate(originals):
            sink.write({"__key__": f"val_{i:04d}", "jpg": _jpeg(img), "cls": i % 2})
    rng = np.random.default_rng(7)
    copies = {}  # training key -> (evaluation key it copies, kind)
    for n, kind in enumerate(k for k in KINDS for _ in range(PER_KIND)):
        source = n  # evaluation images 0..39 have one near-copy each
        img, quality = near_copy(originals[source], kind, rng)
        path = root / "img" / "b" / f"copy_{kind}_{source:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(img, quality))
        copies[f"b_copy_{kind}_{source:04d}"] = (f"val_{source:04d}", kind)
    for i in range(DISTINCT):
        (root / "img" / "a").mkdir(parents=True, exist_ok=True)
        (root / "img" / "a" / f"img_{i:04d}.jpg").write_bytes(_jpeg(natural_image(1000 + i)))
    write_shards(root / "img", root / "train", WriteOptions(samples_per_shard=30, workers=1, progress=False))
    return {"root": root, "val": root / "val", "train": root / "train", "copies": copies}


@pytest.fixture(scope="module")
def found(sets) -> dict:
    """``vitscale shards dedup TRAIN --against VAL --workers 2`` run once; its dedup.json."""
    code = shards_main(["dedup", str(sets["train"]), "--against", str(sets["val"]), "--workers", "2",
                        "--no-progress"])
    assert code == 0
    return json.loads((sets["train"] / "dedup.json").read_text())


def test_near_copies_are_found_and_distinct_images_are_not(sets, found):
    copies = sets["copies"]
    hits = {e["key"]: e for e in found["excluded"]}
    true = [k for k in hits if k in copies]
    precision, recall = len(true) / max(1, len(hits)), len(true) / len(copies)
    by_kind = {kind: sum(1 for k in true if copies[k][1] == kind) / PER_KIND for kind in KINDS}
    print(f"\ndedup at threshold {found['threshold']}: precision {precision:.3f}, recall {recall:.3f} "
          f"({len(true)} of {len(copies)} copies, {len(hits) - len(true)} false matches); recall by kind {by_kind}")
    assert found["threshold"] == 10 and found["hash"]["method"] == "phash" and found["hash"]["bits"] == 64
    assert recall >= 0.9 and precision >= 0.95, (precision, recall, by_kind)
    assert all(recall >= 0.7 for recall in by_kind.values()), by_kind
    for key in true:  # each copy is matched to the image it copies, in the right shard
        assert hits[key]["eval_key"] == copies[key][0] and hits[key]["eval_shard"].startswith("val-")
        assert hits[key]["distance"] <= 10 and hits[key]["shard"].startswith("train-")
    assert found["train"]["images"] == DISTINCT + len(copies) and found["against"][0]["images"] == EVAL
    assert sum(found["nearest_distance_histogram"]) == DISTINCT + len(copies)


def test_the_report_names_pairs_and_the_fingerprint_follows_the_evaluation_set(sets, found, tmp_path, capsys):
    import webdataset as wds

    out = tmp_path / "other.json"
    assert shards_main(["dedup", str(sets["train"]), "--against", str(sets["val"]), "--workers", "1",
                        "--threshold", "0", "--output", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "images/s" in text and "near-duplicates (Hamming distance <= 0 of 64 bits)" in text
    assert f"wrote {out}" in text
    other = json.loads(out.read_text())
    assert other["against_fingerprint"] == found["against_fingerprint"]  # same set, same hash: same fingerprint
    assert len(other["excluded"]) < len(found["excluded"])

    shorter = tmp_path / "val"
    shorter.mkdir()
    with wds.ShardWriter(str(shorter / "val-%06d.tar"), maxcount=20, verbose=0) as sink:
        for i in range(5):
            sink.write({"__key__": f"val_{i:04d}", "jpg": _jpeg(natural_image(i)), "cls": 0})
    assert shards_main(["dedup", str(sets["train"]), "--against", str(shorter), "--output", str(out),
                        "--workers", "1", "--no-progress"]) == 0
    assert "~" in capsys.readouterr().out  # an example pair: train KEY (SHARD) ~ VAL: KEY (SHARD) distance D
    assert json.loads(out.read_text())["against_fingerprint"] != found["against_fingerprint"]
    with pytest.raises(UserError, match="--threshold 65"):
        dedup(str(sets["train"]), [str(shorter)], threshold=65, output=out)
    with pytest.raises(UserError, match="TRAIN and --against share 8 shards"):
        dedup(str(sets["train"]), [str(sets["train"])], output=out)


def _cfg(train: Path, workers: int = 2, micro: int = 5):
    over = {"model.name": "vit_test4", "model.img_size": "16", "model.num_classes": "4", "data.train": str(train),
            "data.workers": str(workers), "train.micro_batch": str(micro), "data.shuffle_buffer": "7"}
    return load_config(None, [f"{k}={v}" for k, v in over.items()]).loader()


def _epoch(source: ShardTrain, total: int) -> list[list[str]]:
    """The keys of the micro batches that make up the first ``total`` rows of the stream."""
    per_step = source.plan.rows * source.plan.count
    assert total % per_step == 0
    return [list(source.next_batch().keys) for _ in range(total // per_step * source.accum)]


def test_the_training_loader_leaves_excluded_keys_out_and_counts_them_apart(sets, found):
    listed = sets["train"] / "dedup.json"
    excluded = read_exclusions(listed)
    assert excluded == {e["key"] for e in found["excluded"]} and excluded
    total = DISTINCT + len(sets["copies"])
    listed.rename(listed.with_suffix(".off"))  # the same set without the list: the order to compare with
    try:
        plain = ShardTrain(_cfg(sets["train"]), 0, 1)
        everything = _epoch(plain, total)
        plain.close()
    finally:
        listed.with_suffix(".off").rename(listed)
    assert len({k for batch in everything for k in batch}) == total

    source = ShardTrain(_cfg(sets["train"]), 0, 1)
    assert any(f"{len(excluded)} samples excluded by {listed}" in note for note in source.shards.notes)
    batches = _epoch(source, total)
    stats = source.stats()
    delivered = {k for batch in batches for k in batch}
    assert delivered == {k for batch in everything for k in batch} - excluded  # every kept sample, no excluded one
    assert stats["excluded"] == len(excluded) and stats["bad_samples"] == 0
    for mine, theirs in zip(batches, everything, strict=True):  # the order is the set's; an excluded row is
        for key, was in zip(mine, theirs, strict=True):         # filled from its own micro batch
            assert key == was if was not in excluded else (key in theirs or set(theirs) <= excluded)

    state = source.state_dict()
    assert state["excluded"] == len(excluded)
    source.close()
    resumed = ShardTrain(_cfg(sets["train"]), 0, 1)
    resumed.load_state_dict(state)
    assert not set(resumed.next_batch().keys) & excluded and resumed.stats()["excluded"] >= len(excluded)
    resumed.close()


def test_training_reports_excluded_samples_on_the_log_line_and_in_the_summary(sets, found, tmp_path):
    run = tmp_path / "run"
    proc = vitscale("pretrain", *TINY, f"data.train={sets['train']}", "data.val=null", "train.steps=12",
                    "checkpoint.every=0", f"run.dir={run}", check=True)
    summary = json.loads((run / "summary.json").read_text())
    last = [r for r in read_metrics(run) if "loss" in r][-1]
    assert summary["excluded"] == last["excluded"] > 0 and summary.get("bad_samples", 0) == 0
    assert "samples excluded by" in proc.stdout and f"excluded {summary['excluded']}" in proc.stdout
    assert f"excluded       {summary['excluded']} (near-copies" in proc.stdout


def test_an_evaluation_set_over_http_gives_the_same_matches_and_fingerprint(sets, found, tmp_path):
    from tests.shard_server import ShardServer

    server = ShardServer(sets["val"])
    try:
        out = tmp_path / "http.json"
        assert shards_main(["dedup", str(sets["train"]), "--against", server.url("val-{000000..000002}.tar"),
                            "--output", str(out), "--workers", "2", "--no-progress"]) == 0
    finally:
        server.close()
    remote = json.loads(out.read_text())
    assert remote["against_fingerprint"] == found["against_fingerprint"]  # the same images, read another way
    assert [(e["key"], e["eval_key"], e["distance"]) for e in remote["excluded"]] == \
        [(e["key"], e["eval_key"], e["distance"]) for e in found["excluded"]]
