"""DeepSpeed checkpoints: a real 2-process bf16 ZeRO save (CPU, gloo) consolidated into our
safetensors in one process reproduces the live model's fp32 master logits; its universal
conversion resumes in a 1-process DeepSpeed run with the same master weights; inspect loads
nothing.

ZeRO-3 runs by default (about 50 s on 2 cores); ``VITSCALE_ZERO_STAGES="1 2 3"`` runs the same
tests for other stages too."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from pretrain import cli
from pretrain.commands import convert
from pretrain.core.errors import UserError
from pretrain.formats import (
    consolidate_deepspeed,
    load_safetensors,
    read_weights,
    resolve_deepspeed_checkpoint,
)
from pretrain.formats.inspect import inspect
from pretrain.model.vit import ViTSpec, build_model
from tests.helpers import ROOT, torchrun

SCRIPT = ROOT / "tests" / "scripts" / "ds_save_tiny.py"
TAG = "step_00000002"
STAGES = [int(s) for s in os.environ.get("VITSCALE_ZERO_STAGES", "3").split()]
pytestmark = pytest.mark.slow


def _torchrun(nproc: int, *args: str) -> None:
    torchrun(SCRIPT, *args, nproc=nproc)


@pytest.fixture(scope="module", params=STAGES, ids=lambda s: f"zero{s}")
def zero_run(request, tmp_path_factory) -> Path:
    """RUN_DIR of two bf16 AdamW steps on 2 processes, plus reference.pt (fp32 master weights)."""
    run = tmp_path_factory.mktemp(f"zero{request.param}") / "run"
    _torchrun(2, str(run), "--stage", str(request.param))
    return run


@pytest.fixture(scope="module")
def universal(zero_run, tmp_path_factory) -> Path:
    """A copy of the run's checkpoints dir with a universal checkpoint converted (and verified) into it."""
    ck = tmp_path_factory.mktemp("universal") / "checkpoints"
    shutil.copytree(zero_run / "checkpoints", ck)
    dst = ck / f"universal_{TAG}"
    assert convert.main([str(ck), str(dst), "--to", "deepspeed-universal", "--verify"]) == 0
    return dst


def test_zero_to_safetensors_reproduces_master_logits(zero_run, tmp_path):
    ref = torch.load(zero_run / "reference.pt")
    dst = tmp_path / "vit.safetensors"
    assert convert.main([str(zero_run), str(dst), "--to", "safetensors", "--verify"]) == 0
    sd, spec, meta = load_safetensors(dst)
    assert meta["step"] == 2 and meta["source_format"] == "deepspeed"
    assert inspect(dst)["config"] == {"model": {"name": "vit_test4"}}
    assert sorted(sd) == sorted(ref["state_dict"])
    for k, v in ref["state_dict"].items():
        assert torch.equal(sd[k], v), k
    model = build_model(spec)
    model.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ref["input"]), ref["logits"], atol=1e-6, rtol=1e-6)


def test_any_level_of_the_run_dir_resolves(zero_run):
    ck = zero_run / "checkpoints"
    for path in (zero_run, ck, ck / TAG):
        assert resolve_deepspeed_checkpoint(path) == (ck, TAG)
    sd, spec, meta = read_weights(ck / TAG)
    assert (meta["format"], meta["world_size"], meta["step"]) == ("deepspeed", 2, 2)
    assert meta["zero_stage"] in STAGES
    assert spec.representation_size == 64


def test_incomplete_checkpoint_names_the_problem(zero_run, tmp_path):
    broken = tmp_path / "checkpoints" / TAG
    shutil.copytree(zero_run / "checkpoints" / TAG, broken)
    next(broken.glob("*rank_1_*optim_states.pt")).unlink()
    with pytest.raises(UserError, match="optim_states"):
        consolidate_deepspeed(broken)
    assert "incomplete" in inspect(broken)["problem"]
    (tmp_path / "checkpoints" / "latest").write_text("step_00000009")
    with pytest.raises(UserError, match="step_00000009"):
        resolve_deepspeed_checkpoint(tmp_path)


def test_universal_conversion_writes_what_deepspeed_reads(zero_run, universal):
    ck = universal.parent
    assert (ck / "latest_universal").read_text() == universal.name
    assert (ck / "latest").read_text() == TAG
    sd, spec, _ = consolidate_deepspeed(ck)
    for name in sd:
        files = {f.name for f in (universal / "zero" / name).iterdir()}
        assert {"fp32.pt", "exp_avg.pt", "exp_avg_sq.pt"} <= files, name
    assert (universal / "zero" / "optimizer_state.pt").is_file()
    meta = json.loads((universal / "vitscale.json").read_text())
    assert meta["format"] == "vitscale-deepspeed-universal" and meta["universal_from"] == TAG
    back, back_spec, back_meta = read_weights(universal)
    assert back_meta["format"] == "deepspeed-universal" and back_spec == spec
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    with pytest.raises(UserError, match="already exists"):
        convert.main([str(ck), str(universal), "--to", "deepspeed-universal"])


def test_universal_resumes_on_another_world_size(zero_run, universal, tmp_path):
    stage = json.loads((universal / "vitscale.json").read_text())["zero_stage"]
    _torchrun(1, str(tmp_path), "--stage", str(stage), "--load-universal", str(universal))
    restored = torch.load(tmp_path / "restored.pt")
    master = torch.load(zero_run / "reference.pt")["state_dict"]
    assert sorted(restored) == sorted(master)
    for k, v in master.items():
        assert torch.equal(restored[k], v), k


def test_inspect_reads_metadata_only(zero_run, monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("inspect must not load checkpoint tensors")

    monkeypatch.setattr(torch, "load", no_load)
    assert cli.main(["inspect", str(zero_run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["world_size"], info["step"], info["tag"]) == ("deepspeed", 2, 2, TAG)
    assert info["zero_stage"] in STAGES
    assert info["parameters"] == sum(p.numel() for p in build_model(ViTSpec(**info["spec"])).parameters())
    assert sum(n.endswith("optim_states.pt") for n in info["files"]) == 2
