"""How far the fast decode paths are from Pillow's full decode of the same crop.

The reference for a crop box (left, top, w, h) in original pixels is the plain path: Pillow
decodes the whole image (libjpeg's accurate IDCT and fancy upsampling), crops the box and
resizes it to ``size`` with its antialiased bilinear filter. Against it we measure, per image,
the mean absolute pixel difference (grey levels of 0..255) and the PSNR, for

* ``ours``: :func:`pretrain.data.transforms.decode_crop` (simplejpeg, DCT scaling, fast IDCT and
  upsampling, torch's uint8 resize);
* ``gpu``: the ``data.decode=gpu`` path (:func:`pretrain.data.device_decode.decode_crops`) run on
  ``device`` (the CPU when there is no GPU: then it is torchvision's CPU decoder).

Crop boxes are drawn as in training (Inception crop, ``seeded("aug", ...)`` per sample).

:data:`BOUND` is what a decode path must stay within over a set of crops: a mean absolute
difference of at most 1.5 grey levels and a PSNR of at least 38 dB over all pixels, and no single
crop beyond 4 grey levels / under 30 dB. Why these: JPEG coding at ImageNet's qualities (75-95)
is itself 33-42 dB from the original photo, so on average the decoders must differ by less than
the codec already changed (two encodings of one photo differ more); the per-crop floor leaves
room for DCT-domain reduction on sharp content (a reduced decode low-passes differently from a
full decode + bilinear filter, as Pillow's draft mode did before), while a crop shifted by one
pixel on textured content falls outside it (the tests check both).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable

import numpy as np
import torch
from PIL import Image

from pretrain.data.device_decode import decode_crops, device_jpeg_size
from pretrain.data.stream import seeded
from pretrain.data.transforms import _to_chw_uint8, _to_rgb, decode_crop, inception_crop_box

Box = tuple[int, int, int, int]
BOUND = {"mad": 1.5, "psnr_db": 38.0, "worst_mad": 4.0, "worst_psnr_db": 30.0}


def reference_crop(data: bytes, box: Box, size: int) -> torch.Tensor:
    """Pillow's full decode of ``data``, the crop ``box`` = (left, top, w, h), resized to uint8 (3, S, S)."""
    img = _to_rgb(Image.open(io.BytesIO(data)))
    left, top, w, h = box
    return _to_chw_uint8(img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BILINEAR))


def difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(mean absolute difference, mean squared difference) of two uint8 images."""
    d = a.to(torch.float64) - b.to(torch.float64)
    return float(d.abs().mean()), float((d * d).mean())


def psnr(mse: float) -> float:
    """PSNR in dB for 8-bit images (inf for identical ones)."""
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def summarise(diffs: list[tuple[float, float]]) -> dict:
    """``mad``: mean absolute difference over all pixels; ``psnr_db``: from the mean squared
    difference over all pixels; ``worst_mad`` / ``worst_psnr_db``: of the worst image."""
    if not diffs:
        return {"images": 0}
    mads, mses = np.array([d[0] for d in diffs]), np.array([d[1] for d in diffs])
    return {"images": len(diffs), "mad": round(float(mads.mean()), 3), "psnr_db": round(psnr(float(mses.mean())), 2),
            "worst_mad": round(float(mads.max()), 3), "worst_psnr_db": round(psnr(float(mses.max())), 2)}


def within_bound(summary: dict) -> bool:
    """The figures of :func:`summarise` satisfy :data:`BOUND`."""
    return (summary["mad"] <= BOUND["mad"] and summary["psnr_db"] >= BOUND["psnr_db"]
            and summary["worst_mad"] <= BOUND["worst_mad"] and summary["worst_psnr_db"] >= BOUND["worst_psnr_db"])


def measure(images: Iterable[bytes], size: int, seed: int = 0, device: str = "cpu") -> dict:
    """Fidelity of ``ours`` and ``gpu`` against :func:`reference_crop` over the JPEGs in
    ``images`` (others are skipped: both paths hand them to Pillow)."""
    ours: list[tuple[float, float]] = []
    gpu: list[tuple[float, float]] = []
    for index, data in enumerate(images):
        dims = device_jpeg_size(data)
        if dims is None:
            continue
        box = inception_crop_box(dims[0], dims[1], seeded("aug", seed, 0, 0, index))
        ref = reference_crop(data, box, size)
        ours.append(difference(decode_crop(data, box, size), ref))
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out, failed = decode_crops([encoded], [box], [False], size, device)
        if not failed:
            gpu.append(difference(out[0].cpu(), ref))
    result = {"reference": "Pillow full decode + crop + bilinear resize", "bound": BOUND,
              "ours": summarise(ours), "gpu_path": {**summarise(gpu), "device": str(device)}}
    for name in ("ours", "gpu_path"):
        if result[name]["images"]:
            result[name]["within_bound"] = within_bound(result[name])
    return result
