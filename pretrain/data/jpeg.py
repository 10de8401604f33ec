"""JPEG decoding near libjpeg-turbo's limit, through simplejpeg (the CPU path of the loader).

Why simplejpeg: it is a maintained binding of libjpeg-turbo whose wheels bundle the library
(nothing to install on the system), and it exposes what the loader needs and Pillow does not:
DCT-domain scaling chosen by target size, plain chroma upsampling, and decoding into a caller's
buffer. Decoding into a buffer this process reuses avoids a fresh
allocation (and its page faults) per image, which alone saves ~15% of the decode time.

What it does not expose is decoding only the rows of a crop: libjpeg-turbo can skip and stop
scanlines (``jpeg_skip_scanlines``, TurboJPEG 3's cropping region), but no maintained Python
binding offers that for decompression (PyTurboJPEG's ``crop`` is a lossless transform that
re-encodes, and needs TurboJPEG 3 from the system). Rows above a crop must be entropy-decoded
anyway, and entropy decoding is most of the cost at ImageNet sizes: even a 1/8-scale decode
(DC coefficients only) takes ~75% of a full decode's time on the 250-image sample.

Only power-of-two reductions are used (1/2, 1/4, 1/8): libjpeg-turbo has SIMD IDCTs for those,
while 7/8, 3/4 and 5/8 use scalar kernels and decode *slower* than full size. CMYK / YCCK JPEGs
go to Pillow (its colour conversion is the reference), as does everything when simplejpeg is
not installed (:data:`AVAILABLE`).
"""

from __future__ import annotations

import math
import threading

import numpy as np

try:
    import simplejpeg
except ImportError:  # the loader falls back to Pillow
    simplejpeg = None

AVAILABLE = simplejpeg is not None
MAX_REDUCTION = 8
_CONVERTIBLE = ("YCbCr", "Gray", "RGB")  # colourspaces libjpeg-turbo turns into RGB as Pillow does
_buffers = threading.local()


def is_jpeg(data: bytes | memoryview) -> bool:
    """The bytes start with a JPEG SOI marker and an APPn/DQT/SOF/... marker."""
    return len(data) > 3 and data[0] == 0xFF and data[1] == 0xD8 and data[2] == 0xFF


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of a JPEG this module decodes, from its header only; None for anything
    it leaves to Pillow (not a JPEG, CMYK/YCCK, an unreadable header, simplejpeg missing)."""
    if not AVAILABLE or not is_jpeg(data):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (width, height) if colorspace in _CONVERTIBLE else None


def reduction_for(crop_w: float, crop_h: float, size: int) -> int:
    """Largest power of two (at most 8) that keeps a ``crop_w x crop_h`` crop >= ``size`` a side."""
    limit = min(min(crop_w, crop_h) / size, MAX_REDUCTION)
    reduction = 1
    while reduction * 2 <= limit:
        reduction *= 2
    return reduction


def scaled_size(width: int, height: int, reduction: int) -> tuple[int, int]:
    """The size libjpeg produces at 1/``reduction`` scale (it rounds up)."""
    return math.ceil(width / reduction), math.ceil(height / reduction)


def _buffer(nbytes: int) -> np.ndarray:
    buf = getattr(_buffers, "array", None)
    if buf is None or buf.size < nbytes:
        buf = np.empty(max(nbytes, 1 << 20), dtype=np.uint8)
        _buffers.array = buf
    return buf


def decode_scaled(data: bytes, width: int, height: int, reduction: int = 1, fast: bool = True) -> np.ndarray:
    """Decode ``data`` (a JPEG of ``width x height``, see :func:`jpeg_size`) at 1/``reduction``
    scale to RGB uint8 ``(H, W, 3)``.

    The array lives in a buffer this thread reuses: it is valid until the next call, so copy
    out of it (a resize does) before decoding again. ``fast`` selects plain (replicating) chroma
    upsampling instead of libjpeg's smooth "fancy" upsampling: ~5% faster, and after the
    antialiased downscale 0.1 grey levels from Pillow's decode on average (the README has the
    figures). The fast integer IDCT is not used: no measurable gain here for 1.2 grey levels.
    Raises ``ValueError`` for a corrupt or truncated stream, as Pillow would.
    """
    out_w, out_h = scaled_size(width, height, reduction)
    buf = _buffer(out_w * out_h * 3)
    return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=fast,
                                  min_height=out_h, min_width=out_w, buffer=buf, strict=True)
