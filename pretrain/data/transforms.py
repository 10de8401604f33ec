"""CPU decode + augmentation for DataLoader workers (RandAugment: torchvision's).

Transforms produce **uint8 (3, S, S) tensors**, written into ``out`` when given (the training
loader passes a channels-last row of a shared batch buffer); :func:`normalize` turns a whole batch
into floats later (on the GPU in training), which keeps worker -> main-process traffic 4x smaller
than float32.

Speed comes from deciding the crop before decoding. The header gives the image size, the crop
box is sampled in original pixel coordinates (the augmentation distribution does not depend on
the decoder), and a JPEG is then decoded by libjpeg-turbo through simplejpeg
(:mod:`pretrain.data.jpeg`) at the largest power-of-two DCT reduction (1/2, 1/4, 1/8) that still
leaves the crop at least ``size`` pixels a side, with plain chroma upsampling, into a reused
buffer. The box is mapped into the reduced image and a single antialiased bilinear
resize of that region (torch's uint8 kernel on the crop, a view of the decoded array) produces
the output. Anything simplejpeg does not take (PNG, WebP, CMYK JPEGs, or simplejpeg not
installed) goes through Pillow: JPEGs there in draft mode (libjpeg DCT scaling chosen the same
way), other formats fully decoded. See :func:`decode_crop` for the fidelity of the fast path.

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

from pretrain.data import jpeg

Box = tuple[float, float, float, float]
CropFn = Callable[[int, int], Box]

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


draft_reduction = jpeg.reduction_for  # the same rule for Pillow's draft mode and simplejpeg's scaling


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P" or img.mode in ("PA", "LA") or "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def _open_for_box(data: bytes, box: Box | None, size: int, use_draft: bool = True,
                  crop_fn: CropFn | None = None) -> tuple[Image.Image, Box]:
    """The Pillow path: open ``data``, take ``box`` = (left, top, w, h) or ask
    ``crop_fn(width, height)`` for one, draft-decode a JPEG, and return the RGB image with the box
    as (l, t, r, b) in that image's pixels.
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


def decode_region(data: bytes, size: int, box: Box | None = None, crop_fn: CropFn | None = None,
                  use_draft: bool = True, fast: bool = True) -> tuple[np.ndarray | Image.Image, Box]:
    """Decode ``data`` for the crop ``box`` = (left, top, w, h) in original pixels (or the one
    ``crop_fn(width, height)`` returns, called once with the size from the header).

    Returns the decoded RGB image, a ``(H, W, 3)`` uint8 array from simplejpeg (valid until this
    thread decodes again) or a Pillow image (the fallback), and the box as (l, t, r, b) in its
    pixels. ``use_draft`` allows DCT-domain reduction; ``fast`` selects plain chroma upsampling on
    the simplejpeg path (:func:`pretrain.data.jpeg.decode_scaled`).
    """
    dims = jpeg.jpeg_size(data)
    if dims is None:
        return _open_for_box(data, box, size, use_draft=use_draft, crop_fn=crop_fn)
    width, height = dims
    left, top, crop_w, crop_h = box if box is not None else crop_fn(width, height)
    reduction = jpeg.reduction_for(crop_w, crop_h, size) if use_draft else 1
    arr = jpeg.decode_scaled(data, width, height, reduction, fast=fast)
    fx, fy = width / arr.shape[1], height / arr.shape[0]
    return arr, (left / fx, top / fy, (left + crop_w) / fx, (top + crop_h) / fy)


def _to_chw_uint8(img: Image.Image) -> torch.Tensor:
    # numpy's transpose copy is ~30x faster than torch's permute().contiguous() on uint8 HWC
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))


def pixel_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """``box`` = (l, t, r, b) in float pixels, rounded to whole pixels inside a ``width`` x
    ``height`` image, at least one pixel each way (every decoder crops with this)."""
    left, top = min(round(box[0]), width - 1), min(round(box[1]), height - 1)
    return left, top, min(width, max(left + 1, round(box[2]))), min(height, max(top + 1, round(box[3])))


def _resize_into(crop: torch.Tensor, out: torch.Tensor) -> None:
    """Antialiased bilinear resize of uint8 ``crop`` (1, 3, h, w) into ``out`` (1, 3, S, S), any
    strides: the out= form of the op ``F.interpolate(..., antialias=True)`` runs writes straight
    into a batch row (channels-last rows save ~100 us per 224 px image over resize + copy)."""
    try:
        torch.ops.aten._upsample_bilinear2d_aa.out(crop, list(out.shape[-2:]), False, None, None, out=out)
    except (AttributeError, RuntimeError, TypeError):  # the op's out= form changed: resize, then copy
        out.copy_(F.interpolate(crop, size=tuple(out.shape[-2:]), mode="bilinear", antialias=True,
                                align_corners=False))


def resize_box(img: np.ndarray | Image.Image, box: Box, size: int, flip: bool = False,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Antialiased bilinear resize of the region ``box`` = (l, t, r, b) of an RGB image (a
    ``(H, W, 3)`` uint8 array or a Pillow image) to uint8 (3, S, S), mirrored when ``flip``.

    Written into ``out`` when given (any strides, e.g. a channels-last batch row), else into a new
    contiguous tensor; returns it. On x86 CPUs with AVX2 torch's uint8 antialiased kernel is used
    (about 3x faster than PIL's and within 1 grey level of it) on a view of the region, rounded to
    whole pixels. Elsewhere PIL resizes the exact (fractional) box.
    """
    if out is None:
        out = torch.empty(3, size, size, dtype=torch.uint8)
    if not TORCH_UINT8_RESIZE:
        pil = Image.fromarray(img) if isinstance(img, np.ndarray) else img
        pil = pil.resize((size, size), Image.Resampling.BILINEAR, box=box)
        return out.copy_(_to_chw_uint8(pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else pil))
    if isinstance(img, np.ndarray):
        left, top, right, bottom = pixel_box(box, img.shape[1], img.shape[0])
        crop = img[top:bottom, left:right]  # a view: no copy of the region
    else:
        left, top, right, bottom = pixel_box(box, img.width, img.height)
        crop = np.array(img.crop((left, top, right, bottom)), dtype=np.uint8)
    _resize_into(torch.from_numpy(crop.transpose(2, 0, 1)[None]), out[None])  # (1, 3, h, w) -> (1, 3, S, S)
    return out.copy_(out.flip(-1)) if flip else out


def decode_crop(data: bytes, box: Box, size: int, use_draft: bool = True, fast: bool = True) -> torch.Tensor:
    """Decode ``data`` and resize the crop ``box`` = (left, top, w, h) to ``(3, size, size)`` uint8.

    With ``use_draft`` a JPEG is decoded at the largest reduction that keeps the crop >= ``size``
    pixels a side; without it the image is decoded fully. Both paths crop the same region.
    Fidelity against Pillow's full decode of the same crop (``vitscale bench loader`` reports it;
    tests bound it): on the 250 ImageNet sample JPEGs 0.16 grey levels mean absolute difference
    and 50 dB PSNR; the worst crop (DCT-reduced, sharp content) 2.9 levels, 34 dB.
    """
    img, fbox = decode_region(data, size, box=box, use_draft=use_draft, fast=fast)
    return resize_box(img, fbox, size)


def train_transform(data: bytes, size: int, rng: random.Random, scale: tuple[float, float] = (0.05, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Inception random-resized crop + horizontal flip of encoded image ``data``.

    Returns a uint8 tensor of shape ``(3, size, size)``: ``out`` when given (the loader passes a
    row of its batch), else a new contiguous one. Any PIL-readable format and mode (grayscale,
    CMYK, palette, RGBA) is accepted and converted to RGB. Deterministic given the state of
    ``rng`` (draws: crop box, then flip), and the box depends only on the image size, so the
    simplejpeg and Pillow paths crop the same region for the same ``rng`` state.
    """
    img, fbox = decode_region(data, size, crop_fn=lambda w, h: inception_crop_box(w, h, rng, scale, ratio))
    return resize_box(img, fbox, size, flip=rng.random() < hflip, out=out)


def centre_box(width: int, height: int, size: int, crop_pct: float = 1.0) -> tuple[float, float, float, float]:
    """The eval crop ``(left, top, w, h)``: the centred square that resizing the short side to
    ``floor(size / crop_pct)`` and taking the centre ``size x size`` would keep."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    side = min(width, height) * size / math.floor(size / crop_pct)
    return (width - side) / 2, (height - side) / 2, side, side


def eval_transform(data: bytes, size: int, crop_pct: float = 1.0) -> torch.Tensor:
    """Resize the short side to ``floor(size / crop_pct)`` and take the centre ``size x size``.

    Done as one resize of the corresponding centred square of the original image (reduced-decoded
    for JPEG), which equals resize-then-crop up to rounding. Returns uint8 ``(3, size, size)``.
    """
    centre_box(1, 1, size, crop_pct)  # the argument check, before any decoding
    img, fbox = decode_region(data, size, crop_fn=lambda w, h: centre_box(w, h, size, crop_pct))
    return resize_box(img, fbox, size)


def baseline_transform(data: bytes, size: int, rng: random.Random, scale: tuple[float, float] = (0.05, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5) -> torch.Tensor:
    """The plain path benchmarks compare against: Pillow's full decode, crop, resize, flip.

    Same random draws as :func:`train_transform` (so the same crop for the same ``rng`` state),
    but no reduced decoding and a separate crop copy, as torchvision's RandomResizedCrop does on PIL.
    """
    return pil_random_resized_crop(_to_rgb(Image.open(io.BytesIO(data))), size, rng, scale, ratio, hflip)


def pil_random_resized_crop(img: Image.Image, size: int, rng: random.Random,
                            scale: tuple[float, float] = (0.05, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                            hflip: float = 0.5) -> torch.Tensor:
    """Inception crop (drawn as :func:`train_transform` draws it) + flip of a decoded RGB Pillow
    image with Pillow's crop and bilinear resize, as uint8 ``(3, size, size)``."""
    left, top, crop_w, crop_h = inception_crop_box(img.width, img.height, rng, scale, ratio)
    out = img.crop((left, top, left + crop_w, top + crop_h)).resize((size, size), Image.Resampling.BILINEAR)
    if rng.random() < hflip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_chw_uint8(out)


@functools.lru_cache(maxsize=8)
def _randaug(layers: int, magnitude: int):
    from torchvision.transforms import v2

    return v2.RandAugment(num_ops=layers, magnitude=magnitude, num_magnitude_bins=11)


def _randaug_op(layers: int, magnitude: float):
    """The (cached) op for ``magnitude`` on the TF level scale, capped at 10."""
    return _randaug(layers, round(min(magnitude, 10.0)))


def prepare_rand_augment(layers: int, magnitude: float) -> None:
    """Import torchvision and build the RandAugment op in this process. Call it before a
    DataLoader forks its workers: importing torchvision (it loads torch._dynamo) in a worker
    forked from a process with running threads can deadlock on a lock held at fork time."""
    if layers > 0:
        _randaug_op(layers, magnitude)


def rand_augment(img: torch.Tensor, layers: int, magnitude: float, seed: int) -> torch.Tensor:
    """torchvision's RandAugment (``layers`` operations at ``magnitude`` on the TF level scale,
    capped at 10 = the operations' maxima) on a uint8 ``(3, S, S)`` image, its random draws a pure
    function of ``seed`` (the caller's torch RNG is left as it was)."""
    op = _randaug_op(layers, magnitude)
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
