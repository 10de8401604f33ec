"""Fine-tune surgery: head swap, pos-embed resampling, clear errors, and that resampling keeps
what the model learned."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from pretrain.core.errors import UserError
from pretrain.model.surgery import (
    SurgeryReport,
    apply_finetune_surgery,
    finetune_state_dict,
    resample_state_dict,
)
from pretrain.model.vit import VisionTransformer, build_model, spec_for

HEAD = ["head.weight", "head.bias"]
PRE_LOGITS = ["pre_logits.weight", "pre_logits.bias"]


def _pretrained(**overrides) -> dict[str, torch.Tensor]:
    """State dict of a tiny pretraining model (img 16, grid 4x4, pre-logits head), random weights."""
    torch.manual_seed(0)
    spec = spec_for("vit_test4", **{"img_size": 16, "num_classes": 10, "representation_size": "auto",
                                    **overrides})
    return build_model(spec).state_dict()


def test_drops_exactly_head_and_pre_logits_and_resamples():
    source = _pretrained()
    target = spec_for("vit_test4", img_size=24, num_classes=5)

    state, report = finetune_state_dict(source, target)

    assert sorted(report.dropped) == sorted(HEAD + PRE_LOGITS)
    assert report.new == HEAD
    assert report.resampled == {"pos_embed": ((1, 17, 64), (1, 37, 64))}
    assert report.loaded == len(source) - 4
    assert not any(k.startswith("pre_logits.") for k in state)
    assert torch.equal(state["head.weight"], torch.zeros(5, 64))
    assert torch.equal(state["head.bias"], torch.zeros(5))
    assert state["pos_embed"].shape == (1, 37, 64)
    assert torch.equal(state["pos_embed"][:, :1], source["pos_embed"][:, :1])
    for key in set(state) - {"pos_embed", *HEAD}:
        assert torch.equal(state[key], source[key]), key

    model = VisionTransformer(target)
    model.load_state_dict(state, strict=True)
    text = report.format()
    for key in HEAD + PRE_LOGITS + ["pos_embed [1, 17, 64] -> [1, 37, 64]", f"loaded {report.loaded}"]:
        assert key in text


def test_apply_loads_into_the_model():
    source = _pretrained()
    model = build_model(spec_for("vit_test4", img_size=32, num_classes=3))
    report = apply_finetune_surgery(model, source, mode="bicubic")
    assert isinstance(report, SurgeryReport)
    assert model.pos_embed.shape == (1, 65, 64)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, source["blocks.1.mlp.fc2.weight"])
    assert torch.count_nonzero(model.head.weight) == 0
    assert torch.equal(model(torch.randn(2, 3, 32, 32)), torch.zeros(2, 3))


def test_keep_pre_logits():
    source = _pretrained()
    target = spec_for("vit_test4", img_size=16, num_classes=7, representation_size=64)
    state, report = finetune_state_dict(source, target, keep_pre_logits=True)
    assert sorted(report.dropped) == sorted(HEAD)
    assert report.resampled == {}
    for key in PRE_LOGITS:
        assert torch.equal(state[key], source[key])
    assert state["head.weight"].shape == (7, 64)
    VisionTransformer(target).load_state_dict(state, strict=True)


def test_head_and_pre_logits_setting_must_agree():
    source = _pretrained()
    with pytest.raises(UserError, match="representation_size=64"):
        finetune_state_dict(source, spec_for("vit_test4", img_size=16, num_classes=7, representation_size=64))
    with pytest.raises(UserError, match="no pre-logits layer"):
        finetune_state_dict(source, spec_for("vit_test4", img_size=16, num_classes=7), keep_pre_logits=True)


def test_other_width_names_first_mismatched_key_and_cause():
    source = _pretrained(width=192)
    with pytest.raises(UserError) as err:
        finetune_state_dict(source, spec_for("vit_test4", img_size=24, num_classes=5))
    msg = str(err.value)
    assert "shape mismatch at cls_token" in msg
    assert "[1, 1, 192] vs target [1, 1, 64]" in msg
    assert "source width 192 vs target 64" in msg
    assert "model.name" in msg


def test_other_patch_size_is_named():
    source = _pretrained(patch_size=8)
    with pytest.raises(UserError, match=r"patch_embed\.proj\.weight.*source patch 8 vs target 4"):
        finetune_state_dict(source, spec_for("vit_test4", img_size=24, num_classes=5))


@pytest.mark.parametrize(("source_depth", "word", "key"), [(3, "unexpected", "blocks.2.norm1.weight"),
                                                           (1, "missing", "blocks.1.norm1.weight")])
def test_other_depth_names_keys_and_cause(source_depth, word, key):
    source = _pretrained(depth=source_depth)
    with pytest.raises(UserError) as err:
        finetune_state_dict(source, spec_for("vit_test4", img_size=24, num_classes=5))
    msg = str(err.value)
    assert word in msg and key in msg
    assert f"source depth {source_depth} vs target 2" in msg


def test_missing_and_unexpected_keys_are_named():
    source = _pretrained()
    del source["norm.weight"]
    with pytest.raises(UserError, match="not a compatible ViT") as err:
        finetune_state_dict(source, spec_for("vit_test4", img_size=16, num_classes=5))
    assert "missing 1 key(s) the target expects: norm.weight." in str(err.value)

    source = _pretrained()
    source["fc_norm.weight"] = torch.ones(64)
    with pytest.raises(UserError, match=r"unexpected.*fc_norm\.weight"):
        finetune_state_dict(source, spec_for("vit_test4", img_size=16, num_classes=5))


def test_a_pooling_mismatch_names_model_pool():
    """A GAP-pooled pretraining (the AugReg recipes) fine-tuned with a class-token recipe: the
    message names the setting to change, not a conversion."""
    source = build_model(spec_for("vit_test4", img_size=16, num_classes=7, pool="gap")).state_dict()
    with pytest.raises(UserError, match="model.pool=gap") as err:
        finetune_state_dict(source, spec_for("vit_test4", img_size=24, num_classes=5))
    assert "cls_token" in str(err.value) and "converted first" not in str(err.value)


def test_unknown_mode_is_a_user_error():
    with pytest.raises(UserError, match="bilinear or bicubic"):
        finetune_state_dict(_pretrained(), spec_for("vit_test4", img_size=24, num_classes=5), mode="area")


def test_non_square_source_grid():
    source = _pretrained()
    source["pos_embed"] = torch.randn(1, 1 + 2 * 4, 64)
    target = spec_for("vit_test4", img_size=24, num_classes=5)
    with pytest.raises(UserError, match="source_grid"):
        finetune_state_dict(source, target)
    state, report = finetune_state_dict(source, target, source_grid=(2, 4))
    assert report.resampled["pos_embed"] == ((1, 9, 64), (1, 37, 64))
    VisionTransformer(target).load_state_dict(state, strict=True)


def test_gap_pool_without_class_token():
    source = _pretrained(pool="gap")
    target = spec_for("vit_test4", img_size=24, num_classes=5, pool="gap")
    state, report = finetune_state_dict(source, target)
    assert "cls_token" not in state
    assert report.resampled["pos_embed"] == ((1, 16, 64), (1, 36, 64))
    VisionTransformer(target).load_state_dict(state, strict=True)


def test_bf16_source_keeps_dtype_and_loads():
    source = {k: v.bfloat16() for k, v in _pretrained().items()}
    target = spec_for("vit_test4", img_size=24, num_classes=5)
    state, _ = finetune_state_dict(source, target)
    assert state["pos_embed"].dtype == state["head.weight"].dtype == torch.bfloat16
    VisionTransformer(target).load_state_dict(state, strict=True)


def test_resample_state_dict_keeps_the_whole_head():
    source = _pretrained()
    target = spec_for("vit_test4", img_size=24, num_classes=10, representation_size="auto")
    state, report = resample_state_dict(source, target)
    assert list(state) == list(source)
    assert report.dropped == [] and report.new == []
    for key in HEAD + PRE_LOGITS:
        assert torch.equal(state[key], source[key])
    VisionTransformer(target).load_state_dict(state, strict=True)


# --- resampling preserves what was learned -------------------------------------------------------

def _quadrant_images(step: int, batch: int, num_classes: int, img_size: int, seed: int,
                     noise: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """A task only position embeddings can solve: every class arranges the SAME four colours over
    the four image quadrants, so all classes have the same multiset of patch colours and a ViT
    without position information is at chance. Quadrants are 2x2 patches at 16 px and 3x3 at 24
    px (patch 4), so no patch straddles two quadrants at either size. (pretrain.data.synthetic's task
    can be solved from colours alone: zeroed pos_embed kept ~100% accuracy there.)"""
    g = torch.Generator().manual_seed(seed)
    palette = torch.rand(4, 3, generator=g) * 2 - 1
    orders = list(itertools.permutations(range(4)))
    chosen = torch.randperm(len(orders), generator=g)[:num_classes].tolist()
    layouts = torch.stack([palette[list(orders[i])].T.reshape(3, 2, 2) for i in chosen])
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    labels = torch.randint(0, num_classes, (batch,), generator=g)
    images = F.interpolate(layouts[labels], size=img_size, mode="nearest")
    return (images + noise * torch.randn(images.shape, generator=g)).clamp(-1, 1), labels


def _train(model: VisionTransformer, steps: int, num_classes: int, seed: int, lr: float = 2e-3) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        x, y = _quadrant_images(step, 32, num_classes, model.spec.img_size, seed)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def _accuracy(model: VisionTransformer, num_classes: int, seed: int) -> float:
    model.eval()
    x, y = _quadrant_images(10**6, 512, num_classes, model.spec.img_size, seed)
    return (model(x).argmax(-1) == y).float().mean().item()


@pytest.fixture
def one_thread():
    """The tiny model gains nothing from intra-op threads, and one thread is not slowed by other
    processes (parallel test runs) competing for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_resampling_preserves_what_was_learned(one_thread):
    classes, seed = 8, 0
    torch.manual_seed(0)
    small = build_model(spec_for("vit_test4", img_size=16, num_classes=classes))
    _train(small, 200, classes, seed)
    acc_16 = _accuracy(small, classes, seed)
    assert acc_16 >= 0.9

    big_spec = spec_for("vit_test4", img_size=24, num_classes=classes)
    big = build_model(big_spec)
    state, report = resample_state_dict(small.state_dict(), big_spec)
    assert report.resampled == {"pos_embed": ((1, 17, 64), (1, 37, 64))}
    big.load_state_dict(state, strict=True)
    acc_resampled = _accuracy(big, classes, seed)

    grid = state["pos_embed"][:, 1:]
    g = torch.Generator().manual_seed(1)
    baselines = {"zeros": torch.zeros_like(grid), "random": 0.02 * torch.randn(grid.shape, generator=g)}
    acc_baseline = {}
    for name, replacement in baselines.items():
        broken = dict(state, pos_embed=torch.cat([state["pos_embed"][:, :1], replacement], dim=1))
        big.load_state_dict(broken, strict=True)
        acc_baseline[name] = _accuracy(big, classes, seed)

    assert acc_resampled >= 0.8 * acc_16, (acc_16, acc_resampled)
    for name, acc in acc_baseline.items():
        assert acc_resampled > acc + 0.4, (name, acc, acc_resampled)

    new_classes, new_seed = 6, 5
    tuned = build_model(spec_for("vit_test4", img_size=24, num_classes=new_classes))
    apply_finetune_surgery(tuned, small.state_dict())
    acc_before = _accuracy(tuned, new_classes, new_seed)
    _train(tuned, 60, new_classes, new_seed)
    acc_after = _accuracy(tuned, new_classes, new_seed)
    assert acc_after >= 0.9 and acc_after > acc_before + 0.5, (acc_before, acc_after)


# ---------------------------------------------------------------- vitscale finetune --init from foreign files

_RECIPE_WITHOUT_MODEL_NAME = """\
run: {seed: 0}
model: {img_size: 48, num_classes: 3, representation_size: null}
data: {train: synthetic, val: synthetic, workers: 0, hflip: false, synthetic_classes: 3, val_samples: 16}
train: {steps: 2, micro_batch: 8, grad_accum: 1, log_every: 1, eval_every: 0}
optim: {name: sgd, lr: 0.01, momentum: 0.9, weight_decay: 0.0, warmup_steps: 1, decay: cosine}
zero: {stage: 2}
checkpoint: {every: 0, keep: 1}
"""


def _timm_file(path, embed_dim: int, num_heads: int) -> None:
    """What timm writes: its own VisionTransformer's state dict, saved with safetensors."""
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(0)
    model = TimmViT(img_size=32, patch_size=8, embed_dim=embed_dim, depth=2, num_heads=num_heads, mlp_ratio=2.0,
                    num_classes=10)
    save_file(model.state_dict(), str(path))


def test_finetune_takes_the_architecture_of_a_timm_file(tmp_path):
    """The README's promise: --init takes a timm state dict as it is. Without model.name the
    architecture comes from the file (here vit_micro8: width 32, depth 2, MLP 64, patch 8)."""
    import yaml

    from tests.helpers import read_metrics, vitscale

    pytest.importorskip("timm")
    _timm_file(tmp_path / "micro.safetensors", embed_dim=32, num_heads=2)
    (tmp_path / "ft.yaml").write_text(_RECIPE_WITHOUT_MODEL_NAME)
    run = tmp_path / "run"
    proc = vitscale("finetune", "--config", str(tmp_path / "ft.yaml"), "--init", str(tmp_path / "micro.safetensors"),
                    "--nproc-per-node", "1", f"run.dir={run}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "model.name=vit_micro8" in proc.stdout and "pos_embed [1, 17, 32] -> [1, 37, 32]" in proc.stdout
    model = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert (model["name"], model["width"], model["heads"], model["patch_size"], model["img_size"]) == (
        "vit_micro8", 32, 2, 8, 48)
    event = [r for r in read_metrics(run, "event") if r.get("event") == "finetune_init"][0]
    assert event["format"] == "timm" and sorted(event["new"]) == ["head.bias", "head.weight"]


def test_finetune_names_the_key_a_timm_file_cannot_tell(tmp_path):
    """Width 48 is no known variant and a timm state dict does not store the head count: the
    message names model.heads, before any process starts."""
    from tests.helpers import vitscale_here

    pytest.importorskip("timm")
    _timm_file(tmp_path / "w48.safetensors", embed_dim=48, num_heads=3)
    (tmp_path / "ft.yaml").write_text(_RECIPE_WITHOUT_MODEL_NAME)
    proc = vitscale_here("finetune", "--config", str(tmp_path / "ft.yaml"), "--init", str(tmp_path / "w48.safetensors"),
                         "--nproc-per-node", "1", f"run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "set model.heads=N" in proc.stderr and "Traceback" not in proc.stderr
    assert "converted first" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_finetune_from_hf_keeps_its_layer_norm_eps(tmp_path):
    """A HF model (eps 1e-12, transformers' default) fine-tuned with a recipe that names the
    variant: the model trains with the weights' epsilon, recorded in the run's config."""
    import yaml

    from tests.helpers import vitscale

    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 image_size=16, patch_size=4, num_labels=10)
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "hf")
    run = tmp_path / "run"
    proc = vitscale("finetune", "--config", "configs/demo_finetune_cpu.yaml", "--init", str(tmp_path / "hf"),
                    "--nproc-per-node", "1", f"run.dir={run}", "train.steps=1", "train.micro_batch=8",
                    "data.val_samples=16", "data.workers=0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "model.norm_eps=1e-12" in proc.stdout
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["norm_eps"] == 1e-12
