"""`vitscale shards write / verify / stats` on tiny generated datasets."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data_tools.shard_writer as shard_writer
from data_tools.cli import main as shards_main
from data_tools.shard_writer import WriteOptions, write_shards
from pretrain.cli import main as vitscale_main
from pretrain.core.errors import UserError
from pretrain.core.files import sha256_file
from pretrain.data.shards import add_bytes, iter_tar_samples

CLASSES = ("bird", "cat", "dog")


def _image(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1] // 4 + 1, size[0] // 4 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(arr).resize(size).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=85) if path.suffix == ".jpg" else img.save(path)


def _image_folder(root: Path, per_class: int = 4, bad: bool = True) -> Path:
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            suffix = ".png" if i == 1 else ".jpg"
            mode = "L" if i == 2 else "RGB"
            _image(root / name / f"{name} {i}{suffix}", (40 + 8 * i, 30 + 4 * c), seed=10 * c + i, mode=mode)
    if bad:
        (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
        (root / "dog" / "notes.txt").write_text("not an image, ignored")
    return root


def _opts(**kw) -> WriteOptions:
    return WriteOptions(**{"workers": 1, "progress": False, **kw})


def _samples(out: Path, split: str = "train") -> dict[str, dict[str, bytes]]:
    index = json.loads((out / "index.json").read_text())
    found = {}
    for shard in index["splits"][split]["shards"]:
        for sample in iter_tar_samples(out / shard["file"]):
            assert sample.key not in found
            found[sample.key] = sample.files
    return found


def _tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_image_folder_shards_hold_every_readable_image_with_its_class(tmp_path: Path) -> None:
    src = _image_folder(tmp_path / "src")
    out = tmp_path / "out"
    summary = write_shards(src, out, _opts(samples_per_shard=5))

    classes = json.loads((out / "classes.json").read_text())
    assert classes == {"classes": list(CLASSES), "class_to_idx": {n: i for i, n in enumerate(CLASSES)}}
    index = json.loads((out / "index.json").read_text())
    assert index["version"] == 1 and index["multi_label"] is False and index["num_classes"] == 3
    train = index["splits"]["train"]
    assert [s["file"] for s in train["shards"]] == [f"train-00000{i}.tar" for i in range(3)]
    assert sum(s["samples"] for s in train["shards"]) == train["samples"] == 12  # 13 planned, 1 skipped
    for shard in train["shards"]:
        assert (out / shard["file"]).stat().st_size == shard["bytes"]
        assert sha256_file(out / shard["file"]) == shard["sha256"]

    samples = _samples(out)
    assert len(samples) == 12
    for c, name in enumerate(CLASSES):
        for i in range(4):
            key = f"{name}_{name}_{i}"
            ext = "png" if i == 1 else "jpg"
            assert samples[key]["cls"] == str(c).encode()
            assert samples[key][ext] == (src / name / f"{name} {i}.{ext}").read_bytes()
            assert "json" not in samples[key]

    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [s["path"] for s in skipped] == [str(src / "cat" / "broken.jpg")]
    assert "not decodable" in skipped[0]["reason"] and len(summary.skipped) == 1

    import webdataset as wds

    dataset = wds.WebDataset(str(out / "train-{000000..000002}.tar"), shardshuffle=False)
    pairs = list(dataset.to_tuple("__key__", "cls"))
    assert sorted(k for k, _ in pairs) == sorted(samples)


def test_same_input_gives_byte_identical_shards_serial_or_parallel(tmp_path: Path) -> None:
    src = _image_folder(tmp_path / "src")
    write_shards(src, tmp_path / "a", _opts(samples_per_shard=3, val_fraction=0.3))
    write_shards(src, tmp_path / "b", _opts(samples_per_shard=3, val_fraction=0.3, workers=2))
    assert _tar_bytes(tmp_path / "a") == _tar_bytes(tmp_path / "b")
    assert (tmp_path / "a" / "index.json").read_bytes() == (tmp_path / "b" / "index.json").read_bytes()
    with tarfile.open(tmp_path / "a" / "train-000000.tar") as tar:
        member = tar.getmembers()[0]
        assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (0, 0, 0, "", "")


def test_interrupted_write_resumes_without_rewriting_complete_shards(tmp_path: Path, monkeypatch) -> None:
    src = _image_folder(tmp_path / "src", bad=False)
    write_shards(src, tmp_path / "clean", _opts(samples_per_shard=3))
    out = tmp_path / "out"
    real_encode = shard_writer.encode_image
    calls = {"n": 0}

    def dying_encode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(shard_writer, "encode_image", dying_encode)
    with pytest.raises(KeyboardInterrupt):
        write_shards(src, out, _opts(samples_per_shard=3))
    monkeypatch.setattr(shard_writer, "encode_image", real_encode)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert not (out / "index.json").exists()
    for p in out.glob("*.tar"):
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))

    summary = write_shards(src, out, _opts(samples_per_shard=3))
    assert (summary.shards_reused, summary.shards_written) == (2, 2)
    assert [(out / f"train-00000{i}.tar").stat().st_mtime_ns for i in (0, 1)] == [1_000_000_000] * 2
    assert _tar_bytes(out) == _tar_bytes(tmp_path / "clean")
    assert not list((out / ".progress").glob("*.partial"))

    (out / "train-000003.tar").write_bytes(b"truncated")
    summary = write_shards(src, out, _opts(samples_per_shard=3))
    assert (summary.shards_reused, summary.shards_written) == (3, 1)
    assert _tar_bytes(out) == _tar_bytes(tmp_path / "clean")

    summary = write_shards(src, out, _opts(samples_per_shard=6))
    assert summary.shards_written == 2 and sorted(_tar_bytes(out)) == ["train-000000.tar", "train-000001.tar"]


def test_csv_manifest_multi_label_with_extra_fields(tmp_path: Path) -> None:
    for i in range(4):
        _image(tmp_path / "imgs" / f"im{i}.jpg", (32, 24), seed=i)
    rows = [("imgs/im0.jpg", "tree;sky", "a"), ("imgs/im1.jpg", "sky|car", "b"),
            (str(tmp_path / "imgs" / "im2.jpg"), "", "c"), ("imgs/im3.jpg", "car", "d"),
            ("imgs/missing.jpg", "car", "e")]
    manifest = tmp_path / "data.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", "caption"])
        writer.writerows(rows)
    out = tmp_path / "out"
    write_shards(manifest, out, _opts())
    index = json.loads((out / "index.json").read_text())
    assert index["multi_label"] is True and index["num_classes"] == 3
    assert json.loads((out / "classes.json").read_text())["classes"] == ["car", "sky", "tree"]
    samples = _samples(out)
    by_caption = {json.loads(s["json"])["caption"]: json.loads(s["json"]) for s in samples.values()}
    assert by_caption["a"]["labels"] == [1, 2] and by_caption["b"]["labels"] == [0, 1]
    assert by_caption["c"]["labels"] == [] and by_caption["d"]["labels"] == [0]
    assert all("cls" not in s for s in samples.values())
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert skipped == [{"path": str(tmp_path / "imgs" / "missing.jpg"), "reason": "missing file"}]


def test_jsonl_manifest_integer_labels_and_extras(tmp_path: Path) -> None:
    lines = []
    for i in range(3):
        _image(tmp_path / f"x.{i}.png", (20, 20), seed=i)
        lines.append(json.dumps({"path": f"x.{i}.png", "label": [4, 0, 2][i], "source": "web"}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    write_shards(tmp_path / "m.jsonl", out, _opts())
    index = json.loads((out / "index.json").read_text())
    assert index["num_classes"] == 5 and index["multi_label"] is False
    samples = _samples(out)
    assert all("." not in key for key in samples)
    assert sorted(int(s["cls"]) for s in samples.values()) == [0, 2, 4]
    assert all(json.loads(s["json"]) == {"source": "web"} for s in samples.values())


def test_val_split_is_a_deterministic_function_of_key_and_seed(tmp_path: Path) -> None:
    src = _image_folder(tmp_path / "src", per_class=10, bad=False)
    write_shards(src, tmp_path / "a", _opts(val_fraction=0.3, seed=1))
    write_shards(src, tmp_path / "b", _opts(val_fraction=0.3, seed=2))
    train, val = set(_samples(tmp_path / "a")), set(_samples(tmp_path / "a", "val"))
    assert train and val and not train & val and len(train | val) == 30
    assert (tmp_path / "a" / "val-000000.tar").exists()
    assert set(_samples(tmp_path / "b", "val")) != val


def test_resize_caps_the_long_side_and_quality_reencodes(tmp_path: Path) -> None:
    _image(tmp_path / "src" / "a" / "wide.png", (80, 40), seed=0)
    _image(tmp_path / "src" / "a" / "tiny.jpg", (10, 6), seed=1)
    write_shards(tmp_path / "src", tmp_path / "out", _opts(resize_max=32, quality=70))
    samples = _samples(tmp_path / "out")
    sizes = {key: Image.open(io.BytesIO(files["jpg"])).size for key, files in samples.items()}
    assert sizes == {"a_wide": (32, 16), "a_tiny": (10, 6)}


def test_formats_other_than_jpeg_png_are_reencoded_as_jpeg(tmp_path: Path) -> None:
    _image(tmp_path / "src" / "a" / "pic.bmp", (24, 16), seed=0)
    _image(tmp_path / "src" / "a" / "cmyk.jpg", (24, 16), seed=1, mode="CMYK")
    write_shards(tmp_path / "src", tmp_path / "out", _opts())
    samples = _samples(tmp_path / "out")
    assert Image.open(io.BytesIO(samples["a_pic"]["jpg"])).format == "JPEG"
    assert samples["a_cmyk"]["jpg"] == (tmp_path / "src" / "a" / "cmyk.jpg").read_bytes()


def test_max_shard_bytes_bounds_every_shard(tmp_path: Path) -> None:
    src = _image_folder(tmp_path / "src", bad=False)
    write_shards(src, tmp_path / "out", _opts(max_shard_bytes=12 * 1024))
    shards = json.loads((tmp_path / "out" / "index.json").read_text())["splits"]["train"]["shards"]
    assert len(shards) > 1 and sum(s["samples"] for s in shards) == 12
    assert all(s["bytes"] <= 12 * 1024 for s in shards if s["samples"] > 1)


@pytest.mark.parametrize("case,expected", [
    ("missing", "does not exist"), ("no_column", "no 'label' or 'labels' column"),
    ("out_is_file", "is a file"), ("empty", "no images found"), ("all_bad", "none of the 1"),
    ("out_inside_src", "inside the source folder"),
])
def test_user_mistakes_raise_user_error_naming_the_problem(tmp_path: Path, case: str, expected: str) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    if case == "no_column":
        src = tmp_path / "m.csv"
        src.write_text("path,caption\na.jpg,hi\n")
    elif case == "out_is_file":
        _image_folder(src)
        out.write_text("")
    elif case == "empty":
        (src / "cat").mkdir(parents=True)
    elif case == "out_inside_src":
        _image_folder(src)
        out = src / "shards"
    elif case == "all_bad":
        (src / "cat").mkdir(parents=True)
        (src / "cat" / "x.jpg").write_bytes(b"junk")
    with pytest.raises(UserError, match=expected):
        write_shards(src, out, _opts())


def test_cli_turns_user_error_into_exit_2(tmp_path: Path, capsys) -> None:
    assert vitscale_main(["shards", "write", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def _written(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    write_shards(_image_folder(tmp_path / "src", bad=False), out, _opts(samples_per_shard=4))
    return out


def _rewrite_shard(out: Path, name: str, members: list[tuple[str, bytes]]) -> None:
    """Replace shard ``name`` with ``members`` and re-index the split with `vitscale shards index`,
    so index.json agrees with the new file."""
    with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            add_bytes(tar, member, data)
    assert shards_main(["index", str(out), "--split", "train", "--force", "--workers", "1", "--no-progress"]) == 0


def test_verify_passes_a_good_folder_and_counts_samples(tmp_path: Path, capsys) -> None:
    out = _written(tmp_path)
    assert shards_main(["verify", str(out), "--workers", "1", "--no-progress"]) == 0
    assert "12 good samples of 12" in capsys.readouterr().out


def test_verify_names_a_truncated_shard(tmp_path: Path, capsys) -> None:
    out = _written(tmp_path)
    data = (out / "train-000001.tar").read_bytes()
    (out / "train-000001.tar").write_bytes(data[: len(data) // 2])
    assert shards_main(["verify", str(out), "--workers", "1", "--no-progress"]) == 1
    report = capsys.readouterr().out
    assert "BAD train-000001.tar" in report and "truncated" in report and "checksum mismatch" in report
    assert "train-000000.tar" not in report and "count mismatch" in report


def test_verify_reports_bad_image_missing_label_duplicate_key(tmp_path: Path, capsys) -> None:
    out = _written(tmp_path)
    first = next(iter_tar_samples(out / "train-000000.tar"))
    _rewrite_shard(out, "train-000002.tar", [
        ("junk.jpg", b"\xff\xd8 not really"), ("junk.cls", b"0"),
        ("nolabel.png", first.files.get("png") or first.files["jpg"]),
        (f"{first.key}.jpg", first.files.get("jpg") or first.files["png"]), (f"{first.key}.cls", b"1"),
        ("oob.jpg", first.files.get("jpg") or first.files["png"]), ("oob.cls", b"7"),
    ])
    assert shards_main(["verify", str(out), "--workers", "1", "--no-progress"]) == 1
    report = capsys.readouterr().out
    assert "junk: undecodable image" in report
    assert "nolabel: missing label" in report
    assert f"{first.key}: duplicate key (also in train-000000.tar)" in report
    assert "oob: label 7 out of range" in report
    assert "8 good samples of 12" in report


def test_verify_reports_checksum_and_count_mismatch(tmp_path: Path, capsys) -> None:
    out = _written(tmp_path)
    index = json.loads((out / "index.json").read_text())
    index["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    index["splits"]["train"]["shards"][1]["samples"] = 5
    (out / "index.json").write_text(json.dumps(index))
    assert shards_main(["verify", str(out), "--workers", "1", "--no-progress"]) == 1
    report = capsys.readouterr().out
    assert "BAD train-000000.tar" in report and "checksum mismatch" in report
    assert "count mismatch: tar has 4 samples, index.json says 5" in report


def test_stats_reports_histogram_sizes_and_labels_per_image(tmp_path: Path, capsys) -> None:
    out = _written(tmp_path)
    assert shards_main(["stats", str(out), "--json", "--workers", "1", "--no-progress"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["samples"] == 12 and stats["num_classes"] == 3
    assert [r["count"] for r in stats["top_classes"]] == [4, 4, 4]
    assert stats["width"] == {"min": 40, "median": 52.0, "max": 64}
    assert stats["height"] == {"min": 30, "median": 34, "max": 38}

    manifest = tmp_path / "m.jsonl"
    _image(tmp_path / "a.jpg", (16, 16), seed=0)
    manifest.write_text("\n".join(json.dumps({"path": "a.jpg", "labels": labels})
                                  for labels in (["x"], ["x", "y"], ["x", "y", "z"])) + "\n")
    write_shards(manifest, tmp_path / "ml", _opts())
    assert shards_main(["stats", str(tmp_path / "ml"), "--workers", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "labels per image: min 1, mean 2.00, median 2, max 3" in text
    assert "       3  x (0)" in text


def _members(path: Path, tarinfo) -> list[tuple]:
    with tarfile.open(path, "r:", tarinfo=tarinfo) as tar:
        return [(m.name, m.size, m.type, m.offset, m.offset_data, m.mode, m.mtime, m.pax_headers) for m in tar]


def test_fast_header_decoding_reads_what_tarfile_reads(tmp_path: Path) -> None:
    from pretrain.data.tar_header import FastTarInfo

    out = tmp_path / "out"
    write_shards(_image_folder(tmp_path / "src"), out, _opts(samples_per_shard=5))
    shard = out / "train-000000.tar"
    assert _members(shard, FastTarInfo) == _members(shard, tarfile.TarInfo)
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):  # long names, prefixes, dirs
        path = tmp_path / f"other-{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            folder = tarfile.TarInfo("a_dir")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
            for name in ("short.jpg", "d" * 60 + "/" + "e" * 60 + ".cls", "x" * 90 + ".json"):
                info = tarfile.TarInfo(name)
                info.size = 3
                tar.addfile(info, io.BytesIO(b"abc"))
        assert _members(path, FastTarInfo) == _members(path, tarfile.TarInfo)
    damaged = bytearray(shard.read_bytes())
    damaged[10] ^= 0xFF  # a byte of the first member's name: its checksum no longer matches
    (tmp_path / "damaged.tar").write_bytes(bytes(damaged))
    for tarinfo in (FastTarInfo, tarfile.TarInfo):
        with pytest.raises(tarfile.ReadError):
            _members(tmp_path / "damaged.tar", tarinfo)
