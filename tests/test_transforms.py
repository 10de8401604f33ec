"""CPU decode + augmentation: shapes, determinism, odd inputs, draft decode fidelity, centre crop."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.data.transforms import (
    _open_for_box,
    baseline_transform,
    decode_crop,
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
