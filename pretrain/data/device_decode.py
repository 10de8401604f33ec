"""``data.decode=gpu``: JPEGs decoded a batch at a time by nvJPEG, cropped and resized on the device.

Split of the work:

* **workers** (:func:`plan_train`, :func:`plan_eval`, :func:`pack`) only read: per sample they
  take the image size from the JPEG header, draw the crop box and the flip from the generator
  they are given with the same draws in the same order as the CPU path
  (:func:`pretrain.data.transforms.train_transform`), so the same seeds give the same boxes, and
  hand over the encoded bytes (one flat uint8 tensor per batch plus offsets) with the boxes;
* the rank's **main process** (:func:`decode_packed`) decodes the batch with
  ``torchvision.io.decode_jpeg(list, device=...)`` (batched nvJPEG on CUDA), crops each image on
  the device and resizes it with antialiased bilinear interpolation (in float32, rounded back to
  uint8), and returns uint8 ``(B, 3, S, S)`` on the device.

Samples nvJPEG is not given: non-JPEG images and CMYK JPEGs are decoded on the CPU in the
worker by the CPU path (same draws) and travel as pixels. A JPEG the device decoder rejects is
decoded on the CPU in the main process with the same box and flip; one no decoder can read
becomes a zero image whose row is reported (:func:`decode_packed` returns it) so the loader
counts it as ``undecodable``.

On a machine without a GPU the same code runs with ``device="cpu"`` (torchvision's CPU
``decode_jpeg``); the tests use that. Not measured on a GPU yet: the crop + resize is a loop of
about three kernel launches per image, which the first GPU measurement should size against the
step time. torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec; this
module is the one place to move when they go.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from pretrain.data import jpeg
from pretrain.data.transforms import (
    centre_box,
    decode_crop,
    eval_transform,
    inception_crop_box,
    pixel_box,
    train_transform,
)

IntBox = tuple[int, int, int, int]


@dataclass
class Planned:
    """One sample as a worker hands it over: the encoded JPEG with its box (left, top, w, h) in
    original pixels and its flip, or (``data`` None) the pixels the CPU path already made."""

    data: bytes | None
    box: IntBox = (0, 0, 1, 1)
    flip: bool = False
    pixels: torch.Tensor | None = None


def device_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of a JPEG the device decoder is given (baseline or progressive, RGB or
    grey), from the header; None for anything else."""
    dims = jpeg.jpeg_size(data)
    if dims is not None or jpeg.AVAILABLE or not jpeg.is_jpeg(data):
        return dims
    img = Image.open(io.BytesIO(data))  # simplejpeg missing: Pillow reads the header alone
    return img.size if img.format in ("JPEG", "MPO") and img.mode in ("RGB", "L") else None


def _int_box(box: tuple[float, float, float, float], width: int, height: int) -> IntBox:
    """(left, top, width, height) ``box`` in whole pixels, rounded as the CPU decoders round."""
    left, top, right, bottom = pixel_box((box[0], box[1], box[0] + box[2], box[1] + box[3]), width, height)
    return left, top, right - left, bottom - top


def plan_train(data: bytes, size: int, rng: random.Random, scale: tuple[float, float] = (0.05, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5) -> Planned:
    """The worker's part of the train transform: the box and flip :func:`train_transform` would
    draw from ``rng`` (crop, then flip), or its pixels when the device does not decode ``data``."""
    dims = device_jpeg_size(data)
    if dims is None:
        return Planned(None, pixels=train_transform(data, size, rng, scale, ratio, hflip))
    box = inception_crop_box(dims[0], dims[1], rng, scale, ratio)
    return Planned(data, box, rng.random() < hflip)


def plan_eval(data: bytes, size: int, crop_pct: float = 1.0) -> Planned:
    """The worker's part of the eval transform (the centre crop, rounded to whole pixels)."""
    dims = device_jpeg_size(data)
    if dims is None:
        return Planned(None, pixels=eval_transform(data, size, crop_pct))
    return Planned(data, _int_box(centre_box(dims[0], dims[1], size, crop_pct), *dims))


def pack(items: list[Planned], size: int) -> dict:
    """A batch of planned samples as a few tensors (cheap to hand over from a worker).

    ``jpeg``: the encoded JPEGs back to back, ``offsets`` (n + 1) their bounds, ``boxes`` (n, 4)
    and ``flips`` (n) per row; ``pixel_rows`` (k) the rows the worker decoded and ``pixels``
    (k, 3, S, S) their images."""
    encoded = [it.data for it in items if it.data is not None]
    lengths = [0] + [len(d) for d in encoded]
    flat = torch.frombuffer(bytearray().join(encoded), dtype=torch.uint8) if encoded \
        else torch.empty(0, dtype=torch.uint8)
    rows = [i for i, it in enumerate(items) if it.data is None]
    pixels = torch.stack([items[i].pixels for i in rows]) if rows else torch.empty(0, 3, size, size,
                                                                                   dtype=torch.uint8)
    return {"jpeg": flat, "offsets": torch.tensor(lengths, dtype=torch.int64).cumsum(0),
            "boxes": torch.tensor([it.box for it in items], dtype=torch.int64).view(-1, 4),
            "flips": torch.tensor([it.flip for it in items], dtype=torch.bool),
            "pixel_rows": torch.tensor(rows, dtype=torch.int64), "pixels": pixels}


def resize_crop(img: torch.Tensor, box: IntBox, size: int) -> torch.Tensor:
    """uint8 ``(3, H, W)`` -> float32 ``(3, S, S)``: antialiased bilinear resize of the crop
    ``box`` = (left, top, w, h), on ``img``'s device."""
    left, top, w, h = box
    crop = img[:, top:top + h, left:left + w].unsqueeze(0).float()
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def decode_crops(encoded: list[torch.Tensor], boxes: list[IntBox], flips: list[bool], size: int,
                 device: torch.device | str) -> tuple[torch.Tensor, list[int]]:
    """Decode the JPEGs ``encoded`` (1-D uint8 CPU tensors) on ``device`` in one batched call,
    crop ``boxes``, resize to ``size``, mirror where ``flips``: uint8 ``(n, 3, S, S)`` on ``device``
    and the rows no decoder could read (zeros in the output)."""
    out = torch.empty(len(encoded), 3, size, size, dtype=torch.float32, device=device)
    failed: list[int] = []
    if not encoded:
        return out.to(torch.uint8), failed
    try:
        images = _decode_jpeg(encoded, device)
    except RuntimeError:  # one bad stream fails the batched call: decode one by one
        images = [_decode_one(data, device) for data in encoded]
    for i, (img, box) in enumerate(zip(images, boxes, strict=True)):
        if img is None:
            img = _cpu_fallback(encoded[i], box, size, device)
        if img is None:
            out[i].zero_()
            failed.append(i)
        else:
            out[i] = img if img.dtype == torch.float32 else resize_crop(img, box, size)
    flip = torch.tensor(flips, dtype=torch.bool)
    if flip.any():
        rows = flip.nonzero().flatten().to(device)
        out[rows] = out[rows].flip(-1)
    return out.round_().clamp_(0, 255).to(torch.uint8), failed


def _decode_jpeg(data: torch.Tensor | list[torch.Tensor], device: torch.device | str):
    """torchvision's ``decode_jpeg`` to RGB on ``device``; torchvision is imported here, on first
    use, because importing it costs every rank ~1.5 s (it loads torch._dynamo) and only
    ``data.decode=gpu`` needs it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _decode_one(data: torch.Tensor, device: torch.device | str) -> torch.Tensor | None:
    try:
        return _decode_jpeg(data, device)
    except RuntimeError:
        return None


def _cpu_fallback(data: torch.Tensor, box: IntBox, size: int, device: torch.device | str) -> torch.Tensor | None:
    """The CPU path's decode of the same crop, as float32 on ``device``; None when it fails too."""
    try:
        return decode_crop(data.numpy().tobytes(), box, size).to(device).float()
    except Exception:  # unreadable by every decoder: the caller counts it
        return None


def decode_packed(packed: dict, size: int, device: torch.device | str) -> tuple[torch.Tensor, list[int]]:
    """A batch from :func:`pack` as uint8 ``(n, 3, S, S)`` on ``device``, rows in order, and the
    rows that could not be decoded (zeros)."""
    n = packed["boxes"].shape[0]
    pixel_rows = packed["pixel_rows"].tolist()
    jpeg_rows = sorted(set(range(n)) - set(pixel_rows))
    offsets = packed["offsets"].tolist()
    encoded = [packed["jpeg"][offsets[j]:offsets[j + 1]] for j in range(len(jpeg_rows))]
    boxes = [tuple(b) for b in packed["boxes"][jpeg_rows].tolist()]
    decoded, failed = decode_crops(encoded, boxes, packed["flips"][jpeg_rows].tolist(), size, device)
    out = torch.empty(n, 3, size, size, dtype=torch.uint8, device=device)
    if jpeg_rows:
        out[torch.tensor(jpeg_rows, device=device)] = decoded
    if pixel_rows:
        out[torch.tensor(pixel_rows, device=device)] = packed["pixels"].to(device, non_blocking=True)
    return out, [jpeg_rows[i] for i in failed]
