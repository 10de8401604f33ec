"""Turn one source image file into the bytes stored in a shard, or say why it cannot be used.

Without re-encoding, JPEG and PNG files are copied byte for byte (after a check that PIL can
decode them); other formats (BMP, GIF, WebP, TIFF, ...) are re-encoded as JPEG. With
``resize_max`` (cap on the long side, aspect kept, never upscaled) or ``quality``, every image is
re-encoded as JPEG at ``quality`` (default 90), grayscale kept as grayscale, everything else RGB.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

DEFAULT_QUALITY = 90
_COPY_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png"}


class SkipSample(Exception):
    """The source image cannot become a sample; ``str(err)`` is the reason written to skipped.jsonl."""


@dataclass(frozen=True)
class EncodeOptions:
    """How images are stored: copied (both None) or re-encoded as JPEG."""

    resize_max: int | None = None
    quality: int | None = None

    @property
    def reencode(self) -> bool:
        return self.resize_max is not None or self.quality is not None

    @property
    def jpeg_quality(self) -> int:
        return DEFAULT_QUALITY if self.quality is None else self.quality


def capped_size(width: int, height: int, resize_max: int) -> tuple[int, int]:
    """``(w, h)`` scaled so the long side is at most ``resize_max``; unchanged if already smaller."""
    long_side = max(width, height)
    if long_side <= resize_max:
        return width, height
    scale = resize_max / long_side
    return max(1, round(width * scale)), max(1, round(height * scale))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SkipSample("missing file") from None
    except IsADirectoryError:
        raise SkipSample("is a directory, not an image file") from None
    except OSError as err:
        raise SkipSample(f"cannot read file: {err.strerror or err}") from None


def decode_image(data: bytes, draft_to: Callable[[int, int], tuple[int, int]] | None = None
            ) -> tuple[Image.Image, tuple[int, int]]:
    """Fully decode ``data``; return the image and its original size.

    ``draft_to(w, h)`` lets a JPEG decode at a DCT-reduced scale no smaller than that size; the
    whole bitstream is still read, so truncation and corruption are still caught.
    """
    buffer = io.BytesIO(data)
    try:
        img = Image.open(buffer)
        original = img.size
        if draft_to is not None and img.format in ("JPEG", "MPO"):
            img.draft(img.mode, draft_to(*original))
        img.load()
    except Image.DecompressionBombError as err:
        raise SkipSample(f"image too large for PIL: {err}") from None
    except Exception as err:  # any decoder failure means the file is unusable
        detail = str(err).replace(f" {buffer!r}", "")  # no memory address: skipped.jsonl is deterministic
        raise SkipSample(f"not decodable by PIL ({type(err).__name__}: {detail})") from None
    return img, original


def _to_storable(img: Image.Image) -> Image.Image:
    if img.mode in ("L", "RGB"):
        return img
    if img.mode in ("P", "PA", "LA", "RGBA") or "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def encode_image(path: Path, options: EncodeOptions) -> tuple[str, bytes]:
    """Return ``(extension, bytes)`` for the shard member, or raise :class:`SkipSample`."""
    data = _read(path)
    if not options.reencode:
        img, _ = decode_image(data, draft_to=lambda w, h: (max(1, w // 8), max(1, h // 8)))
        ext = _COPY_FORMATS.get(img.format or "")
        if ext is not None:
            return ext, data
        img, target = decode_image(data)
    else:
        resize_max = options.resize_max
        cap = None if resize_max is None else (lambda w, h: capped_size(w, h, resize_max))
        img, original = decode_image(data, draft_to=cap)
        target = original if cap is None else cap(*original)
    img = _to_storable(img)
    if target != img.size:
        img = img.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=options.jpeg_quality)
    return "jpg", buf.getvalue()
