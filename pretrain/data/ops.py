"""The training image pipeline as a recipe spells it, and the registry of image operations.

A recipe names its training transform as a string of registered operations (as timm's policy
strings and big_vision's ``pp`` strings do), in ``augment.ops``::

    augment:
      ops: "inception_crop(0.08)|flip|randaug(2,15)"      # or a YAML list of the same items

Operations are of two kinds:

- **geometry** (``inception_crop(min_scale[, max_scale])``, ``flip([p])``): they decide the crop
  box and the flip *before* decoding, so the loader decodes only what the crop needs (DCT
  scaling, :mod:`pretrain.data.transforms`) and ``data.decode=gpu`` can do it on the device.
  Exactly one crop; the flip is optional.
- **pixel** (``randaug(layers, magnitude)``, ``three_augment([jitter])``, ...): functions of the
  cropped uint8 ``(3, S, S)`` image and the sample's seeded ``random.Random``, run in the loader
  workers in the order given (so they need ``data.decode=cpu``).

Random draws follow the sample's generator in a fixed order: crop box, flip, then each pixel op
in turn, so a sample gets the same pixels on any number of ranks and workers and after a resume.

Without ``augment.ops`` the pipeline is spelled by the older keys (``data.crop_scale_min``,
``data.hflip``, ``augment.randaug_layers`` / ``randaug_magnitude``), which stay as shorthands;
setting both is refused. A new pixel operation is one function here with :func:`pixel_op`.
"""

from __future__ import annotations

import ast
import functools
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pretrain.core.errors import UserError
from pretrain.data.transforms import prepare_rand_augment, rand_augment

_ITEM = re.compile(r"^\s*([a-z_][a-z0-9_]*)\s*(?:\((.*)\))?\s*$")

PixelFn = Callable[[torch.Tensor, random.Random], torch.Tensor]


@dataclass(frozen=True)
class PixelOpSpec:
    """A registered pixel operation: ``build(*args)`` returns the function applied to each image;
    ``prepare(*args)`` runs in the rank process before DataLoader workers fork (imports that are
    unsafe after a fork, caches)."""

    name: str
    build: Callable[..., PixelFn]
    prepare: Callable[..., None]
    usage: str


PIXEL_OPS: dict[str, PixelOpSpec] = {}


def pixel_op(name: str, usage: str, prepare: Callable[..., None] = lambda *args: None):
    """Register ``build(*args) -> fn(img, rng) -> img`` as pixel operation ``name``."""
    def register(build: Callable[..., PixelFn]) -> Callable[..., PixelFn]:
        if name in PIXEL_OPS or name in _GEOMETRY:
            raise ValueError(f"image operation {name!r} is registered twice")
        PIXEL_OPS[name] = PixelOpSpec(name, build, prepare, usage)
        return build
    return register


@dataclass(frozen=True)
class PixelStep:
    """One pixel operation of a pipeline, with its arguments."""

    name: str
    args: tuple

    @functools.cached_property
    def fn(self) -> PixelFn:
        return PIXEL_OPS[self.name].build(*self.args)

    def prepare(self) -> None:
        PIXEL_OPS[self.name].prepare(*self.args)

    def __str__(self) -> str:
        return f"{self.name}({','.join(map(str, self.args))})" if self.args else self.name


@dataclass(frozen=True)
class TrainPipeline:
    """The training transform: an Inception crop with area in ``crop_scale``, a flip with
    probability ``hflip``, then ``pixel`` operations in order."""

    crop_scale: tuple[float, float] = (0.05, 1.0)
    hflip: float = 0.5
    pixel: tuple[PixelStep, ...] = ()

    def prepare(self) -> None:
        for step in self.pixel:
            step.prepare()

    def apply_pixel(self, img: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """The pixel operations on the cropped uint8 image, in place when the image is a batch row."""
        for step in self.pixel:
            out = step.fn(img, rng)
            if out is not img:
                img.copy_(out)
        return img

    def __str__(self) -> str:
        lo, hi = self.crop_scale
        crop = f"inception_crop({lo:g})" if hi == 1.0 else f"inception_crop({lo:g},{hi:g})"
        return "|".join([crop, *([f"flip({self.hflip:g})" if self.hflip != 0.5 else "flip"] if self.hflip else []),
                         *map(str, self.pixel)])


_GEOMETRY = {"inception_crop": "inception_crop(min_scale[, max_scale])", "flip": "flip([p])"}


def _numbers(args: tuple, key: str, item: str, lo: int, hi: int) -> tuple:
    if not lo <= len(args) <= hi or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise UserError(f"{key}: {item!r} takes {lo}-{hi} numbers; usage {_usage(item.split('(')[0])}")
    return args


def _usage(name: str) -> str:
    return _GEOMETRY.get(name) or PIXEL_OPS[name].usage


def parse_pipeline(spec: str | list | tuple, key: str = "augment.ops") -> TrainPipeline:
    """The pipeline a recipe spells (see the module docstring); :class:`UserError` naming ``key``,
    the item and the registered operations otherwise."""
    items = [str(s) for s in spec] if isinstance(spec, (list, tuple)) else str(spec).split("|")
    crop, hflip, pixel = None, 0.0, []
    for item in (i.strip() for i in items):
        match = _ITEM.match(item)
        if not match:
            raise UserError(f"{key}: cannot read {item!r}; write operations as name or name(arg, ...) joined by '|'")
        name, raw = match.group(1), match.group(2)
        try:
            args = ast.literal_eval(f"({raw},)") if raw and raw.strip() else ()
        except (ValueError, SyntaxError):
            raise UserError(f"{key}: the arguments of {item!r} are not numbers") from None
        if name == "inception_crop":
            lo, hi = (*_numbers(args, key, item, 1, 2), 1.0)[:2]
            if crop is not None or not 0 < lo <= hi <= 1:
                raise UserError(f"{key}: {item!r}: give one inception_crop with 0 < min_scale <= max_scale <= 1")
            crop = (float(lo), float(hi))
        elif name == "flip":
            (p,) = _numbers(args, key, item, 0, 1) or (0.5,)
            if not 0 <= p <= 1:
                raise UserError(f"{key}: {item!r}: the flip probability must be in [0, 1]")
            hflip = float(p)
        elif name in PIXEL_OPS:
            step = PixelStep(name, args)
            try:
                step.fn  # noqa: B018 - builds the op: bad arguments show here, before any worker starts
            except (TypeError, ValueError) as err:
                raise UserError(f"{key}: {item!r}: {err}; usage {_usage(name)}") from None
            pixel.append(step)
        else:
            known = ", ".join([*_GEOMETRY.values(), *(s.usage for s in PIXEL_OPS.values())])
            raise UserError(f"{key}: unknown image operation {name!r}; registered: {known}")
    if crop is None:
        raise UserError(f"{key}: the pipeline needs an inception_crop(min_scale) (it decides what is decoded)")
    return TrainPipeline(crop, hflip, tuple(pixel))


# ---- pixel operations ----

@pixel_op("randaug", "randaug(layers, magnitude)", prepare=prepare_rand_augment)
def randaug(layers: int = 2, magnitude: float = 10) -> PixelFn:
    """torchvision's RandAugment, ``magnitude`` on the TF / big_vision level scale (10 = the
    operations' maxima; above acts as 10), its draws a pure function of the sample's generator."""
    if int(layers) != layers or layers < 0 or not 0 <= magnitude <= 30:
        raise ValueError("layers must be a whole number >= 0 and magnitude in [0, 30]")

    def apply(img: torch.Tensor, rng: random.Random) -> torch.Tensor:
        return rand_augment(img, int(layers), magnitude, rng.getrandbits(63)) if layers else img
    return apply


def _prepare_torchvision(*args) -> None:
    import torchvision.transforms.v2.functional  # noqa: F401 - imported before the workers fork


@pixel_op("three_augment", "three_augment([jitter])", prepare=_prepare_torchvision)
def three_augment(jitter: float = 0.3) -> PixelFn:
    """DeiT III's 3-Augment (Touvron et al. 2022, `new_data_aug_generator`): one of grayscale,
    solarization (threshold 128) or Gaussian blur (sigma uniform in [0.1, 2]), chosen uniformly,
    then colour jitter of brightness, contrast and saturation by factors uniform in
    [1 - jitter, 1 + jitter], in a random order (0 leaves the jitter out)."""
    if not 0 <= jitter < 1:
        raise ValueError("jitter must be in [0, 1)")

    def apply(img: torch.Tensor, rng: random.Random) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        choice = rng.randrange(3)
        if choice == 0:
            img = F.rgb_to_grayscale(img, num_output_channels=3)
        elif choice == 1:
            img = F.solarize(img, threshold=128)
        else:
            sigma = rng.uniform(0.1, 2.0)
            img = F.gaussian_blur(img, kernel_size=2 * math.ceil(3 * sigma) + 1, sigma=sigma)
        if jitter:
            adjust = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation]
            rng.shuffle(adjust)
            for fn in adjust:
                img = fn(img, rng.uniform(1 - jitter, 1 + jitter))
        return img
    return apply
