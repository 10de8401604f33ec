"""Preflight catches each misconfiguration with its fix, passes a sane one, and its memory model
matches known numbers and the tensors autograd really keeps."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from data_tools.cli import main as shards_main
from launch import preflight
from launch.memory import GIB, activation_bytes, block_activation_bytes, estimate_memory, model_state_bytes
from pretrain.checkpoint.layout import checkpoint_bytes
from pretrain.core.errors import UserError
from pretrain.data.loader import ShardTrain
from pretrain.model.costs import param_count
from pretrain.model.vit import Block, build_model, spec_for
from pretrain.train import checks as cheap_checks
from pretrain.train.config_file import load_config

TINY = ["model.name=vit_test4", "model.img_size=32", "train.micro_batch=4"]


def _run(capsys, *argv: str) -> tuple[int, dict]:
    rc = preflight.main(["--config", *argv, "--json"])
    report = json.loads(capsys.readouterr().out)
    return rc, {c["name"]: c for c in report["checks"]}


@pytest.fixture
def recipe(tmp_path: Path) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"run": {"dir": str(tmp_path / "run")}}))
    return str(path)


def test_sane_tiny_config_passes(recipe, capsys):
    start = time.perf_counter()
    rc = preflight.main(["--config", recipe, *TINY, "--nodes", "1", "--gpus-per-node", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "FAIL" not in out and "all checks passed" in out
    assert "memory per GPU (GiB):" in out
    cheap = cheap_checks.run_cheap_checks(load_config(recipe, TINY), world_size=2, runs_here=False)
    assert [c.name for c in cheap] == ["config", "batch", "data.train", "data.val", "run dir", "disk", "sdpa"]
    assert time.perf_counter() - start < 30  # generous; the point is that nothing heavy runs


def test_bad_config_is_a_fail_line(recipe, capsys):
    rc, checks = _run(capsys, recipe, "model.nme=vit_b16")
    assert rc == 1
    assert checks["config"]["status"] == "FAIL" and "did you mean 'name'" in checks["config"]["detail"]


def test_batch_arithmetic_that_does_not_divide(recipe, capsys):
    rc, checks = _run(capsys, recipe, *TINY, "train.global_batch=64", "--nodes", "1", "--gpus-per-node", "3")
    assert rc == 1
    batch = checks["batch"]
    assert batch["status"] == "FAIL" and "does not split over 3 ranks" in batch["detail"]
    assert "nearest valid settings" in batch["detail"] and "train.global_batch=60" in batch["detail"]
    rc, checks = _run(capsys, recipe, *TINY, "train.global_batch=64", "--nodes", "2", "--gpus-per-node", "4")
    assert rc == 0 and checks["batch"]["status"] == "PASS"
    assert "accum 2 x 8 ranks" in checks["batch"]["detail"] and "derived" in checks["batch"]["detail"]
    rc, checks = _run(capsys, recipe, *TINY, "train.global_batch=64", "train.grad_accum=1", "--nodes", "2",
                      "--gpus-per-node", "4")
    assert checks["batch"]["status"] == "FAIL" and "set train.grad_accum=2 or drop it" in checks["batch"]["detail"]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """7 train shards of up to 7 samples and a val split, written by `vitscale shards write`."""
    root = tmp_path_factory.mktemp("preflight-shards")
    assert shards_main(["synth", str(root / "img"), "--classes", "4", "--per-class", "15", "--img-size", "8"]) == 0
    assert shards_main(["write", str(root / "img"), str(root / "sh"), "--samples-per-shard", "7", "--val-fraction",
                        "0.2", "--workers", "1", "--no-progress"]) == 0
    return root / "sh"


def test_streams_the_ranks_do_not_divide_fail_with_the_fix(written, recipe, capsys):
    rc, checks = _run(capsys, recipe, *TINY, f"data.train={written}", "data.streams=3", "train.global_batch=48",
                      "--nodes", "1", "--gpus-per-node", "2")
    assert rc == 1
    data = checks["data.train"]
    assert data["status"] == "FAIL" and "data.streams=3 is not a multiple of the 2 ranks" in data["detail"]
    assert "set data.streams=" in data["detail"]
    rc, checks = _run(capsys, recipe, *TINY, f"data.train={written}", "data.workers=8", "--nodes", "1",
                      "--gpus-per-node", "2")  # more workers than a rank's streams: the extra ones are not started
    assert checks["data.train"]["status"] == "PASS" and "streams of" in checks["data.train"]["detail"]


def _sources(written: Path) -> dict[str, str]:
    tars = sorted(str(t) for t in written.glob("train-*.tar"))
    last = len(tars) - 1
    return {"folder": str(written), "brace": f"{written}/train-{{000000..{last:06d}}}.tar",
            "glob": f"{written}/train-*.tar", "comma": ",".join(tars)}


@pytest.mark.parametrize("kind", ["folder", "brace", "glob", "comma"])
def test_every_source_form_resolves_to_the_same_shards_in_preflight_and_loader(written, recipe, capsys, kind):
    """A folder, a brace pattern, a glob and a comma list of the writer's output name the same
    shards, with the same counts, in preflight (the parent) and in the loader (the ranks)."""
    tars = sorted(str(t) for t in written.glob("train-*.tar"))
    source = _sources(written)[kind]
    rc, checks = _run(capsys, recipe, *TINY, f"data.train={source}", "data.workers=1", "data.val=null",
                      "--gpus-per-node", "2")
    assert rc == 0 and checks["data.train"]["data"]["shards"] == len(tars), checks["data.train"]
    cfg = load_config(recipe, [*TINY, f"data.train={source}", "data.workers=1", "model.img_size=8"])
    loader = ShardTrain(cfg.loader(), 0, 2)
    assert list(loader.shards.urls) == tars
    from pretrain.data.shards import load_index

    assert sum(loader.shards.counts) == load_index(written)["splits"]["train"]["samples"]


def test_missing_shards_and_wrong_paths_name_the_key(written, recipe, capsys):
    too_many = f"data.train={written}/train-{{000000..000009}}.tar"
    _, checks = _run(capsys, recipe, *TINY, too_many, "--gpus-per-node", "1")
    assert checks["data.train"]["status"] == "FAIL"
    assert "data.train: 3 of 10 shards do not exist" in checks["data.train"]["detail"]
    _, checks = _run(capsys, recipe, *TINY, f"data.val={written}/nope", "--gpus-per-node", "1")
    assert checks["data.val"]["status"] == "FAIL" and checks["data.val"]["detail"].startswith("data.val=")


RECIPES = ["pretrain_vit_b16_in21k", "pretrain_vit_l16_in21k", "pretrain_vit_h14_in21k", "pretrain_vit_h16_jft",
           "pretrain_vit_b16_in21k_augreg", "pretrain_vit_l16_in21k_augreg"]


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> dict[str, Path]:
    """Enough single-sample shards for 64 ranks x 12 workers, single- and multi-label, as the
    writer makes them (the recipes' data paths do not exist here)."""
    root = tmp_path_factory.mktemp("many")
    assert shards_main(["synth", str(root / "img"), "--classes", "4", "--per-class", "192", "--img-size", "4"]) == 0
    out = {}
    assert shards_main(["write", str(root / "img"), str(root / "single"), "--samples-per-shard", "1", "--workers", "2",
                        "--no-progress"]) == 0
    out["single"] = root / "single"
    rows = [json.dumps({"path": str(p), "labels": [i % 4, (i + 1) % 4]})
            for i, p in enumerate(sorted((root / "img").rglob("*.jpg")))]
    (root / "m.jsonl").write_text("\n".join(rows) + "\n")
    assert shards_main(["write", str(root / "m.jsonl"), str(root / "multi"), "--samples-per-shard", "1", "--workers",
                        "2", "--no-progress"]) == 0
    out["multi"] = root / "multi"
    assert shards_main(["synth", str(root / "fs"), "--classes", "4", "--per-class", "8", "--img-size", "4"]) == 0
    assert shards_main(["write", str(root / "fs"), str(root / "fewshot"), "--samples-per-shard", "4", "--val-fraction",
                        "0.5", "--workers", "1", "--no-progress"]) == 0
    out["fewshot"] = root / "fewshot"  # train and val splits: a few-shot set must not score on its own shots
    return out


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("nodes", [1, 4, 8])
def test_every_pretraining_recipe_passes_on_1_4_and_8_nodes_of_8_gpus(name, nodes, many_shards, tmp_path, capsys):
    """The recipes' global batch holds on any of these clusters: the accumulation is derived
    (and printed), preflight passes and `launch slurm --dry-run` writes the script."""
    from launch.cli import main as launch_main

    data = many_shards["multi" if "jft" in name else "single"]
    fewshot = [{"name": d["name"], "train": str(many_shards["fewshot"]), "val": str(many_shards["fewshot"])}
               for d in load_config(f"configs/{name}.yaml").to_dict()["fewshot"]["datasets"]]
    over = [f"data.train={data}", f"data.val={data}", f"run.dir={tmp_path / 'run'}",
            "fewshot.datasets=" + json.dumps(fewshot)]
    recipe = f"configs/{name}.yaml"
    rc, checks = _run(capsys, recipe, *over, "--nodes", str(nodes), "--gpus-per-node", "8", "--gpu-mem-gb", "80")
    failed = {k: c for k, c in checks.items() if c["status"] == "FAIL"}
    assert rc == 0 and not failed, failed
    for d in fewshot:  # the recipes that track few-shot transfer (the ViT paper's)
        check = checks[f"fewshot.{d['name']}"]
        assert check["status"] == "PASS" and "4 classes" in check["detail"]
    cfg = load_config(recipe, over)
    assert cfg.train.grad_accum is None and f"x {nodes * 8} ranks" in checks["batch"]["detail"]
    assert checks["batch"]["detail"].startswith(f"global batch {cfg.train.global_batch} = ")
    assert launch_main(["slurm", "--config", recipe, "--nodes", str(nodes), "--gpus-per-node", "8", "--dry-run",
                        *over]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("#!/bin/bash") and f"accum {cfg.train.global_batch // (cfg.train.micro_batch * nodes * 8)}" \
        in err


def test_a_global_batch_that_cannot_split_names_the_nearest_settings(tmp_path, capsys):
    """512 images at micro batch 16 on 64 GPUs is half a micro batch per GPU."""
    from launch.cli import main as launch_main

    with pytest.raises(UserError) as err:
        launch_main(["slurm", "--config", "configs/finetune_vit_h14_384.yaml", "--nodes", "8", "--gpus-per-node", "8",
                     "--dry-run", f"run.dir={tmp_path}", "--no-checks"])
    message = str(err.value)
    assert "\n" not in message and "does not split over 64 ranks" in message
    assert "train.micro_batch=8 (grad_accum 1)" in message and "train.global_batch=1024 (grad_accum 1)" in message


def test_run_dir_under_a_regular_file_is_not_writable(tmp_path, recipe, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    rc, checks = _run(capsys, recipe, *TINY, f"run.dir={blocker}/sub")
    assert rc == 1
    run_dir = checks["run dir"]
    assert run_dir["status"] == "FAIL" and "is not a directory" in run_dir["detail"]
    assert "writable directory" in run_dir["fix"]
    assert not (blocker.parent / "sub").exists()
    cheap = cheap_checks.run_cheap_checks(load_config(recipe, [*TINY, f"run.dir={blocker}/sub"]), world_size=1,
                                          runs_here=True)
    with pytest.raises(UserError, match=r"run dir: .* -> fix: set run.dir to a writable directory"):
        cheap_checks.raise_on_failure(cheap)


def test_disk_too_small_for_the_checkpoints_to_keep(tmp_path, recipe, capsys):
    psi = param_count(spec_for("vit_h14"))
    free = shutil.disk_usage(tmp_path).free
    keep = free // checkpoint_bytes(psi, "adamw") + 1  # keep + 1 checkpoints cannot fit
    rc, checks = _run(capsys, recipe, "model.name=vit_h14", "model.representation_size=null",
                      f"checkpoint.keep={keep}")
    assert rc == 1
    disk = checks["disk"]
    assert disk["status"] == "FAIL" and "(14 B/param)" in disk["detail"]
    assert "lower checkpoint.keep" in disk["fix"]
    _, checks = _run(capsys, recipe, *TINY, "checkpoint.keep=3")
    assert checks["disk"]["status"] == "PASS"


def test_vit_h14_zero0_batch256_does_not_fit_16gb(recipe, capsys):
    rc, checks = _run(capsys, recipe, "model.name=vit_h14", "zero.stage=0", "train.micro_batch=256",
                      "--gpus-per-node", "8", "--gpu-mem-gb", "16")
    assert rc == 1
    mem = checks["memory"]
    assert mem["status"] == "FAIL" and "does not fit" in mem["detail"]
    for fix in ("zero.stage=3", "model.act_ckpt=true", "train.micro_batch="):
        assert fix in mem["fix"]
    assert mem["data"]["breakdown_gib"]["activations"] > 16
    micro = int(re.search(r"train.micro_batch=(\d+)", mem["fix"]).group(1))
    _, checks = _run(capsys, recipe, "model.name=vit_h14", "zero.stage=0", f"train.micro_batch={micro}",
                     "--gpus-per-node", "8", "--gpu-mem-gb", "16")
    assert checks["memory"]["status"] == "PASS", "the suggested micro batch must fit"


def test_single_rank_gets_no_zero_stage_advice(recipe, capsys):
    _, checks = _run(capsys, recipe, "model.name=vit_h14", "zero.stage=0", "train.micro_batch=256",
                     "--gpus-per-node", "1", "--gpu-mem-gb", "16")
    assert "zero.stage" not in checks["memory"]["fix"]


def test_vit_h14_zero3_act_ckpt_fits_8x80gb(recipe, capsys):
    rc, checks = _run(capsys, recipe, "model.name=vit_h14", "zero.stage=3", "model.act_ckpt=true",
                      "train.micro_batch=64", "--nodes", "1", "--gpus-per-node", "8", "--gpu-mem-gb", "80")
    assert checks["memory"]["status"] == "PASS", checks["memory"]
    assert checks["memory"]["data"]["breakdown_gib"]["total"] < 0.9 * 80


def test_model_state_accounting_matches_zero_paper():
    spec = spec_for("vit_h14")
    psi = param_count(spec)
    assert 631e6 < psi < 633e6  # ViT-H/14, 1000 classes, no pre-logits
    stage0 = sum(model_state_bytes(psi, 0, 8).values())
    assert stage0 == pytest.approx(16 * psi, rel=1e-6) and 10.0e9 < stage0 < 10.2e9
    n = 64
    expected = {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}
    for stage, want in expected.items():
        assert sum(model_state_bytes(psi, stage, n).values()) == pytest.approx(want, rel=1e-6)
    assert sum(model_state_bytes(psi, 0, 1, "sgd").values()) == pytest.approx(12 * psi, rel=1e-6)
    assert checkpoint_bytes(psi, "adamw") == 14 * psi and checkpoint_bytes(psi, "sgd") == 10 * psi


@pytest.mark.parametrize("name,kw", [("vit_b16", {"representation_size": 768, "num_classes": 21843}),
                                     ("vit_test4", {"pool": "gap", "num_classes": 0}), ("vit_s16", {})])
def test_param_count_matches_the_model(name, kw):
    spec = spec_for(name, **kw)
    assert param_count(spec) == sum(p.numel() for p in build_model(spec, "meta").parameters())


def test_block_activation_formula_matches_what_autograd_saves():
    """bf16 block with SDPA flash (CPU kernel): bytes of the non-parameter tensors saved for
    backward equal the formula, up to the LayerNorm statistics (fp32 on CUDA, bf16 on CPU)."""
    spec = spec_for("vit_test4", width=64, mlp_dim=256, heads=4)
    block = Block(spec).to(torch.bfloat16).train()
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    b, t = 3, 17
    x = torch.randn(b, t, spec.width, dtype=torch.bfloat16, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        block(x)
    formula = block_activation_bytes(b, t, spec.width, spec.mlp_dim, spec.heads)
    ln_stats = 16 * b * t
    assert formula - ln_stats <= sum(saved.values()) <= formula


def test_act_ckpt_keeps_block_inputs_only():
    spec = spec_for("vit_h14")
    full = activation_bytes(spec, 32, act_ckpt=False)["blocks"]
    ckpt = activation_bytes(spec, 32, act_ckpt=True)["blocks"]
    one = block_activation_bytes(32, spec.seq_len, spec.width, spec.mlp_dim, spec.heads)
    assert full == spec.depth * one
    assert ckpt == spec.depth * 2 * 32 * spec.seq_len * spec.width + one
    half = activation_bytes(spec, 32, act_ckpt=0.5)["blocks"]  # 16 blocks recomputed, 16 kept
    assert half == 16 * 2 * 32 * spec.seq_len * spec.width + 16 * one + one and ckpt < half < full
    cfg = load_config(None, ["model.name=vit_h14", "zero.stage=0", "train.micro_batch=256"])
    est = estimate_memory(cfg, world_size=1)
    assert est.total > 16 * GIB


def test_require_flash_without_a_gpu(recipe, capsys):
    """Here (no GPU) preflight checks the cluster's constraints, so a flash-eligible config
    passes; a config flash cannot run anywhere fails; training on this machine fails."""
    rc, checks = _run(capsys, recipe, *TINY, "model.require_flash=true")
    assert rc == 0 and checks["sdpa"]["status"] == "PASS" and "no GPU here" in checks["sdpa"]["detail"]
    rc, checks = _run(capsys, recipe, *TINY, "model.require_flash=true", "train.bf16=false")
    assert rc == 1 and checks["sdpa"]["status"] == "FAIL" and "require_flash=false" in checks["sdpa"]["fix"]
    here = cheap_checks.check_sdpa(load_config(recipe, [*TINY, "model.require_flash=true"]), runs_here=True)
    assert here.status == "FAIL" and "this machine has no GPU" in here.detail


def test_sdpa_in_a_launcher_process_checks_constraints_without_the_gpu(recipe):
    cfg = load_config(recipe, ["model.name=vit_h14"])
    check = cheap_checks.check_sdpa(cfg, runs_here=True, probe_gpu=False, device="cuda")
    assert check.status == "PASS" and "not probed" in check.detail and "flash-eligible" in check.detail
    bad = load_config(recipe, [*TINY, "train.bf16=false", "model.require_flash=true"])
    check = cheap_checks.check_sdpa(bad, runs_here=True, probe_gpu=False, device="cuda")
    assert check.status == "FAIL" and "dtype float32" in check.fix


def test_allreduce_skipped_outside_a_job(recipe, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    _, checks = _run(capsys, recipe, *TINY)
    assert checks["all-reduce"]["status"] == "SKIP"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_allreduce_smoke_inside_a_two_rank_job(recipe):
    """Two `vitscale preflight` processes with the environment torchrun gives its ranks (gloo on
    CPU): both join, all-reduce, and rank 0 reports PASS with the world size from the environment."""
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "pretrain", "preflight", "--config", recipe, *TINY, "--json"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    report = json.loads(outs[0][0])
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["all-reduce"]["status"] == "PASS" and "2 ranks agree" in checks["all-reduce"]["detail"]
    assert (report["nodes"], report["gpus_per_node"]) == (1, 2)
    assert outs[1][0] == "", "only rank 0 prints the report"


def test_a_mixture_is_checked_source_by_source(written, recipe, capsys, tmp_path):
    mix = f"[{{source: {written}, weight: 3}}, {{source: '{written}/train-{{000000..000001}}.tar', weight: 1}}]"
    rc, checks = _run(capsys, recipe, *TINY, f"data.train={mix}", "--nodes", "1", "--gpus-per-node", "2")
    detail = checks["data.train"]["detail"]
    assert checks["data.train"]["status"] == "PASS" and "% of every batch" in detail and "streams of" in detail
    bad = f"[{{source: {written}}}, {{source: '{tmp_path}/none-{{0..3}}.tar'}}]"
    rc, checks = _run(capsys, recipe, *TINY, f"data.train={bad}", "--nodes", "1", "--gpus-per-node", "2")
    assert rc == 1 and checks["data.train"]["status"] == "FAIL"
    assert f"data.train source {tmp_path}/none-{{0..3}}.tar" in checks["data.train"]["detail"]
