"""CPU decode + augmentation: shapes, determinism, odd inputs, draft decode fidelity, centre crop."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from pretrain.bench.fidelity import difference, reference_crop, summarise, within_bound
from pretrain.data import jpeg
from pretrain.data.device_decode import decode_packed, pack, plan_eval, plan_train
from pretrain.data.transforms import (
    _open_for_box,
    baseline_transform,
    decode_crop,
    decode_region,
    draft_reduction,
    eval_transform,
    inception_crop_box,
    normalize,
    train_transform,
)


def _smooth_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like image: smooth gradients plus a few soft blobs (JPEG-friendly, not flat)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(seed)
    chans = []
    for _ in range(3):
        c = 128 + 60 * np.sin(x / rng.uniform(20, 60)) * np.cos(y / rng.uniform(20, 60))
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        c += 60 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * (width / 8) ** 2))
        chans.append(np.clip(c, 0, 255))
    return Image.fromarray(np.stack(chans, -1).astype(np.uint8), "RGB")


def _encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpeg_bytes() -> bytes:
    return _encode(_smooth_rgb(320, 240), quality=95)


@pytest.mark.parametrize("fn", [train_transform, baseline_transform])
def test_train_transforms_return_uint8_chw(fn, jpeg_bytes: bytes) -> None:
    for size in (32, 57):
        out = fn(jpeg_bytes, size, random.Random(0))
        assert out.dtype == torch.uint8 and out.shape == (3, size, size) and out.is_contiguous()


def test_train_transform_is_deterministic_for_a_seed(jpeg_bytes: bytes) -> None:
    a = [train_transform(jpeg_bytes, 48, rng) for rng in [random.Random(7)] for _ in range(3)]
    b = [train_transform(jpeg_bytes, 48, rng) for rng in [random.Random(7)] for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    other = train_transform(jpeg_bytes, 48, random.Random(8))
    assert not torch.equal(a[0], other)


def test_flip_mirrors_the_same_crop(jpeg_bytes: bytes) -> None:
    plain = train_transform(jpeg_bytes, 40, random.Random(3), hflip=0.0)
    flipped = train_transform(jpeg_bytes, 40, random.Random(3), hflip=1.0)
    assert torch.equal(flipped, plain.flip(-1))


@pytest.mark.parametrize("mode,fmt", [("L", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"),
                                      ("RGB", "PNG"), ("LA", "PNG")])
def test_any_mode_becomes_rgb(mode: str, fmt: str) -> None:
    img = _smooth_rgb(90, 70).convert(mode)
    if mode == "P":
        img.info["transparency"] = 0
    data = _encode(img, fmt)
    for out in (train_transform(data, 24, random.Random(0)), eval_transform(data, 24),
                baseline_transform(data, 24, random.Random(0))):
        assert out.shape == (3, 24, 24) and out.dtype == torch.uint8
    if mode == "L":
        out = eval_transform(data, 24)
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_crop_box_respects_scale_ratio_and_bounds() -> None:
    rng = random.Random(0)
    for _ in range(300):
        left, top, w, h = inception_crop_box(300, 200, rng, scale=(0.2, 0.6), ratio=(0.75, 4 / 3))
        assert left >= 0 and top >= 0 and left + w <= 300 and top + h <= 200
        assert 0.18 <= w * h / 60000 <= 0.62
        assert 0.7 <= w / h <= 1.4
    # an impossible area falls back to the largest centred crop within the ratio range
    assert inception_crop_box(400, 100, random.Random(0), scale=(5.0, 6.0)) == (133, 0, 133, 100)


def test_draft_decode_reduces_and_matches_full_decode() -> None:
    data = _encode(_smooth_rgb(800, 600, seed=1), quality=95)
    box = (40, 30, 640, 480)
    assert draft_reduction(640, 480, 64) == 4 and draft_reduction(640, 480, 50) == 8
    reduced, fbox = _open_for_box(data, box, 64)
    assert reduced.size == (200, 150)
    assert fbox == pytest.approx((10, 7.5, 170, 127.5))
    full = decode_crop(data, box, 64, use_draft=False).float()
    fast = decode_crop(data, box, 64, use_draft=True).float()
    assert (full - fast).abs().mean() < 3.0
    # the crop box must land on the same region: a shifted box differs clearly
    shifted = decode_crop(data, (140, 110, 640, 480), 64, use_draft=False).float()
    assert (full - shifted).abs().mean() > 3 * (full - fast).abs().mean()


def test_fast_and_baseline_paths_agree_for_the_same_seed() -> None:
    data = _encode(_smooth_rgb(640, 480, seed=2), quality=95)
    for seed in range(5):
        fast = train_transform(data, 64, random.Random(seed)).float()
        base = baseline_transform(data, 64, random.Random(seed)).float()
        assert (fast - base).abs().mean() < 4.0


def _bands(width: int, height: int, centre: tuple[int, int, int]) -> bytes:
    """Red left band, ``centre`` colour in the centred square, blue right band (PNG, lossless)."""
    arr = np.zeros((height, width, 3), np.uint8)
    side = min(width, height)
    lo = (width - side) // 2
    arr[:, :lo] = (255, 0, 0)
    arr[:, lo:lo + side] = centre
    arr[:, lo + side:] = (0, 0, 255)
    return _encode(Image.fromarray(arr), "PNG")


def test_eval_centre_crop_takes_the_centre_square() -> None:
    out = eval_transform(_bands(200, 100, (0, 255, 0)), 32, crop_pct=1.0)
    assert out.shape == (3, 32, 32)
    inner = out[:, :, 1:-1]
    assert (inner[1] == 255).all() and (inner[0] == 0).all() and (inner[2] == 0).all()


def test_eval_crop_pct_zooms_into_the_centre() -> None:
    arr = np.zeros((100, 100, 3), np.uint8)
    arr[25:75, 25:75] = 255
    data = _encode(Image.fromarray(arr), "PNG")
    assert (eval_transform(data, 20, crop_pct=0.5)[:, 1:-1, 1:-1] == 255).all()
    whole = eval_transform(data, 20, crop_pct=1.0).float() / 255
    assert whole.mean().item() == pytest.approx(0.25, abs=0.05)
    with pytest.raises(ValueError):
        eval_transform(data, 20, crop_pct=0.0)


def test_normalize_maps_uint8_to_unit_range_and_keeps_device() -> None:
    batch = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4).contiguous()
    out = normalize(batch)
    assert out.dtype == torch.float32 and out.shape == batch.shape and out.device == batch.device
    assert out[:, 0].eq(-1).all() and out[:, 1].eq(1).all()
    assert out[:, 2].sub(128 / 127.5 - 1).abs().max() < 1e-6
    imagenet = normalize(batch, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert imagenet[0, 0, 0, 0].item() == pytest.approx(-0.485 / 0.229, rel=1e-5)
    assert normalize(batch, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(TypeError):
        normalize(batch.float())


# ---- the simplejpeg path, its Pillow fallback, and decode fidelity ----

def _photo_jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """Smooth content plus texture (noise and edges), 4:2:0 like most camera JPEGs."""
    rng = np.random.default_rng(seed)
    base = np.asarray(_smooth_rgb(width, height, seed), dtype=np.float32)
    base += rng.normal(0, 4, base.shape)
    base[:, ::17] *= 0.6  # thin dark lines: edges a wrong box or filter would smear
    return _encode(Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)), quality=quality, subsampling=2)


@pytest.fixture
def pil_only(monkeypatch):
    """Decode as if simplejpeg were not installed (the documented fallback)."""
    monkeypatch.setattr(jpeg, "AVAILABLE", False)


def test_simplejpeg_is_used_for_baseline_and_progressive_rgb_and_grey_jpegs() -> None:
    assert jpeg.AVAILABLE
    img = _smooth_rgb(120, 90)
    for data in (_encode(img), _encode(img, progressive=True), _encode(img.convert("L"))):
        assert jpeg.jpeg_size(data) == (120, 90)
    for data in (_encode(img.convert("CMYK")), _encode(img, "PNG"), b"\xff\xd8\xff broken"):
        assert jpeg.jpeg_size(data) is None  # left to Pillow


def test_dct_scaling_is_chosen_from_the_crop_and_maps_the_box() -> None:
    data = _photo_jpeg(800, 600, seed=1)
    arr, fbox = decode_region(data, 64, box=(40, 30, 640, 480))
    assert arr.shape == (150, 200, 3)  # 1/4: the crop stays >= 64 px a side (160 x 120)
    assert fbox == pytest.approx((10, 7.5, 170, 127.5))
    arr, _ = decode_region(data, 48, box=(40, 30, 100, 100))
    assert arr.shape == (300, 400, 3)  # a 100 px crop allows 1/2 only for 48 px
    arr, _ = decode_region(data, 64, box=(40, 30, 100, 100))
    assert arr.shape == (600, 800, 3)  # and none for 64 px


def test_fast_decode_stays_within_the_fidelity_bound_of_pillows_full_decode() -> None:
    """The bound (pretrain.bench.fidelity.BOUND, justified there) against Pillow's full decode of
    the same crops, on textured JPEGs harsher than photos (the 250 ImageNet sample JPEGs measure
    0.16 grey levels and 50 dB, worst crop 2.9 / 34 dB); a crop one pixel off falls outside it."""
    boxes = ((0, 0, 500, 375), (37, 21, 300, 260), (200, 100, 120, 90), (10, 5, 470, 360), (3, 3, 140, 200))
    diffs = []
    for seed in range(3):
        data = _photo_jpeg(500, 375, seed)
        diffs += [difference(decode_crop(data, box, 112), reference_crop(data, box, 112)) for box in boxes]
    assert within_bound(summarise(diffs)), summarise(diffs)
    data = _photo_jpeg(500, 375, 0)
    shifted = difference(decode_crop(data, (201, 100, 120, 90), 112), reference_crop(data, (200, 100, 120, 90), 112))
    assert not within_bound(summarise([shifted]))


def test_fallback_draws_the_same_crops_as_the_fast_path(monkeypatch) -> None:
    data = _photo_jpeg(400, 300, seed=5)
    assert isinstance(decode_region(data, 64, box=(0, 0, 400, 300))[0], np.ndarray)  # simplejpeg
    fast = [train_transform(data, 64, random.Random(s)).float() for s in range(6)]
    monkeypatch.setattr(jpeg, "AVAILABLE", False)
    assert isinstance(decode_region(data, 64, box=(0, 0, 400, 300))[0], Image.Image)  # Pillow
    slow = [train_transform(data, 64, random.Random(s)).float() for s in range(6)]
    for s in range(6):
        assert (fast[s] - slow[s]).abs().mean() < 3.0  # the same box and flip, another decoder
        assert (fast[s] - slow[(s + 1) % 6]).abs().mean() > 6.0  # another seed: another crop


def test_resizing_into_a_channels_last_row_equals_the_plain_result(jpeg_bytes: bytes) -> None:
    rows = torch.empty(2, 40, 40, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
    for i, flip in enumerate((0.0, 1.0)):
        plain = train_transform(jpeg_bytes, 40, random.Random(i), hflip=flip)
        into = train_transform(jpeg_bytes, 40, random.Random(i), hflip=flip, out=rows[i])
        assert into.data_ptr() == rows[i].data_ptr() and torch.equal(into, plain)


def test_pillow_fallback_gives_uint8_chw(pil_only, jpeg_bytes: bytes) -> None:
    out = train_transform(jpeg_bytes, 32, random.Random(0))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    assert eval_transform(jpeg_bytes, 32).shape == (3, 32, 32)


# ---- data.decode=gpu: the device path, run on the CPU ----

def _reference_device_rows(encoded: list[bytes], plans: list, size: int) -> torch.Tensor:
    """What the device path must produce, written out independently: torchvision's CPU
    decode_jpeg of each image, the crop, a float antialiased resize, the flip, rounding."""
    rows = []
    for data, plan in zip(encoded, plans, strict=True):
        if plan.data is None:
            rows.append(plan.pixels)
            continue
        img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        left, top, w, h = plan.box
        out = torch.nn.functional.interpolate(img[None, :, top:top + h, left:left + w].float(), size=(size, size),
                                              mode="bilinear", antialias=True, align_corners=False)[0]
        out = out.flip(-1) if plan.flip else out
        rows.append(out.round().clamp(0, 255).to(torch.uint8))
    return torch.stack(rows)


def _mixed_batch() -> list[bytes]:
    return [_photo_jpeg(320, 240, 0), _encode(_smooth_rgb(200, 150, 1), progressive=True),
            _encode(_smooth_rgb(150, 200, 2).convert("L")), _encode(_smooth_rgb(120, 90, 3), "PNG"),
            _encode(_smooth_rgb(100, 80, 4).convert("CMYK")), _photo_jpeg(180, 300, 5)]


def test_worker_plan_draws_the_boxes_and_flips_of_the_cpu_path() -> None:
    data = _photo_jpeg(320, 240, 7)
    for seed in range(8):
        a, b = random.Random(seed), random.Random(seed)
        plan = plan_train(data, 64, a)
        box = inception_crop_box(320, 240, b)
        assert plan.data == data and plan.box == box and plan.flip == (b.random() < 0.5)
        assert a.random() == b.random()  # the same draws were used


def test_device_decode_on_cpu_equals_torchvision_cpu_decode_of_the_same_crops() -> None:
    encoded = _mixed_batch()
    plans = [plan_train(d, 48, random.Random(i)) for i, d in enumerate(encoded)]
    assert [p.data is None for p in plans] == [False, False, False, True, True, False]  # PNG, CMYK: CPU
    out, failed = decode_packed(pack(plans, 48), 48, "cpu")
    assert failed == [] and out.shape == (6, 3, 48, 48) and out.dtype == torch.uint8
    assert torch.equal(out, _reference_device_rows(encoded, plans, 48))


def test_device_decode_matches_the_cpu_transform_for_the_same_seeds() -> None:
    encoded = _mixed_batch()
    plans = [plan_train(d, 48, random.Random(i)) for i, d in enumerate(encoded)]
    out, _ = decode_packed(pack(plans, 48), 48, "cpu")
    cpu = torch.stack([train_transform(d, 48, random.Random(i)) for i, d in enumerate(encoded)])
    diffs = [difference(out[i], cpu[i]) for i in range(6)]
    assert within_bound(summarise(diffs)), summarise(diffs)  # the same crops and flips


def test_a_jpeg_no_decoder_reads_is_reported_not_fatal() -> None:
    good, cut = _photo_jpeg(160, 120, 0), _photo_jpeg(160, 120, 1)
    cut = cut[:len(cut) // 2]  # the header is intact, the data is not
    plans = [plan_train(d, 32, random.Random(0)) for d in (good, cut)]
    out, failed = decode_packed(pack(plans, 32), 32, "cpu")
    assert failed == [1] and out[1].eq(0).all() and out[0].float().mean() > 20


def test_eval_plan_is_the_centre_crop() -> None:
    plan = plan_eval(_photo_jpeg(300, 200, 0), 32, crop_pct=0.875)
    side = round(200 * 32 / 36)
    assert plan.box == ((300 - side) // 2, (200 - side) // 2, side, side) and not plan.flip
