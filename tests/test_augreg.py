"""AugReg-grade training: Mixup / CutMix targets, RandAugment seeding, layer-wise LR decay,
stochastic depth, and EMA weights sharded under ZeRO-1/2/3 (real DeepSpeed processes, gloo)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from data_tools.cli import main as shards_main
from pretrain.data.config import AugmentConfig
from pretrain.model.vit import build_model, spec_for
from pretrain.train.mixing import Mixer, build_mixer
from tests.helpers import TINY, cli_env, read_metrics, vitscale, vitscale_here
from tests.runs import check_ema_chain, final_weights, max_diff

# ---------------------------------------------------------------- Mixup / CutMix


def _batch(n: int = 8, classes: int = 5):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_softmax_targets_are_rows_that_sum_to_one_and_cutmix_lam_is_the_pasted_area(mixup, cutmix):
    images, labels = _batch()
    s, classes = 0.1, 5
    mixer = Mixer(AugmentConfig(mixup_alpha=mixup, cutmix_alpha=cutmix), classes, "softmax", s, seed=0)
    for step in range(20):
        mixed, rows = mixer(images, labels, step, micro=0)
        assert rows.shape == (8, classes) and torch.allclose(rows.sum(-1), torch.ones(8))
        assert (rows >= 0).all()
        if torch.equal(mixed, images):  # a CutMix box too small to hold a pixel: then nothing is mixed
            assert cutmix and torch.allclose(rows.max(-1).values, torch.full((8,), 1 - s + s / classes))
        if cutmix and not mixup:  # every pixel comes from one of the two images; lam = the share kept
            kept = (mixed == images).all(0).all(0).float().mean().item()
            i = int(torch.nonzero(labels != labels.flip(0))[0])
            lam = (rows[i, labels[i]].item() - s / classes) / (1 - s)
            assert abs(lam - kept) < 1e-5


def test_sigmoid_multi_hot_targets_stay_in_0_1():
    images, _ = _batch()
    multi = (torch.rand(8, 5, generator=torch.Generator().manual_seed(1)) > 0.6).float()
    mixer = Mixer(AugmentConfig(mixup_alpha=0.5, cutmix_alpha=1.0), 5, "sigmoid", 0.0, seed=0)
    for step in range(10):
        _, rows = mixer(images, multi, step, 0)
        assert rows.min() >= 0 and rows.max() <= 1


def test_mix_prob_0_leaves_the_batch_untouched_and_mixing_off_builds_no_mixer():
    images, labels = _batch()
    never = Mixer(AugmentConfig(mixup_alpha=0.8, mix_prob=0.0), 5, "softmax", 0.0, seed=0)
    mixed, rows = never(images, labels, 3, 0)
    assert mixed is images and torch.equal(rows, torch.nn.functional.one_hot(labels, 5).float())
    assert build_mixer(AugmentConfig(), 5, "softmax", 0.0, 0) is None
    assert build_mixer(AugmentConfig(mixup_alpha=0.8, mix_prob=0.0), 5, "softmax", 0.0, 0) is None


def test_the_same_step_mixes_the_same_way_after_a_resume():
    """Draws are a pure function of (seed, step, canonical micro batch): a resumed run, a new process,
    mixes step 7 exactly as the uninterrupted one did."""
    images, labels = _batch()
    aug = AugmentConfig(mixup_alpha=0.8, cutmix_alpha=1.0)
    a = Mixer(aug, 5, "softmax", 0.1, seed=3)(images, labels, 7, 1)
    b = Mixer(aug, 5, "softmax", 0.1, seed=3)(images.clone(), labels.clone(), 7, 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = Mixer(aug, 5, "softmax", 0.1, seed=3)(images, labels, 8, 1)
    assert not torch.equal(a[0], c[0])


# ---------------------------------------------------------------- RandAugment in the loader workers


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("augreg")
    assert shards_main(["synth", str(root / "img"), "--classes", "4", "--per-class", "16", "--img-size", "24"]) == 0
    assert shards_main(["write", str(root / "img"), str(root / "sh"), "--samples-per-shard", "8", "--workers", "1",
                        "--no-progress"]) == 0
    return root / "sh"


def _loader(shards: Path, workers: int, randaug: int = 2):
    from pretrain.data.loader import ShardTrain
    from pretrain.train.config_file import load_config

    cfg = load_config(None, ["model.name=vit_test4", "model.img_size=16", "model.num_classes=4",
                             f"data.train={shards}", f"data.workers={workers}", "train.micro_batch=4",
                             f"augment.randaug_layers={randaug}", "augment.randaug_magnitude=10"])
    return ShardTrain(cfg.loader(), 0, 1)


def _pixels(src, batches: int) -> dict[str, bytes]:
    out = {}
    for _ in range(batches):
        b = src.next_batch()
        out.update({k: img.numpy().tobytes() for k, img in zip(b.keys, b.images, strict=True)})
    return out


def test_randaugment_gives_a_sample_the_same_bytes_with_1_or_2_workers_and_after_a_resume(shards):
    one, two = _pixels(_loader(shards, 1), 16), _pixels(_loader(shards, 2), 16)  # one epoch each
    assert set(one) == set(two) and len(one) == 64
    assert one == two
    first = _loader(shards, 2)
    head = _pixels(first, 5)
    resumed = _loader(shards, 2)
    resumed.load_state_dict(first.state_dict())
    tail = _pixels(resumed, 11)
    assert {**head, **tail} == two
    plain = _pixels(_loader(shards, 1, randaug=0), 16)
    assert sum(plain[k] != one[k] for k in one) > 48, "RandAugment changes the pixels"


# ---------------------------------------------------------------- layer decay, stochastic depth


def test_layer_decay_groups_for_vit_h14_follow_the_rule():
    model = build_model(spec_for("vit_h14", num_classes=1000), device="meta")
    decay, depth = 0.75, 32
    from pretrain.train.engine import param_groups  # imports DeepSpeed

    groups = param_groups(model, 0.05, decay)
    named = dict(model.named_parameters())
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(named), "every parameter in exactly one group"
    where = {id(p): g for g in groups for p in g["params"]}
    for name, p in named.items():
        g = where[id(p)]
        if name.startswith(("patch_embed", "pos_embed", "cls_token")):
            want = decay ** (depth + 1)
        elif name.startswith("blocks."):
            want = decay ** (depth - int(name.split(".")[1]))
        else:
            assert name.startswith(("norm.", "head.")), name
            want = 1.0
        assert g["lr_scale"] == want, name
        no_decay = p.ndim <= 1 or name in ("pos_embed", "cls_token")
        assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert len(param_groups(model, 0.05, 1.0)) == 2


def test_stochastic_depth_rises_linearly_and_is_off_at_eval():
    spec = spec_for("vit_test4", img_size=16, num_classes=3, depth=5)
    torch.manual_seed(0)
    model = build_model(spec, drop_path=0.4)
    assert [round(b.drop_path, 6) for b in model.blocks] == [0.0, 0.1, 0.2, 0.3, 0.4]
    plain = build_model(spec)
    plain.load_state_dict(model.state_dict())  # same architecture: a checkpoint loads without it
    x = torch.randn(4, 3, 16, 16)
    model.eval(), plain.eval()
    assert torch.equal(model.forward_features(x), plain.forward_features(x))
    model.train()
    assert not torch.equal(model.forward_features(x), model.forward_features(x)), "dropped per sample in training"


# ---------------------------------------------------------------- EMA under ZeRO (real processes)

EMA = [*TINY, "ema.decay=0.8", "data.val=null", "run.deterministic=true", "checkpoint.keep=20"]


def _ema_run(run: Path, stage: int, steps: int, *extra: str, env: dict | None = None):
    return vitscale("pretrain", *EMA, f"zero.stage={stage}", f"train.steps={steps}", f"run.dir={run}", *extra,
                    env=env, check=True)


@pytest.fixture(scope="module")
def zero3_ema(tmp_path_factory) -> Path:
    """ZeRO-3, 10 steps, a checkpoint every step, a non-finite gradient at step 4 (skipped)."""
    run = tmp_path_factory.mktemp("ema3") / "run"
    _ema_run(run, 3, 10, "checkpoint.every=1", "train.eval_every=5", "data.val=synthetic",
             env={**cli_env(), "VITSCALE_FAULT": "nangrad@4"})
    return run


def test_zero3_ema_is_the_average_of_the_gathered_master_weights(zero3_ema):
    check_ema_chain(zero3_ema, 10, 0.8, skipped=(4,))
    evals = read_metrics(zero3_ema, "eval")
    assert [e["step"] for e in evals] == [5, 10] and all("ema_top1" in e and "top1" in e for e in evals)
    summary = json.loads((zero3_ema / "summary.json").read_text())
    assert summary["eval_ema_top1"] == evals[-1]["ema_top1"]


def test_evaluating_the_ema_does_not_disturb_training(zero3_ema, tmp_path):
    """The same run without an EMA (its evals swap nothing in and out) has bitwise the same losses."""
    run = tmp_path / "plain"
    vitscale("pretrain", *EMA, "ema.decay=0", "zero.stage=3", "train.steps=10", "checkpoint.every=0",
             "train.eval_every=5", "data.val=synthetic", f"run.dir={run}",
             env={**cli_env(), "VITSCALE_FAULT": "nangrad@4"}, check=True)
    losses = {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}
    ema_losses = {r["step"]: r["loss"] for r in read_metrics(zero3_ema) if "loss" in r}
    assert losses == ema_losses


# ZeRO-2's EMA chain (with skipped steps): tests/test_fault_tolerance.py; kill -9 and relaunch with EMA
# (bitwise EMA weights, ZeRO-1/2/3): tests/test_exact_resume.py


def test_ema_continues_exactly_after_a_2_to_1_process_resume(zero3_ema, tmp_path):
    run = tmp_path / "one"
    shutil.copytree(zero3_ema / "checkpoints" / "step_00000005", run / "checkpoints" / "step_00000005")
    (run / "checkpoints" / "latest").write_text("step_00000005")
    vitscale("pretrain", *EMA, "zero.stage=3", "train.steps=6", "checkpoint.every=1", "train.grad_accum=2",
             "--nproc-per-node", "1", f"run.dir={run}", check=True)
    before, w6 = final_weights(zero3_ema, 5, ema=True), final_weights(run, 6, ema=False)
    want = {k: 0.8 * before[k].double() + 0.2 * w6[k].double() for k in before}
    assert max_diff(final_weights(run, 6, ema=True), want) <= 1e-6


def test_ema_weights_export_evaluate_and_start_a_finetune(zero3_ema, tmp_path):
    out = tmp_path / "ema.safetensors"
    vitscale("convert", str(zero3_ema), str(out), "--to", "safetensors", "--ema", check=True)
    from pretrain.formats import load_safetensors

    sd, _, _ = load_safetensors(out)
    assert max_diff(sd, final_weights(zero3_ema, 10, ema=True)) == 0.0
    proc = vitscale_here("convert", str(out), str(tmp_path / "x.safetensors"), "--to", "safetensors", "--ema")
    assert proc.returncode == 2 and "holds one set of weights" in proc.stderr
    proc = vitscale_here("finetune", "--config", "configs/demo_finetune_cpu.yaml", "--init", str(out),
                         "finetune.init_weights=ema", f"run.dir={tmp_path / 'ft'}")
    assert proc.returncode == 2 and "finetune.init_weights=ema needs a vitscale training checkpoint" in proc.stderr


def test_the_augreg_twin_trains_from_shards_and_reports_ema_top1(shards, tmp_path):
    """configs/demo_augreg_cpu.yaml on shards (so RandAugment runs in the workers) on 2 processes:
    every eval record carries ema_top1 beside top1, and the loss falls."""
    run = tmp_path / "run"
    vitscale("pretrain", "--config", "configs/demo_augreg_cpu.yaml", "--nproc-per-node", "2", f"run.dir={run}",
             f"data.train={shards}", f"data.val={shards}", "model.img_size=16", "model.num_classes=4",
             "train.steps=30", "train.eval_every=15", "train.log_every=5", check=True)
    evals = read_metrics(run, "eval")
    assert [e["step"] for e in evals] == [15, 30] and all({"top1", "ema_top1"} <= set(e) for e in evals)
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert losses[-1] < losses[0]
