"""``model.fp8``: the blocks' Linear layers train through torchao's float8 training. On this CPU
torchao emulates the FP8 GEMMs (real e4m3 / e5m2 casts with dynamic scales, the products in
fp32), so everything but the speed is checked here, on the real engines: ZeRO-3 over 2 gloo
processes learns, a run resumed from its checkpoint is the uninterrupted one bit for bit, the checkpoint exports to
every weights format as plain weights (timm's own model loads the timm file), the FLOP count and
MFU's mixed peak, and the refusals where FP8 cannot run.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.commands import convert
from pretrain.core.errors import UserError
from pretrain.formats.convert import verify
from pretrain.formats.registry import read_weights, weights_format, writable_names
from pretrain.model.costs import FP8_PEAK_RATIO, mixed_peak, model_costs
from pretrain.model.fp8 import fp8_blocker, fp8_layers
from pretrain.model.vit import build_model
from pretrain.train import checks
from pretrain.train.config_file import load_config
from pretrain.train.metrics import device_peak_flops
from tests.helpers import TINY, cli_env, read_metrics, vitscale
from tests.runs import bitwise_diff, copy_checkpoint, events, final_weights, losses

STEPS = 6
# no pre-logits layer, so that timm's own VisionTransformer can load the exported file
MODEL = ["model.representation_size=null"]
RUN = [*TINY, *MODEL, "--nproc-per-node", "2", f"train.steps={STEPS}", "checkpoint.every=3", "checkpoint.keep=3",
       "run.deterministic=true", "log.peak_flops=1e9"]


def _train(run: Path, *extra: str, fault: str | None = None) -> str:
    """``vitscale pretrain`` of :data:`RUN` in ``run``; returns its output."""
    env = {**cli_env(), "VITSCALE_FAULT": fault} if fault else None
    proc = vitscale("pretrain", *RUN, f"run.dir={run}", *extra, env=env, check=True)
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def fp8_run(tmp_path_factory) -> tuple[Path, str]:
    """6 steps of the tiny twin with FP8 tensorwise under ZeRO-3 on 2 processes, uninterrupted."""
    run = tmp_path_factory.mktemp("fp8") / "run"
    return run, _train(run, "model.fp8=tensorwise", "zero.stage=3")


@pytest.mark.slow
def test_fp8_trains_under_zero3_on_two_processes(fp8_run):
    run, out = fp8_run
    assert "2 processes, ZeRO-3, bf16, FP8 tensorwise in 8 block linears (emulated on the CPU)" in out
    fp8 = losses(run)
    assert sorted(fp8) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in fp8.values())
    assert fp8[STEPS] < fp8[1] - 0.05  # it learns
    # MFU against the mixed peak: the block linears' share of the FLOPs at 2 x log.peak_flops, 2 ranks
    costs = model_costs(load_config(None, TINY + MODEL).model.spec())
    rec = read_metrics(run, None)[-1]
    peak = mixed_peak(1e9, costs["fp8_flops_share"])
    assert rec["mfu"] == pytest.approx(rec["images_per_s"] * costs["train_tflops_per_image"] * 1e12 / (peak * 2))


@pytest.mark.slow
def test_fp8_run_resumed_from_its_checkpoint_is_the_uninterrupted_run_bitwise(fp8_run, tmp_path):
    """The uninterrupted run's step-3 checkpoint alone in a new run dir (as if it had stopped
    there), then the same command: steps 4-6 and the final weights, bit for bit."""
    reference, run = fp8_run[0], tmp_path / "run"
    copy_checkpoint(reference, run, "step_00000003")
    _train(run, "model.fp8=tensorwise", "zero.stage=3")
    assert [e["step"] for e in events(run, "resumed")] == [3]
    want = losses(reference)
    assert losses(run) == {s: want[s] for s in range(4, STEPS + 1)}  # every resumed step's loss, bit for bit
    assert bitwise_diff(final_weights(run, STEPS), final_weights(reference, STEPS)) == []


@pytest.mark.slow
def test_fp8_checkpoint_exports_plain_weights_to_every_format(fp8_run, tmp_path, capsys):
    """Every writable format, verified by logits (timm's own VisionTransformer loads the timm file):
    the keys of the model without FP8, plain fp32 tensors, nothing of torchao's."""
    ck = tmp_path / "checkpoints"
    shutil.copytree(fp8_run[0] / "checkpoints", ck)
    spec = load_config(None, TINY + MODEL).model.spec()
    plain_keys = set(build_model(spec, device="meta").state_dict())
    for states in (ck / f"step_{STEPS:08d}").glob("*model_states.pt"):  # DeepSpeed's own files, rank by rank
        module = torch.load(states, map_location="cpu", weights_only=False)["module"]
        assert set(module) == plain_keys and all(type(t) is torch.Tensor for t in module.values())
    with pytest.raises(UserError, match="open_clip's VisionTransformer needs no patch bias"):  # not a CLIP tower
        convert.main([str(ck), str(tmp_path / "tower.safetensors"), "--to", "openclip", "--drop-head"])
    for fmt in writable_names():
        if fmt == "openclip":  # an FP8 CLIP tower's weights: test_fp8_swaps_the_block_linears_only_...
            continue
        entry = weights_format(fmt)
        dst = ck / f"universal_step_{STEPS:08d}" if fmt == "deepspeed-universal" else \
            tmp_path / f"out-{fmt}{'' if entry.directory else entry.suffixes[0]}"
        assert convert.main([str(ck), str(dst), "--to", fmt, "--verify"]) == 0, fmt
        oracles = [line for line in capsys.readouterr().out.splitlines() if line.startswith("verify: oracle")]
        library = {"timm": "oracle timm ", "hf": "oracle transformers "}.get(fmt, "oracle vitscale read-back")
        assert any(library in line for line in oracles), (fmt, oracles)  # timm / transformers load the file
        sd, read_spec, _ = read_weights(dst, fmt)
        assert set(sd) == plain_keys and read_spec == spec, fmt
        assert all(type(t) is torch.Tensor and t.dtype == torch.float32 for t in sd.values()), fmt


def test_fp8_swaps_the_block_linears_only_and_keeps_params_state_and_flops(tmp_path):
    cfg = load_config(None, TINY + MODEL + ["model.fp8=tensorwise"]).model
    torch.manual_seed(0)
    model = cfg.build()
    torch.manual_seed(0)
    plain = load_config(None, TINY + MODEL).model.build()
    depth = cfg.spec().depth
    assert fp8_layers(model) == [f"blocks.{i}.{n}" for i in range(depth) for n in ("attn.qkv", "attn.proj", "mlp.fc1",
                                                                                   "mlp.fc2")]
    assert type(model.patch_embed.proj) is torch.nn.Conv2d and type(model.head) is torch.nn.Linear
    assert bitwise_diff(model.state_dict(), plain.state_dict()) == []
    assert all(type(t) is torch.Tensor for t in model.state_dict().values())
    plain.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(4, 3, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        a, b = model.forward_features(x), plain.forward_features(x)
    assert not torch.equal(a, b) and (a - b).abs().max() < 0.2 * b.abs().max()  # FP8 matmuls: close, not equal
    model.forward_features(x).square().sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("blocks.")]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)

    counted = []
    for m in (model, plain):  # torch's FLOP counter on the same input: FP8 does the same FLOPs
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            m.eval()(x[:1])
        counted.append(counter.get_flop_counts())
    blocks = {k: sum(v.values()) for k, v in counted[0].items() if ".blocks." in k}
    assert blocks == {k: sum(v.values()) for k, v in counted[1].items() if ".blocks." in k} and blocks

    # a CLIP image tower with FP8 blocks writes as an OpenCLIP tower that open_clip's own model loads
    tower = load_config(None, [*TINY, "model.fp8=rowwise", "model.num_classes=0", "model.representation_size=null",
                               "model.pre_norm=true", "model.patch_bias=false", "model.proj_dim=32"]).model
    model = tower.build()
    assert len(fp8_layers(model)) == 4 * depth
    out = tmp_path / "tower.safetensors"
    weights_format("openclip").write(model.state_dict(), tower.spec(), out, {})
    report = verify(model.state_dict(), tower.spec(), out, "openclip")
    assert report.ok and any("open_clip" in name for name in report.diffs), report.lines()


def test_mfu_peak_mixes_fp8_and_bf16_and_info_says_so(capsys):
    h14 = model_costs(load_config(None, ["model.name=vit_h14", "model.representation_size=null"]).model.spec())
    assert h14["train_tflops_per_image"] == pytest.approx(1.004, abs=1e-3)
    assert h14["fp8_flops_share"] == pytest.approx(0.966, abs=1e-3)  # the blocks' qkv, proj, fc1, fc2
    assert mixed_peak(989e12, 0.0) == 989e12 and mixed_peak(None, 0.9) is None
    assert mixed_peak(989e12, 1.0) == FP8_PEAK_RATIO * 989e12
    assert mixed_peak(989e12, h14["fp8_flops_share"]) == pytest.approx(1914e12, rel=1e-3)
    assert device_peak_flops(989e12, 0.5) == pytest.approx(989e12 / 0.75)
    from pretrain.commands import info

    assert info.main(["--model", "vit_h14"]) == 0
    assert "96.6% of them in the blocks' Linear layers" in capsys.readouterr().out


def test_fp8_is_refused_where_it_cannot_run(tmp_path):
    cfg = load_config(None, [*TINY, "model.fp8=rowwise"])
    old_gpu = checks.check_fp8(cfg, runs_here=True, device="cuda", capability=(8, 0))
    assert old_gpu.status == "FAIL" and "8.0" in old_gpu.detail and "8.9+" in old_gpu.detail
    assert old_gpu.fix.startswith("set model.fp8=off")
    with pytest.raises(UserError, match=r"^preflight failed: model\.fp8: .*-> fix: set model\.fp8=off"):
        checks.raise_on_failure([old_gpu])
    assert checks.check_fp8(cfg, runs_here=True, device="cuda", capability=(9, 0)).status == "PASS"
    # a launcher process must not touch the GPU: it asks nvidia-smi, and says so when that cannot tell
    launcher = checks.check_fp8(cfg, runs_here=True, probe_gpu=False, device="cuda")
    assert launcher.status == "WARN" and "the ranks check it at start-up" in launcher.detail
    assert fp8_blocker("cuda", (8, 9)) is None and "8.6" in fp8_blocker("cuda", (8, 6))
    here = checks.check_fp8(cfg, runs_here=True)  # this CPU: one emulated FP8 layer runs
    assert here.status == "PASS" and "emulated" in here.detail
    # torchao missing: `vitscale pretrain` stops before any rank starts, one line, exit 2
    hidden = tmp_path / "hide" / "torchao"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('torchao is not installed here')\n")
    env = cli_env()
    env["PYTHONPATH"] = f"{hidden.parent}:{env['PYTHONPATH']}"
    proc = vitscale("pretrain", *TINY, "model.fp8=tensorwise", f"run.dir={tmp_path / 'run'}", env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "model.fp8" in line and "torchao" in line and "set model.fp8=off" in line
    assert not (tmp_path / "run").exists()
    for bad, fix in (("fp16", "use one of off, tensorwise, rowwise"), ("true", "use one of off"),):
        with pytest.raises(UserError, match=f"model.fp8={bad.capitalize() if bad == 'true' else repr(bad)}: {fix}"):
            load_config(None, [f"model.fp8={bad}"])
    with pytest.raises(UserError, match="model.width=72: FP8 matmuls .* divisible by 16"):
        load_config(None, ["model.name=vit_test4", "model.width=72", "model.fp8=tensorwise"])
    assert load_config(None, ["model.fp8=off"]).model.fp8 == "off"
