"""The CLI as a user runs it: shards -> pretrain (2 processes) -> fine-tune at a higher resolution ->
evaluate; run dir contents, metrics schema, load_model."""

import json
from pathlib import Path

import pytest

from tests.helpers import TINY, read_metrics, vitscale, vitscale_here

METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "images_per_s", "mfu", "data_wait_frac"}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("e2e")
    vitscale_here("shards", "synth", str(root / "img"), "--classes", "4", "--per-class", "60", "--img-size", "16",
                  check=True)
    vitscale_here("shards", "write", str(root / "img"), str(root / "sh"), "--samples-per-shard", "50",
                  "--val-fraction", "0.2", "--workers", "1", "--no-progress", check=True)
    run = root / "pre"
    proc = vitscale("pretrain", "--config", "configs/demo_cpu.yaml", "--nproc-per-node", "2", *TINY,
                    f"run.dir={run}", f"data.train={root / 'sh'}", f"data.val={root / 'sh'}", "data.workers=1",
                    "data.crop_scale_min=0.6", "train.steps=30", "checkpoint.every=10", "checkpoint.keep=2",
                    "optim.lr=0.005", check=True)
    return {"root": root, "run": run, "shards": root / "sh", "proc": proc}


def test_pretrain_writes_a_complete_run_dir(pretrained):
    run = pretrained["run"]
    assert (run / "config.yaml").is_file() and (run / "summary.json").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000030"
    tags = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert tags == ["step_00000020", "step_00000030"]  # keep=2
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 31))
    for r in rows:
        assert r.keys() >= METRIC_KEYS and r["mfu"] is None and 0 <= r["data_wait_frac"] <= 1
    assert sum(r["loss"] for r in rows[-5:]) < 0.7 * sum(r["loss"] for r in rows[:5])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["eval_top1"] > 0.5
    assert summary["best_eval"] == summary["eval_top1"] and summary["best_eval_step"] == 30
    assert "== pretrain done ==" in pretrained["proc"].stdout and "eval top-1" in pretrained["proc"].stdout


def test_load_model_from_run_dir_matches_the_run(pretrained):
    import pretrain
    from pretrain.data.synthetic import synthetic_images

    model = pretrain.load_model(pretrained["run"])
    assert not model.training
    x, y = synthetic_images(list(range(10**9, 10**9 + 200)), 4, 16, 0)
    acc = (model(x).argmax(-1) == y).float().mean().item()
    assert acc > 0.5


def test_evaluate_json_reports_top1(pretrained):
    proc = vitscale_here("evaluate", "--checkpoint", str(pretrained["run"]), "--data", str(pretrained["shards"]),
                         "--workers", "0", "--json", check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = json.loads((pretrained["run"] / "summary.json").read_text())
    assert result["top1"] == pytest.approx(summary["eval_top1"], abs=0.02)


def test_finetune_at_higher_resolution_on_new_labels_then_evaluate(pretrained, tmp_path):
    vitscale_here("shards", "synth", str(tmp_path / "img"), "--classes", "3", "--per-class", "60", "--img-size", "24",
                  "--seed", "1", check=True)
    vitscale_here("shards", "write", str(tmp_path / "img"), str(tmp_path / "sh"), "--samples-per-shard", "40",
                  "--val-fraction", "0.2", "--workers", "1", "--no-progress", check=True)
    run = tmp_path / "ft"
    proc = vitscale("finetune", "--config", "configs/demo_finetune_cpu.yaml", "--init", str(pretrained["run"]),
                    "--nproc-per-node", "2", f"run.dir={run}", "model.img_size=24", "model.num_classes=3",
                    "zero.stage=3", "train.micro_batch=8", "train.steps=30", "train.log_every=5",
                    f"data.train={tmp_path / 'sh'}", f"data.val={tmp_path / 'sh'}", "data.workers=1",
                    "data.crop_scale_min=0.6", check=True)
    assert "dropped (4):" in proc.stdout and "pre_logits.weight" in proc.stdout
    assert "pos_embed [1, 17, 64] -> [1, 37, 64]" in proc.stdout
    event = [r for r in read_metrics(run, "event") if r.get("event") == "finetune_init"][0]
    assert sorted(event["new"]) == ["head.bias", "head.weight"]
    assert sorted(event["dropped"]) == ["head.bias", "head.weight", "pre_logits.bias", "pre_logits.weight"]
    out = vitscale_here("evaluate", "--checkpoint", str(run), "--data", str(tmp_path / "sh"), "--workers", "0",
                        "--json", check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["top1"] > 0.6  # chance is 1/3


def test_finetune_with_mismatched_backbone_fails_naming_the_key(pretrained, tmp_path):
    proc = vitscale_here("finetune", "--config", "configs/demo_finetune_cpu.yaml", "--init", str(pretrained["run"]),
                         "--nproc-per-node", "1", f"run.dir={tmp_path / 'ft'}", "model.width=32", "model.heads=2")
    assert proc.returncode == 2 and "cls_token" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ft").exists()


def test_finetune_needs_init(tmp_path: Path):
    proc = vitscale_here("finetune", "--config", "configs/demo_finetune_cpu.yaml", f"run.dir={tmp_path}")
    assert proc.returncode == 2 and "--init SOURCE" in proc.stderr

