"""``vitscale shards synth OUT``: the synthetic task written as a real ImageFolder of JPEG files.

The demo and tests use it to exercise the whole path a user takes with real data: image files
-> ``vitscale shards write`` -> streaming loader. Sample ``i`` is
:func:`pretrain.data.synthetic.synthetic_uint8` (class ``i % classes``); ``--seed`` picks the task.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from pretrain.core.errors import UserError
from pretrain.data.synthetic import synthetic_label, synthetic_uint8


def write_synthetic_folder(out: Path, classes: int, per_class: int, img_size: int, seed: int,
                           start: int = 0) -> int:
    """Write ``classes x per_class`` JPEGs to ``out/class_XX/img_NNNNNNN.jpg``; returns the count."""
    for flag, value, low in (("--classes", classes, 2), ("--per-class", per_class, 1), ("--img-size", img_size, 4),
                             ("--start", start, 0)):
        if value < low:
            raise UserError(f"{flag} {value}: must be >= {low}")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: give a new folder for the images")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: choose a new folder (nothing is overwritten)")
    n = classes * per_class
    for i in range(start, start + n):
        folder = out / f"class_{synthetic_label(i, classes):02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(synthetic_uint8(i, classes, img_size, seed)).save(folder / f"img_{i:07d}.jpg", quality=95)
    return n
