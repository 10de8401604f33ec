"""The training transform as a recipe spells it (`augment.ops`), through the image-op registry."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from data_tools.cli import main as shards_main
from pretrain.core.errors import UserError
from pretrain.data.config import AugmentConfig, DataConfig, LoaderSpec
from pretrain.data.loader import ShardTrain
from pretrain.data.ops import PIXEL_OPS, PixelStep, TrainPipeline, parse_pipeline
from pretrain.train.config_file import load_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ops")
    assert shards_main(["synth", str(root / "img"), "--classes", "4", "--per-class", "8", "--img-size", "24"]) == 0
    assert shards_main(["write", str(root / "img"), str(root / "sh"), "--samples-per-shard", "8", "--workers", "1",
                        "--no-progress"]) == 0
    return root / "sh"


def test_a_pipeline_string_reads_as_crop_flip_and_pixel_ops_in_order():
    p = parse_pipeline("inception_crop(0.08)|flip|randaug(2,15)")
    assert p == TrainPipeline((0.08, 1.0), 0.5, (PixelStep("randaug", (2, 15)),))
    assert parse_pipeline(["inception_crop(0.08, 0.9)", "flip(0.3)"]) == TrainPipeline((0.08, 0.9), 0.3, ())
    assert parse_pipeline("inception_crop(0.05)") == TrainPipeline((0.05, 1.0), 0.0, ())  # no flip unless named
    assert str(p) == "inception_crop(0.08)|flip|randaug(2,15)"


@pytest.mark.parametrize("spec, said", [
    ("inception_crop(0.08)|blur", "unknown image operation 'blur'; registered: inception_crop"),
    ("flip|randaug(2,15)", "needs an inception_crop"),
    ("inception_crop(0.08)|randaug(2,99)", "randaug(2,99)"),
    ("inception_crop(0.08)|randaug(a)", "not numbers"),
    ("inception_crop(2)", "0 < min_scale <= max_scale <= 1"),
])
def test_a_wrong_pipeline_is_one_line_naming_the_key_and_the_item(spec, said):
    with pytest.raises(UserError, match="augment.ops") as err:
        AugmentConfig(ops=spec)
    assert said in str(err.value)


RECIPE = "configs/pretrain_vit_b16_in21k.yaml"  # crop and flip at their defaults


def test_the_shorthand_keys_spell_the_same_pipeline_as_augment_ops():
    short = load_config(RECIPE, ["augment.randaug_layers=2", "augment.randaug_magnitude=15",
                                 "data.crop_scale_min=0.08"]).loader().pipeline
    spelled = load_config(RECIPE, ["augment.ops=inception_crop(0.08)|flip|randaug(2,15)"])
    assert short == spelled.loader().pipeline
    agreeing = load_config(RECIPE, ["data.crop_scale_min=0.08", "augment.ops=inception_crop(0.08)|flip|randaug(2,15)"])
    assert agreeing.loader().pipeline == short


def test_augment_ops_that_disagree_with_the_shorthand_keys_are_refused():
    for extra in ("augment.randaug_layers=2", "data.crop_scale_min=0.2", "data.hflip=false"):
        with pytest.raises(UserError, match="augment"):
            load_config(RECIPE, ["augment.ops=inception_crop(0.08)|flip", extra])


def test_pixel_ops_with_gpu_decoding_are_refused_naming_them():
    with pytest.raises(UserError, match=r"data.decode='gpu'.*randaug\(2,15\) run in the loader workers"):
        load_config(RECIPE, ["augment.ops=inception_crop(0.08)|flip|randaug(2,15)", "data.decode=gpu"])


def _keys_and_pixels(shards: Path, augment: AugmentConfig, data: dict) -> list[tuple[list[str], torch.Tensor]]:
    spec = LoaderSpec(DataConfig(train=str(shards), workers=0, shuffle_buffer=4, **data), micro_batch=8,
                      img_size=16, num_classes=4, seed=3, augment=augment)
    source = ShardTrain(spec, rank=0, world=1)
    try:
        return [(b.keys, b.images.clone()) for b in (source.next_batch() for _ in range(4))]
    finally:
        source.close()


def test_the_loader_gives_the_same_pixels_for_the_same_pipeline_however_spelled(shards):
    short = _keys_and_pixels(shards, AugmentConfig(randaug_layers=2, randaug_magnitude=9), {"crop_scale_min": 0.3})
    spelled = _keys_and_pixels(shards, AugmentConfig(ops="inception_crop(0.3)|flip|randaug(2,9)"), {})
    plain = _keys_and_pixels(shards, AugmentConfig(ops="inception_crop(0.3)|flip"), {})
    assert [k for k, _ in short] == [k for k, _ in spelled] == [k for k, _ in plain]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(short, spelled, strict=True))
    assert not all(torch.equal(a, b) for (_, a), (_, b) in zip(short, plain, strict=True))  # randaug did something


def test_every_registered_pixel_op_is_a_pure_function_of_the_sample_generator():
    img = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8)
    defaults = {"randaug": (2, 10)}
    for name, op in PIXEL_OPS.items():
        fn = PixelStep(name, defaults.get(name, ())).fn
        a, b = fn(img.clone(), random.Random(7)), fn(img.clone(), random.Random(7))
        assert a.dtype == torch.uint8 and a.shape == img.shape and torch.equal(a, b), name
        assert op.usage.startswith(name)


def test_three_augment_applies_one_of_its_three_ops_then_jitter(shards):
    img = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8)
    gray = PixelStep("three_augment", (0.0,)).fn
    outs = {}
    for seed in range(12):
        rng = random.Random(seed)
        choice = random.Random(seed).randrange(3)
        outs.setdefault(choice, gray(img.clone(), rng))
    assert set(outs) == {0, 1, 2}
    assert torch.equal(outs[0][0], outs[0][1]) and torch.equal(outs[0][1], outs[0][2])  # grayscale
    assert torch.equal(outs[1], torch.where(img >= 128, 255 - img, img))  # solarize at 128
    batches = _keys_and_pixels(shards, AugmentConfig(ops="inception_crop(0.3)|flip|three_augment(0.3)"), {})
    assert all(b.dtype == torch.uint8 for _, b in batches)
