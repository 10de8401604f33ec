"""Few-shot linear evaluation: the closed-form solver against scikit-learn and the normal equations,
seeded subsets, the evaluator inside real training runs, `vitscale evaluate --fewshot` on the same
weights in one process, and the mistakes a user can make."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data_tools.cli import main as shards_main
from pretrain.core.errors import UserError
from pretrain.data.fewshot import class_orders, val_subset
from pretrain.train import least_squares as lsq
from pretrain.train.checks import check_fewshot, raise_on_failure
from pretrain.train.config_file import load_config, save_config
from pretrain.train.fewshot import Catalog, Rows, plan
from pretrain.train.fewshot_config import FewshotConfig, FewshotDataset
from tests.helpers import TINY, read_metrics, vitscale, vitscale_here

# ---------------------------------------------------------------- the solver


def _clusters(rng, n: int, d: int, k: int, spread: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    centres = np.random.default_rng(99).normal(size=(k, d)) * np.linspace(0.2, 3.0, d)  # uneven scales
    y = rng.integers(0, k, n)
    return centres[y] + spread * rng.normal(size=(n, d)) + 5.0, y


@pytest.mark.parametrize("n,d,k", [(60, 16, 5), (24, 48, 4), (80, 12, 2)], ids=["n>d", "n<d", "binary"])
@pytest.mark.parametrize("standardize", [True, False])
def test_solver_predicts_exactly_what_sklearn_ridge_classifier_predicts(n, d, k, standardize):
    """RidgeClassifier(alpha=l2) on the same (standardised) features: one-vs-rest {-1, 1} targets,
    unpenalised intercept. Identical predictions and accuracy for every l2."""
    rng = np.random.default_rng(0)
    x, y = _clusters(rng, n, d, k)
    xt, yt = _clusters(rng, 400, d, k)
    cache = lsq.fit(x, y, k, standardize=standardize)
    z, zt = (x - cache.mean) / cache.scale, (xt - cache.mean) / cache.scale
    for l2 in (1e-2, 1.0, 30.0, 1e3, 1e5):
        from sklearn.linear_model import RidgeClassifier

        oracle = RidgeClassifier(alpha=l2).fit(z, y)
        ours = lsq.predict(cache, xt, l2)
        np.testing.assert_array_equal(ours, oracle.predict(zt))
        assert lsq.accuracy(cache, xt, yt, l2) == oracle.score(zt, yt)
        theirs = oracle.decision_function(zt)
        mine = lsq.scores(cache, xt, l2)
        np.testing.assert_allclose(mine if k > 2 else mine[:, 1], theirs, atol=1e-9)
    assert 0.5 < lsq.accuracy(cache, xt, yt, 1.0) < 1.0  # a task where the answer is not trivial


def test_solver_equals_a_plain_solve_of_the_normal_equations():
    rng = np.random.default_rng(1)
    x, y = _clusters(rng, 50, 20, 6)
    xt, _ = _clusters(rng, 100, 20, 6)
    cache = lsq.fit(x, y, 6)
    z = (x - x.mean(0)) / (x.std(0) + lsq.STD_EPS)
    t = lsq.targets(y, 6)
    for l2 in (0.1, 10.0, 1000.0):
        w = np.linalg.solve(z.T @ z + l2 * np.eye(20), z.T @ (t - t.mean(0)))
        expected = ((xt - x.mean(0)) / (x.std(0) + lsq.STD_EPS)) @ w + t.mean(0)
        np.testing.assert_allclose(lsq.scores(cache, xt, l2), expected, rtol=1e-9, atol=1e-9)


def test_l2_grid_choice_is_the_best_on_the_held_out_rows():
    rng = np.random.default_rng(2)
    x, y = _clusters(rng, 30, 40, 5, spread=3.0)
    hx, hy = _clusters(rng, 200, 40, 5, spread=3.0)
    cache = lsq.fit(x, y, 5)
    grid = (1e-3, 1e-1, 10.0, 1e3, 1e6)
    accs = {l2: lsq.accuracy(cache, hx, hy, l2) for l2 in grid}
    chosen = lsq.choose_l2(cache, hx, hy, grid)
    assert accs[chosen] == max(accs.values()) and chosen == max(v for v in grid if accs[v] == accs[chosen])
    assert min(accs.values()) < max(accs.values())  # the grid matters on this task


# ---------------------------------------------------------------- which images


def _catalog(labels: list[int], classes: int, val: int = 40) -> Catalog:
    n = len(labels)
    ref = np.stack([np.arange(n) // 10, np.arange(n) % 10], axis=1)
    vref = np.stack([np.arange(val) // 10, np.arange(val) % 10], axis=1)
    return Catalog("t", None, None, Rows(ref, np.array(labels)), Rows(vref, np.arange(val) % classes), classes)


def test_subsets_are_a_pure_function_of_seed_and_k_and_nest():
    labels = np.random.default_rng(3).integers(0, 4, 200)
    fc = FewshotConfig(shots=(1, 5, 10), seeds=3)
    a, b = plan(_catalog(list(labels), 4), fc), plan(_catalog(list(labels), 4), fc)
    for key in a.subsets:
        np.testing.assert_array_equal(a.subsets[key], b.subsets[key])
    for seed in range(3):
        one, five, ten = (set(a.subsets[(seed, k)]) for k in (1, 5, 10))
        assert one < five < ten and len(ten) == 40
        assert np.bincount(labels[sorted(ten)], minlength=4).tolist() == [10] * 4
    assert a.digest(0, 10) != a.digest(1, 10)
    orders = class_orders(labels, 4, seed=0)  # a class's order does not depend on the other classes
    other = class_orders(np.where(labels == 3, 2, labels), 4, seed=0)
    np.testing.assert_array_equal(orders[0], other[0])
    np.testing.assert_array_equal(val_subset(100, 30), val_subset(100, 30))
    assert len(set(val_subset(100, 30))) == 30 and len(val_subset(100, None)) == 100


def test_a_class_short_of_shots_is_reported_and_uses_what_it_has():
    labels = [0] * 12 + [1] * 3 + [2] * 12
    p = plan(_catalog(labels, 3), FewshotConfig(shots=(1, 5, 10), seeds=2))
    assert p.short == {5: {1: 3}, 10: {1: 3}}
    assert sorted(np.array(labels)[p.subsets[(0, 10)]].tolist()) == [0] * 10 + [1] * 3 + [2] * 10


def test_an_l2_grid_holds_out_images_beyond_the_largest_k():
    labels = [c for c in range(3) for _ in range(20)]
    p = plan(_catalog(labels, 3), FewshotConfig(shots=(1, 5), seeds=2, l2=(1.0, 100.0), holdout=4))
    for seed in range(2):
        held = set(p.held_out[seed])
        assert len(held) == 12 and not held & set(p.subsets[(seed, 5)])
    with pytest.raises(UserError, match=r"fewshot.datasets\[t\]: fewshot.l2 is a grid but no train image is left"):
        plan(_catalog(labels, 3), FewshotConfig(shots=(20,), l2=(1.0, 100.0)))


# ---------------------------------------------------------------- config


def test_config_reads_the_datasets_list_and_round_trips(tmp_path):
    cfg = load_config("configs/demo_cpu.yaml", ["fewshot.datasets=[{name: pets, train: /a, val: /b}]",
                                                "fewshot.shots=[10, 1]", "fewshot.l2=[1, 1e3]", "fewshot.every=5"])
    assert cfg.fewshot.datasets == (FewshotDataset("pets", "/a", "/b"),)
    assert cfg.fewshot.shots == (1, 10) and cfg.fewshot.l2_grid == (1.0, 1000.0) and cfg.fewshot.choose_l2
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert load_config(None, ["fewshot.shots=5"]).fewshot.shots == (5,)


@pytest.mark.parametrize("override,message", [
    ("fewshot.datasets=[{name: a, train: /x}]", r"fewshot.datasets\[0\] lacks val: give each of name, train, val"),
    ("fewshot.datasets=[{name: a, train: /x, val: /y, split: 1}]", r"unknown key fewshot.datasets\[0\].split"),
    ("fewshot.datasets={name: a}", "expected a list of mappings"),
    ("fewshot.datasets=[{name: a, train: /x, val: /y}, {name: a, train: /z, val: /y}]", "'a' is used twice"),
    ("fewshot.shots=[0, 5]", "give positive integers"),
    ("fewshot.l2=-1", "give a number > 0"),
    ("fewshot.seeds=0", "must be >= 1"),
])
def test_config_mistakes_name_the_key_and_the_fix(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


# ---------------------------------------------------------------- real runs

EVERY, STEPS = 25, 150


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    """Few-shot sets written by `vitscale shards synth` + `write`: ``new20`` = 20 classes of the
    synthetic task's palette (the pretraining run learns 10 of them; 10 are new arrangements),
    ``short`` = 6 classes of another palette with about 5 train images per class, ``multi`` =
    multi-label shards, ``unlabelled`` = a tar of ``new20`` with its labels stripped."""
    root = tmp_path_factory.mktemp("fewshot")
    out = {}
    for name, classes, per_class, seed in (("new20", 20, 30, 0), ("short", 6, 8, 1)):
        assert shards_main(["synth", str(root / f"{name}-img"), "--classes", str(classes), "--per-class",
                            str(per_class), "--img-size", "32", "--seed", str(seed), "--start", "2000000"]) == 0
        assert shards_main(["write", str(root / f"{name}-img"), str(root / name), "--samples-per-shard", "50",
                            "--val-fraction", "0.3", "--workers", "1", "--no-progress"]) == 0
        out[name] = root / name
    rows = [json.dumps({"path": str(p), "labels": [i % 6, (i + 1) % 6]})
            for i, p in enumerate(sorted((root / "short-img").rglob("*.jpg")))]
    (root / "m.jsonl").write_text("\n".join(rows) + "\n")
    assert shards_main(["write", str(root / "m.jsonl"), str(root / "multi"), "--workers", "1", "--no-progress"]) == 0
    out["multi"] = root / "multi"
    (root / "unlabelled").mkdir()
    with tarfile.open(out["new20"] / "train-000000.tar") as src, \
            tarfile.open(root / "unlabelled" / "part-000000.tar", "w") as dst:
        for member in src:
            if not member.name.endswith(".cls"):
                dst.addfile(member, src.extractfile(member))
    out["unlabelled"] = root / "unlabelled"
    return out


def _datasets(*entries: tuple[str, Path]) -> str:
    return "fewshot.datasets=" + yaml.safe_dump([{"name": n, "train": str(p), "val": str(p)} for n, p in entries],
                                                default_flow_style=True).strip()


@pytest.fixture(scope="module")
def trained(sets, tmp_path_factory) -> dict:
    """The CPU twin (2 processes, ZeRO-3, fp32 so that features are exact enough to compare
    across process counts) pretrained on the synthetic task with few-shot evaluation every 25
    steps on ``new20`` and ``short``. Under ZeRO-3 the parameters are partitioned: the
    evaluator's forward through the engine must see the whole model (compared with one process
    below)."""
    run = tmp_path_factory.mktemp("run") / "run"
    proc = vitscale("pretrain", "--config", "configs/demo_cpu.yaml", "--nproc-per-node", "2", f"run.dir={run}",
                    "data.workers=1", f"train.steps={STEPS}", "checkpoint.every=0", "train.eval_every=0",
                    "data.val=null", "train.bf16=false", "zero.stage=3",
                    _datasets(("new20", sets["new20"]), ("short", sets["short"])),
                    f"fewshot.every={EVERY}", "fewshot.shots=[1, 5, 10]", timeout=900, check=True)
    return {"run": run, "proc": proc}


def test_fewshot_accuracy_rises_above_chance_as_pretraining_proceeds(trained):
    run, out = trained["run"], trained["proc"].stdout
    records = read_metrics(run, "fewshot")
    assert [r["step"] for r in records] == list(range(EVERY, STEPS + 1, EVERY))
    first, last = records[0]["new20/10shot"], records[-1]["new20/10shot"]
    chance = 1 / 20
    assert last > 5 * chance and last > first + 0.15, [r["new20/10shot"] for r in records]
    for r in records:
        assert r["new20/classes"] == 20 and r["images"] > 0 and r["seconds"] >= r["feature_seconds"] > 0
        assert len(r["new20/10shot_seeds"]) == 3 and r["new20/10shot_std"] == pytest.approx(
            np.std(r["new20/10shot_seeds"]))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["fewshot/new20/10shot"] == last and summary["fewshot_step"] == STEPS
    assert "fewshot/short/5shot_std" in summary
    assert f"fewshot @ step {EVERY}: new20 1shot " in out and "fewshot        new20 1shot" in out
    assert "warning: fewshot short: 6 of 6 classes have fewer than 10 train images" in out  # reported, not fatal
    short = [r for r in read_metrics(run, "event") if r.get("event") == "fewshot_short_classes"]
    assert short and short[0]["dataset"] == "short"


def test_same_subsets_and_accuracy_in_one_process_as_in_two(trained, sets):
    """`vitscale evaluate --fewshot` (one process, plain model) on the run's final weights picks
    the same subsets and gets the same accuracy as the 2-process ZeRO-3 evaluator (features
    through the engine, parameters gathered) at the last step."""
    last = read_metrics(trained["run"], "fewshot")[-1]
    proc = vitscale_here("evaluate", "--checkpoint", str(trained["run"]), "--fewshot", str(sets["new20"]),
                         str(sets["new20"]), "--shots", "1,5,10", "--workers", "0", "--json", check=True)
    one = json.loads(proc.stdout.strip().splitlines()[-1])
    for k in (1, 5, 10):
        assert one[f"new20/{k}shot_subsets"] == last[f"new20/{k}shot_subsets"]
        assert one[f"new20/{k}shot_seeds"] == last[f"new20/{k}shot_seeds"]
    assert one["new20/val_images"] == last["new20/val_images"] == 180


def test_evaluate_fewshot_reads_timm_weights_and_uses_their_pre_logits(sets, tmp_path):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from pretrain.formats.load import load_model
    from pretrain.formats.timm import timm_kwargs
    from pretrain.model.vit import ViTSpec

    spec = ViTSpec(img_size=32, patch_size=8, width=32, depth=2, mlp_dim=64, heads=2, num_classes=7)
    torch.manual_seed(0)
    theirs = TimmViT(**timm_kwargs(spec)).eval()
    torch.save(theirs.state_dict(), tmp_path / "timm.pth")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = theirs.forward_head(theirs.forward_features(x), pre_logits=True)
        torch.testing.assert_close(load_model(tmp_path / "timm.pth")(x, pre_logits=True), expected)
    proc = vitscale_here("evaluate", "--checkpoint", str(tmp_path / "timm.pth"), "--fewshot", str(sets["short"]),
                         str(sets["short"]), "--shots", "1,3", "--seeds", "2", "--workers", "0", check=True)
    assert "few-shot linear accuracy of" in proc.stdout and "(32-d features, 32px" in proc.stdout
    assert "short  " in proc.stdout and "1-shot" in proc.stdout and "3-shot" in proc.stdout


# ---------------------------------------------------------------- mistakes


def test_a_wrong_fewshot_path_stops_before_any_rank_starts(tmp_path):
    proc = vitscale_here("pretrain", "--config", "configs/demo_cpu.yaml", *TINY, f"run.dir={tmp_path / 'run'}",
                         "train.steps=2", _datasets(("pets", tmp_path / "nope")))
    lines = [line for line in proc.stderr.strip().splitlines() if "error" in line]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "fewshot.datasets[pets].train=" in lines[0] and "does not exist" in lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("case,message", [
    ("multi", r"fewshot.datasets\[x\].train=.*multi-label; few-shot linear evaluation needs one label per image"),
    ("unlabelled", r"fewshot.datasets\[x\].train=.*has no usable label .*write them with `vitscale shards write`"),
    ("too_many_classes", r"fewshot.datasets\[x\] has 20 classes but the model's features are 4-d: .* separates at "
                         r"most 5 classes; use a model with wider features"),
])
def test_preflight_names_the_dataset_and_the_fix(sets, case, message):
    source = sets["new20" if case == "too_many_classes" else case]
    over = [*TINY, "model.representation_size=4"] if case == "too_many_classes" else list(TINY)
    cfg = load_config(None, [*over, _datasets(("x", source))])
    checks = check_fewshot(cfg)
    assert [c.status for c in checks] == ["FAIL"]
    with pytest.raises(UserError, match=message) as err:
        raise_on_failure(checks)
    assert "\n" not in str(err.value)


def test_preflight_passes_a_good_set_and_says_what_it_holds(sets):
    cfg = load_config(None, [*TINY, _datasets(("new20", sets["new20"]))])
    (check,) = check_fewshot(cfg)
    assert check.status == "PASS" and "20 classes, 64-d features" in check.detail
    assert "train 9 shards, 420 images; val 4 shards, 180 images" in check.detail


def test_a_damaged_image_is_left_out_and_reported(sets, tmp_path):
    """A planned image that does not decode is counted and left out; the evaluation completes."""
    from pretrain.model.vit import build_model
    from pretrain.train.fewshot import evaluate_model

    copy = tmp_path / "short"
    shutil.copytree(sets["short"], copy)
    shard = copy / "val-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    damaged = next(m.name for m, _ in members if m.name.endswith(".jpg"))
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            data = b"not a jpeg" if m.name == damaged else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    fc = FewshotConfig(datasets=(FewshotDataset("s", str(copy), str(copy)),), shots=(1, 2), seeds=1)
    torch.manual_seed(0)
    good = evaluate_model(build_model(load_config(None, TINY).model.spec()).eval(), fc, 16)
    fc_orig = FewshotConfig(datasets=(FewshotDataset("s", str(sets["short"]), str(sets["short"])),), shots=(1, 2),
                            seeds=1)
    torch.manual_seed(0)
    orig = evaluate_model(build_model(load_config(None, TINY).model.spec()).eval(), fc_orig, 16)
    assert good["s/val_images"] == orig["s/val_images"] - 1 and good["s/unreadable"] == 1
    assert orig["s/unreadable"] == 0


def test_bench_fewshot_prints_the_solver_and_twin_costs(capsys):
    from pretrain.bench.fewshot import main as bench_main

    assert bench_main(["--classes", "30", "--dim", "24", "--val", "90", "--repeat", "1", "--grid", "3", "--twin",
                       "--twin-classes", "4", "--twin-per-class", "10", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    solver, twin = result["solver"], result["twin"]
    assert (solver["classes"], solver["dim"], solver["shots"], solver["l2_grid"]) == (30, 24, 10, 3)
    assert solver["seconds"] > 0 and 0 < solver["accuracy"] <= 1
    assert twin["images"] > 0 and twin["seconds"] >= twin["feature_seconds"] > 0 and "twin/10shot" in twin
    assert {"cpu", "torch"} <= set(result["machine"])
