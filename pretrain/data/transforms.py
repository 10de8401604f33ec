"""CPU decode + augmentation for DataLoader workers (PIL, numpy, torch; torchvision's RandAugment).

Workers return **uint8 CHW tensors**; :func:`normalize` turns a whole batch into floats later
(on the GPU in training), which keeps worker -> main-process traffic 4x smaller than float32.

Speed comes from deciding the crop before decoding: PIL reads only the header on ``open``, the
crop box is sampled in original pixel coordinates, and for JPEG the decoder is put in draft mode
(libjpeg DCT scaling by 1/2, 1/4 or 1/8), choosing the largest reduction that still leaves the
crop at least ``size`` pixels on each side. The box is mapped into the reduced image and a single
antialiased bilinear resize of that region produces the output (torch's uint8 kernel where the
CPU has AVX2, PIL's otherwise; see :func:`resize_box`). Other formats decode fully.

Random draws come from the ``random.Random`` passed in, in a fixed order (crop, then flip), so a
seeded generator gives the same tensor every time.
"""

from __future__ import annotations

import functools
import io
import math
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Box = tuple[float, float, float, float]
CropFn = Callable[[int, int], Box]

_MAX_DRAFT_REDUCTION = 8
_CROP_TRIES = 10
TORCH_UINT8_RESIZE = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def inception_crop_box(width: int, height: int, rng: random.Random,
                       scale: tuple[float, float] = (0.05, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Sample an Inception-style crop ``(left, top, crop_w, crop_h)`` in pixel coordinates.

    The crop covers an area fraction drawn uniformly from ``scale`` and has an aspect ratio
    (w/h) drawn log-uniformly from ``ratio``. After 10 failed tries (crop larger than the image)
    it falls back to the largest centred crop whose aspect ratio lies within ``ratio``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_CROP_TRIES):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = rng.randint(0, height - crop_h)
            left = rng.randint(0, width - crop_w)
            return left, top, crop_w, crop_h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, max(1, round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_w, crop_h = max(1, round(height * ratio[1])), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def draft_reduction(crop_w: float, crop_h: float, size: int) -> int:
    """Largest power of two (at most 8) that keeps a ``crop_w x crop_h`` crop >= ``size`` a side."""
    limit = min(crop_w, crop_h) / size
    reduction = 1
    while reduction * 2 <= min(limit, _MAX_DRAFT_REDUCTION):
        reduction *= 2
    return reduction


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P" or img.mode in ("PA", "LA") or "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def _open_for_box(data: bytes, box: Box | None, size: int, use_draft: bool = True,
                  crop_fn: CropFn | None = None) -> tuple[Image.Image, Box]:
    """Open ``data``, take ``box`` = (left, top, w, h) or ask ``crop_fn(width, height)`` for one,
    draft-decode, and return the RGB image with the box as (l, t, r, b) in that image's pixels.
    """
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    left, top, crop_w, crop_h = box if box is not None else crop_fn(width, height)
    factor = 1.0
    if use_draft and img.format in ("JPEG", "MPO"):
        reduction = draft_reduction(crop_w, crop_h, size)
        if reduction > 1:
            drafted = img.draft("RGB", (width // reduction, height // reduction))
            if drafted is not None:
                factor = width / drafted[1][2]
    img = _to_rgb(img)
    return img, (left / factor, top / factor, (left + crop_w) / factor, (top + crop_h) / factor)


def _to_chw_uint8(img: Image.Image) -> torch.Tensor:
    # numpy's transpose copy is ~30x faster than torch's permute().contiguous() on uint8 HWC
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))


def resize_box(img: Image.Image, box: Box, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of the region ``box`` = (l, t, r, b) of RGB ``img`` to uint8 (3, S, S).

    On x86 CPUs with AVX2 torch's uint8 antialiased kernel is used (about 2x faster than PIL's
    and within 1 grey level of it); the box is then rounded to whole pixels. Elsewhere PIL resizes
    the exact (fractional) box.
    """
    if not TORCH_UINT8_RESIZE:
        return _to_chw_uint8(img.resize((size, size), Image.Resampling.BILINEAR, box=box))
    left, top = round(box[0]), round(box[1])
    right, bottom = max(left + 1, round(box[2])), max(top + 1, round(box[3]))
    crop = torch.from_numpy(np.array(img.crop((left, top, right, bottom)), dtype=np.uint8))
    out = F.interpolate(crop.permute(2, 0, 1).unsqueeze(0), size=(size, size), mode="bilinear",
                        antialias=True, align_corners=False)  # (1, 3, S, S), channels-last strides
    return out[0].contiguous()


def decode_crop(data: bytes, box: Box, size: int, use_draft: bool = True) -> torch.Tensor:
    """Decode ``data`` and resize the crop ``box`` = (left, top, w, h) to ``(3, size, size)`` uint8.

    With ``use_draft`` a JPEG is decoded at the largest reduction that keeps the crop >= ``size``
    pixels a side; without it the image is decoded fully. Both paths crop the same region.
    """
    img, fbox = _open_for_box(data, box, size, use_draft=use_draft)
    return resize_box(img, fbox, size)


def train_transform(data: bytes, size: int, rng: random.Random, scale: tuple[float, float] = (0.05, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5) -> torch.Tensor:
    """Inception random-resized crop + horizontal flip of encoded image ``data``.

    Returns a uint8 tensor of shape ``(3, size, size)``. Any PIL-readable format and mode
    (grayscale, CMYK, palette, RGBA) is accepted and converted to RGB. Deterministic given the
    state of ``rng`` (draws: crop box, then flip).
    """
    img, fbox = _open_for_box(data, None, size,
                              crop_fn=lambda w, h: inception_crop_box(w, h, rng, scale, ratio))
    out = resize_box(img, fbox, size)
    return out.flip(-1) if rng.random() < hflip else out


def eval_transform(data: bytes, size: int, crop_pct: float = 1.0) -> torch.Tensor:
    """Resize the short side to ``floor(size / crop_pct)`` and take the centre ``size x size``.

    Done as one resize of the corresponding centred square of the original image (draft-decoded
    for JPEG), which equals resize-then-crop up to rounding. Returns uint8 ``(3, size, size)``.
    """
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    resize_to = math.floor(size / crop_pct)

    def centre_box(width: int, height: int) -> Box:
        side = min(width, height) * size / resize_to
        return (width - side) / 2, (height - side) / 2, side, side

    img, fbox = _open_for_box(data, None, size, crop_fn=centre_box)
    return resize_box(img, fbox, size)


def baseline_transform(data: bytes, size: int, rng: random.Random, scale: tuple[float, float] = (0.05, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5) -> torch.Tensor:
    """The plain path benchmarks compare against: full decode, crop, resize, flip.

    Same random draws as :func:`train_transform` (so the same crop for the same ``rng`` state),
    but no draft decoding and a separate crop copy, as torchvision's RandomResizedCrop does on PIL.
    """
    img = _to_rgb(Image.open(io.BytesIO(data)))
    left, top, crop_w, crop_h = inception_crop_box(img.width, img.height, rng, scale, ratio)
    out = img.crop((left, top, left + crop_w, top + crop_h)).resize((size, size), Image.Resampling.BILINEAR)
    if rng.random() < hflip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_chw_uint8(out)


@functools.lru_cache(maxsize=8)
def _randaug(layers: int, magnitude: int):
    from torchvision.transforms import v2

    return v2.RandAugment(num_ops=layers, magnitude=magnitude, num_magnitude_bins=11)


def rand_augment(img: torch.Tensor, layers: int, magnitude: float, seed: int) -> torch.Tensor:
    """torchvision's RandAugment (``layers`` operations at ``magnitude`` on the TF level scale,
    capped at 10 = the operations' maxima) on a uint8 ``(3, S, S)`` image, its random draws a pure
    function of ``seed`` (the caller's torch RNG is left as it was)."""
    op = _randaug(layers, round(min(magnitude, 10.0)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return op(img)


def normalize(batch: torch.Tensor, mean: Sequence[float] = (0.5, 0.5, 0.5),
              std: Sequence[float] = (0.5, 0.5, 0.5), dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``(..., 3, H, W)`` -> float ``(x / 255 - mean) / std`` on the batch's device.

    The default mean/std of 0.5 map pixels to [-1, 1] (the vit_jax / big_vision convention);
    pass ImageNet statistics for timm-style inputs. The result has ``dtype`` (float32 default).
    """
    if batch.dtype != torch.uint8:
        raise TypeError(f"normalize expects a uint8 batch, got {batch.dtype}")
    if batch.dim() < 3 or batch.shape[-3] != 3:
        raise ValueError(f"normalize expects (..., 3, H, W), got shape {tuple(batch.shape)}")
    mean_t = torch.tensor([255.0 * m for m in mean], dtype=torch.float32, device=batch.device).view(3, 1, 1)
    std_t = torch.tensor([255.0 * s for s in std], dtype=torch.float32, device=batch.device).view(3, 1, 1)
    return batch.to(torch.float32).sub_(mean_t).div_(std_t).to(dtype)
