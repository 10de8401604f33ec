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

from launch import preflight
from launch.memory import (
    GIB,
    activation_bytes,
    block_activation_bytes,
    checkpoint_bytes,
    estimate_memory,
    model_state_bytes,
    param_count,
)
from pretrain.core.errors import UserError
from pretrain.model.vit import Block, build_model, spec_for
from pretrain.train.config import load_config

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
    cheap = preflight.run_cheap_checks(load_config(recipe, TINY), world_size=2)
    assert [c.name for c in cheap] == ["config", "batch", "shards", "run dir", "disk", "sdpa"]
    assert time.perf_counter() - start < 30  # generous; the point is that nothing heavy runs


def test_bad_config_is_a_fail_line(recipe, capsys):
    rc, checks = _run(capsys, recipe, "model.nme=vit_b16")
    assert rc == 1
    assert checks["config"]["status"] == "FAIL" and "did you mean 'name'" in checks["config"]["detail"]


def test_batch_arithmetic_that_does_not_divide(recipe, capsys):
    rc, checks = _run(capsys, recipe, *TINY, "train.global_batch=64", "--nodes", "1", "--gpus-per-node", "3")
    assert rc == 1
    batch = checks["batch"]
    assert batch["status"] == "FAIL" and "world size 3" in batch["detail"]
    assert "train.micro_batch" in batch["fix"]
    rc, checks = _run(capsys, recipe, *TINY, "train.global_batch=64", "--nodes", "2", "--gpus-per-node", "4")
    assert checks["batch"]["status"] == "FAIL" and "train.grad_accum=2" in checks["batch"]["fix"]
    rc, checks = _run(capsys, recipe, *TINY, "train.global_batch=64", "train.grad_accum=2", "--nodes", "2",
                      "--gpus-per-node", "4")
    assert rc == 0 and checks["batch"]["status"] == "PASS"


def _index_dir(root: Path, shards: int) -> Path:
    root.mkdir()
    names = [f"train-{i:06d}.tar" for i in range(shards)]
    for name in names:
        (root / name).write_bytes(b"")
    index = {"version": 1, "multi_label": False, "num_classes": 10,
             "splits": {"train": {"shards": names, "samples": 100 * shards}}}
    (root / "index.json").write_text(json.dumps(index))
    return root


def test_too_few_shards_for_ranks_times_workers(tmp_path, recipe, capsys):
    data = _index_dir(tmp_path / "shards", 6)
    rc, checks = _run(capsys, recipe, *TINY, f"data.train={data}", "data.workers=4", "--nodes", "1",
                      "--gpus-per-node", "2")
    assert rc == 1
    shards = checks["shards"]
    assert shards["status"] == "FAIL" and "6 shards < 2 ranks x 4 workers = 8" in shards["detail"]
    assert "data.workers to 3" in shards["fix"]
    assert "vitscale shards write --samples-per-shard" in shards["fix"]
    rc, checks = _run(capsys, recipe, *TINY, f"data.train={data}", "data.workers=3", "--nodes", "1",
                      "--gpus-per-node", "2")
    assert checks["shards"]["status"] == "PASS"


def test_brace_pattern_and_missing_shards(tmp_path, recipe, capsys):
    data = _index_dir(tmp_path / "shards", 8)
    pattern = f"{data}/train-{{000000..000007}}.tar"
    _, checks = _run(capsys, recipe, *TINY, f"data.train={pattern}", "data.workers=4", "--gpus-per-node", "2")
    assert checks["shards"]["status"] == "PASS" and checks["shards"]["data"]["shards"] == 8
    too_many = f"data.train={data}/train-{{000000..000009}}.tar"
    _, checks = _run(capsys, recipe, *TINY, too_many, "--gpus-per-node", "1")
    assert checks["shards"]["status"] == "FAIL"
    assert "2 of 10 shards do not exist" in checks["shards"]["detail"]
    _, checks = _run(capsys, recipe, *TINY, f"data.train={data}/train-*.tar", "data.workers=2",
                     "--gpus-per-node", "8")
    assert checks["shards"]["status"] == "FAIL"
    assert "8 shards < 8 ranks x 2 workers" in checks["shards"]["detail"]


def test_run_dir_under_a_regular_file_is_not_writable(tmp_path, recipe, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    rc, checks = _run(capsys, recipe, *TINY, f"run.dir={blocker}/sub")
    assert rc == 1
    run_dir = checks["run dir"]
    assert run_dir["status"] == "FAIL" and "is not a directory" in run_dir["detail"]
    assert "writable directory" in run_dir["fix"]
    assert not (blocker.parent / "sub").exists()
    cheap = preflight.run_cheap_checks(load_config(recipe, [*TINY, f"run.dir={blocker}/sub"]), world_size=1)
    with pytest.raises(UserError, match=r"run dir: .* -> fix: set run.dir to a writable directory"):
        preflight.raise_on_failure(cheap)


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
    cfg = load_config(None, ["model.name=vit_h14", "zero.stage=0", "train.micro_batch=256"])
    est = estimate_memory(cfg, world_size=1)
    assert est.total > 16 * GIB


def test_require_flash_on_cpu_fails_the_sdpa_check(recipe, capsys):
    rc, checks = _run(capsys, recipe, *TINY, "model.require_flash=true")
    assert rc == 1
    assert checks["sdpa"]["status"] == "FAIL" and "require_flash=false" in checks["sdpa"]["fix"]


def test_sdpa_in_a_launcher_process_checks_constraints_without_the_gpu(recipe):
    cfg = load_config(recipe, ["model.name=vit_h14"])
    check = preflight.check_sdpa(cfg, device="cuda", probe=False)
    assert check.status == "PASS" and "not probed" in check.detail and "flash-eligible" in check.detail
    bad = load_config(recipe, [*TINY, "train.bf16=false", "model.require_flash=true"])
    check = preflight.check_sdpa(bad, device="cuda", probe=False)
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
