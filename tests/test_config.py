from pathlib import Path

import pytest
import yaml

from pretrain.core.errors import UserError
from pretrain.train.config_file import load_config
from tests.helpers import ROOT, vitscale_here

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(path):
    from pretrain.train.checks import check_unread_settings

    cfg = load_config(path)
    assert check_unread_settings(cfg) is None, "a recipe sets keys its data source ignores"
    spec = cfg.model.spec()
    assert spec.img_size % spec.patch_size == 0
    if cfg.train.global_batch:
        for gpus in (8, 32, 64) if path.name.startswith("pretrain") else (8,):  # accumulation derived
            accum = cfg.train.accum_for(gpus)
            assert cfg.train.micro_batch * accum * gpus == cfg.train.global_batch


def test_recipes_follow_the_paper():
    h16 = load_config(ROOT / "configs/pretrain_vit_h16_jft.yaml")
    assert h16.train.loss == "sigmoid" and h16.model.head_bias_init == -10.0 and h16.data.multi_label
    assert h16.model.spec().representation_size == 1280
    for name in ("pretrain_vit_b16_in21k", "pretrain_vit_l16_in21k", "pretrain_vit_h14_in21k"):
        c = load_config(ROOT / f"configs/{name}.yaml")
        assert c.optim.weight_decay == 0.03 and c.train.global_batch == 4096 and c.optim.warmup_steps == 10000
        assert (c.optim.b1, c.optim.b2, c.train.grad_clip) == (0.9, 0.999, 1.0)


def test_overrides_are_typed():
    cfg = load_config(ROOT / "configs/demo_cpu.yaml", ["model.depth=3", "optim.lr=1e-4", "data.val=null"])
    assert cfg.model.spec().depth == 3 and cfg.optim.lr == 1e-4 and cfg.data.val is None


@pytest.mark.parametrize("override,message", [
    ("model.dpth=2", "did you mean 'depth'"),
    ("trian.steps=2", "did you mean 'train'"),
    ("train.steps=ten", "train.steps='ten': expected int"),
    ("model.img_size=30", "multiple of the patch size"),
    ("model.heads=5", "must divide the width"),
    ("zero.stage=4", "use 0, 1, 2 or 3"),
    ("train.global_batch=100", "multiple of micro_batch x grad_accum"),
    ("model.name=vit_zz16", "unknown model name"),
])
def test_config_mistakes_name_key_value_and_fix(override, message):
    with pytest.raises(UserError, match=message):
        load_config(ROOT / "configs/demo_cpu.yaml", [override])


def test_global_batch_checked_against_world_size():
    cfg = load_config(None, ["train.micro_batch=8", "train.grad_accum=2", "train.global_batch=64"])
    cfg.train.check_world(4)
    with pytest.raises(UserError, match="train.grad_accum=4"):
        cfg.train.check_world(2)


def test_cli_config_error_is_one_line_without_traceback(tmp_path: Path):
    proc = vitscale_here("pretrain", "--config", "configs/demo_cpu.yaml", "model.dpth=2", f"run.dir={tmp_path}")
    assert proc.returncode == 2
    assert "did you mean 'depth'" in proc.stderr and "Traceback" not in proc.stderr
    missing = vitscale_here("pretrain", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"img_size": "big"}}))
    proc = vitscale_here("pretrain", "--config", str(bad))
    assert proc.returncode == 2 and "model.img_size='big'" in proc.stderr


def test_synthetic_data_refuses_settings_it_would_ignore(tmp_path: Path):
    """Shard-only settings on synthetic data: exit 2 before any process starts, one line naming
    each key and the fix; values that describe synthetic data anyway (no flip, no workers) pass."""
    from pretrain.train.checks import check_unread_settings

    def unread(*overrides):
        check = check_unread_settings(load_config(ROOT / "configs/demo_cpu.yaml", list(overrides)))
        return None if check is None else (check.name, check.detail)

    assert unread("data.workers=0", "data.hflip=false", "data.shuffle_buffer=0") is None
    name, detail = unread("augment.randaug_layers=2", "data.crop_scale_min=0.6", "data.workers=1")
    assert name == "data.train" and "augment.randaug_layers=2, data.crop_scale_min=0.6, data.workers=1" in detail
    assert "vitscale shards synth" in detail
    assert unread("data.workers=1", "fewshot.datasets=[{name: a, train: /a, val: /a}]") is None  # few-shot reads it
    assert unread("data.train=/some/shards", "data.eval_crop_pct=0.875")[0] == "data.val"
    proc = vitscale_here("pretrain", "--config", "configs/demo_cpu.yaml", "augment.randaug_layers=2",
                         "--nproc-per-node", "2", f"run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and not (tmp_path / "r").exists()
    [line] = proc.stderr.strip().splitlines()
    assert "data.train=synthetic reads none of augment.randaug_layers=2" in line and "Traceback" not in line


def test_global_batch_mismatch_fails_before_spawning(tmp_path: Path):
    proc = vitscale_here("pretrain", "--config", "configs/demo_cpu.yaml", "train.global_batch=32",
                         "--nproc-per-node", "2", f"run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and "world size 2" in proc.stderr
    assert not (tmp_path / "r").exists()
