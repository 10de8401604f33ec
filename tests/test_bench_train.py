"""`vitscale bench train`: the real CLI on a tiny CPU plan, and its pure decisions (plan, micro
batch search, budget, SDPA evidence, timm speed-up). No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_tools.cli import main as shards_main
from pretrain.bench.plan import (
    SUITES,
    Budget,
    Case,
    build_plan,
    largest_fitting,
    parse_extra,
    reference_record,
    shrink,
    suite_extras,
)
from pretrain.core.errors import UserError
from pretrain.model.costs import mixed_peak
from tests.helpers import ROOT, cli_env, vitscale

BREAKDOWN = {"forward_s", "backward_s", "optimizer_s", "data_wait_s"}
REQUIRED = {"model", "img_size", "device", "torch", "zero_stage", "act_ckpt", "compile", "micro_batch", "images_per_s",
            "mfu", "peak_mem_gb", "sdpa_backend", "step_breakdown", "speedup_vs_timm", "command"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench-shards")
    assert shards_main(["synth", str(root / "img"), "--classes", "4", "--per-class", "12", "--img-size", "40"]) == 0
    assert shards_main(["write", str(root / "img"), str(root / "sh"), "--samples-per-shard", "12", "--workers", "1",
                        "--no-progress"]) == 0
    return root / "sh"


def test_cpu_tiny_run_writes_records(tmp_path, shards):
    """The real CLI over every kind of configuration: grid, ZeRO-3 with checkpointing, FP8 (emulated
    here) and the real shard loader, plus a timm baseline that has nothing to follow."""
    args = ["bench", "train", "--models", "vit_test4", "--img-sizes", "32", "--zero-stages", "2", "--steps", "3",
            "--warmup", "1", "--phase-steps", "1", "--act-ckpt", "off", "--compile", "off",
            "--extra", "vit_micro4@16:z3:ckpt,vit_test4@32:z2:fp8,vit_test4@32:z2:shards-cpu", "--shards", str(shards),
            "--loader-workers", "1", "--peak-flops", "1e12", "--timm", "--out", str(tmp_path), "--json"]
    proc = vitscale(*args, check=True)
    files = list(tmp_path.glob("cpu-*.json"))
    assert len(files) == 1, files
    records = json.loads(files[0].read_text())
    assert json.loads(proc.stdout) == records  # stdout holds only the JSON document
    ours = [r for r in records if r["framework"] == "vitscale"]
    assert [(r["model"], r["img_size"], r["zero_stage"], r["act_ckpt"], r["compile"], r["fp8"], r["loader"])
            for r in ours] == [("vit_test4", 32, 2, False, False, "off", None),
                               ("vit_micro4", 16, 3, True, False, "off", None),
                               ("vit_test4", 32, 2, False, False, "tensorwise", None),
                               ("vit_test4", 32, 2, False, False, "off", "cpu")]
    for r in ours:
        assert r.keys() >= REQUIRED
        assert r["error"] is None
        assert r["device"] == "cpu" and r["torch"] == torch.__version__ and r["world_size"] == 1
        assert r["micro_batch"] == 8 and r["images_per_s"] > 0 and r["peak_mem_gb"] > 0
        peak = mixed_peak(1e12, r["fp8_flops_share"] if r["fp8"] != "off" else 0.0)
        assert r["peak_flops"] == pytest.approx(peak)
        assert r["mfu"] == pytest.approx(r["images_per_s"] * r["train_tflops_per_image"] * 1e12 / peak)
        assert set(r["step_breakdown"]) == BREAKDOWN and all(v >= 0 for v in r["step_breakdown"].values())
        assert r["sdpa_backend"].startswith("cpu-") and r["sdpa_check"]["dispatcher"].startswith("cpu-")
        assert r["speedup_vs_timm"] is None
        assert 0 <= r["data_wait_frac"] < 1
        assert r["command"].startswith("vitscale bench train --models vit_test4")
    assert ours[2]["speedup_vs_bf16"] == pytest.approx(ours[2]["images_per_s"] / ours[0]["images_per_s"], abs=1e-3)
    assert ours[3]["data_wait_frac"] > ours[0]["data_wait_frac"]  # the real loader is waited for
    (timm,) = [r for r in records if r["framework"] == "timm"]
    assert timm["error"] and timm["images_per_s"] is None  # no timm here, or no vit_h14@224 to compare with


def test_cli_reports_user_errors():
    proc = subprocess.run([sys.executable, "-m", "pretrain", "bench", "train", "--micro-batch", "many"], cwd=ROOT,
                          env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--micro-batch 'many'" in proc.stderr and "Traceback" not in proc.stderr


def _oom_above(threshold: int, seen: list[int]):
    def try_fn(n: int) -> None:
        seen.append(n)
        if n > threshold:
            raise torch.cuda.OutOfMemoryError(f"{n} > {threshold}")
    return try_fn


@pytest.mark.parametrize("threshold", [1, 5, 8, 100, 333, 511, 512, 4000])
@pytest.mark.parametrize("align", [1, 8])
def test_largest_fitting_finds_the_limit_within_tolerance(threshold, align):
    seen: list[int] = []
    found = largest_fitting(_oom_above(threshold, seen), start=8, limit=512, align=align, tolerance=0.125)
    best = found.best
    cap = min(threshold, 512)
    assert best is not None and best <= cap
    assert cap - best <= max(align, best * 0.125) or best == cap
    assert (best, True) in found.trials and [n for n, _ in found.trials] == seen
    assert seen[0] == 8 and max(seen) <= 512
    assert all(ok == (n <= threshold) for n, ok in found.trials)


def test_largest_fitting_when_nothing_fits_and_other_errors():
    assert largest_fitting(_oom_above(0, []), start=8).best is None

    def broken(n: int) -> None:
        raise ValueError("not an OOM")

    with pytest.raises(ValueError):
        largest_fitting(broken, start=8)


def test_shrink_backs_off_on_the_alignment():
    assert shrink(256, 8) == 192 and shrink(20, 8) == 8 and shrink(6, 8) == 4 and shrink(1, 8) == 1


def test_plan_grid_then_extras_without_duplicates():
    plan = build_plan("vit_test4", "16,32", "2,3", "both", "off",
                      ["vit_micro4@16:z3:ckpt,vit_test4@16", "vit_test8@32"])
    assert plan[:4] == [Case("vit_test4", 16, 2, False, False), Case("vit_test4", 16, 2, True, False),
                        Case("vit_test4", 16, 3, False, False), Case("vit_test4", 16, 3, True, False)]
    assert len(plan) == 8 + 2  # vit_test4@16 z2 eager is in the grid already
    assert plan[-2:] == [Case("vit_micro4", 16, 3, True, False), Case("vit_test8", 32, 2, False, False)]
    assert parse_extra("vit_h14@518", 1) == Case("vit_h14", 518, 1, False, False)


def test_extra_spells_fp8_shard_loaders_bestckpt_and_timm():
    assert parse_extra("vit_h14@224:z2:bestckpt:compile:fp8", 1) == Case("vit_h14", 224, 2, None, True, "tensorwise")
    assert parse_extra("vit_b16:fp8=rowwise:shards-gpu", 3) == Case("vit_b16", 224, 3, False, False, "rowwise", "gpu")
    assert parse_extra("vit_h14@224:timm", 1) == Case("vit_h14", 224, 2, None, False, framework="timm")
    for text in ("vit_h14@224:z3:ckpt:shards-cpu", "vit_h14@224:z2:bestckpt:compile:fp8=rowwise", "vit_b16@224:timm"):
        case = parse_extra(text, 0)
        assert case.spec == text and parse_extra(case.spec, 1) == case  # the skipped list can be pasted back
    for bad in ("vit_h14@224:fp8=e4m3", "vit_h14@224:shards-tpu", "vit_h14@224:timm:ckpt"):
        with pytest.raises(UserError, match="--extra"):
            parse_extra(bad, 2)


def test_gpu_suite_runs_in_order_of_value_and_rehearses_on_stand_ins():
    plan = build_plan("", "224", "2", "off", "off", suite_extras("gpu"))
    assert [c.label for c in plan] == [
        "vit_h14@224 z2", "vit_h14@224 z2 ckpt", "vit_h14@224 timm", "vit_h14@224 z3 bestckpt",
        "vit_h14@224 z2 bestckpt fp8", "vit_h14@224 z2 bestckpt shards-cpu", "vit_h14@224 z2 bestckpt shards-gpu",
        "vit_b16@224 z2", "vit_l16@224 z2", "vit_h14@224 z2 bestckpt compile", "vit_h14@224 z2 bestckpt compile fp8"]
    tiny = build_plan("", "224", "2", "off", "off", suite_extras("gpu", tiny=True))
    assert [c.label.partition(" ")[2] for c in tiny] == [c.label.partition(" ")[2] for c in plan]
    assert {c.model for c in tiny} == {"vit_test4", "vit_micro4", "vit_test8"} and set(SUITES) == {"gpu"}
    with pytest.raises(UserError, match="--suite 'cpu'"):
        suite_extras("cpu")
    timm = build_plan("vit_h14,vit_b16", "224", "2", "both", "off", ["vit_l16@224"], timm=True)
    assert [c.label for c in timm] == ["vit_h14@224 z2", "vit_h14@224 z2 ckpt", "vit_h14@224 timm", "vit_b16@224 z2",
                                       "vit_b16@224 z2 ckpt", "vit_l16@224 z2"]


def test_bestckpt_and_timm_follow_the_fastest_earlier_measurement(monkeypatch, tmp_path):
    """The parent's decisions with the child processes faked: checkpointing is the faster here, so
    the timm baseline, ZeRO-3 and FP8 configurations run with it, timm at its micro batch."""
    from pretrain.bench import train as bench_train

    jobs = []

    def fake_child(job, kill_at):
        jobs.append(job)
        case = job.get("case") or job["reference"]
        ips = 100.0 if case["act_ckpt"] else 80.0
        check = {"dispatcher": "cpu-flash", "profiled": "cpu-flash", "agree": True, "evidence": [], "rejected": {}}
        return {"search": None, "oom": None, "device_name": "cpu",
                "measurement": {"images_per_s": ips / 2 if job["kind"] == "timm" else ips, "step_time_s": 0.1,
                                "data_wait_frac": 0.0, "final_loss": 6.9, "peak_mem_gb": 1.0,
                                "step_breakdown": dict.fromkeys(BREAKDOWN, 0.01), "sdpa_backend": "cpu-flash",
                                "sdpa_check": check, "compile_stats": None}}

    monkeypatch.setattr(bench_train, "run_child", fake_child)
    args = bench_train.parse_args(["--models", "", "--extra", "vit_test4@32:z2,vit_test4@32:z2:ckpt,vit_test4@32:timm,"
                                   "vit_test4@32:z3:bestckpt,vit_test4@32:z2:bestckpt:fp8", "--out", str(tmp_path)])
    plan = build_plan(args.models, args.img_sizes, args.zero_stages, args.act_ckpt, args.compile, args.extra)
    records, _ = bench_train.BenchRun(args, plan, "vitscale bench train ...", Budget(None)).run()
    assert [j.get("case", j.get("reference"))["act_ckpt"] for j in jobs] == [False, True, True, True, True]
    assert jobs[2]["kind"] == "timm" and jobs[2]["micro_batch"] == 8 and jobs[4]["case"]["fp8"] == "tensorwise"
    assert [r["speedup_vs_timm"] for r in records] == [1.6, 2.0, None, 2.0, 2.0]
    assert records[2]["model"] == "timm:VisionTransformer(vit_test4)" and records[2]["act_ckpt"] is True
    assert [r["speedup_vs_bf16"] for r in records] == [None, None, None, None, 1.0]


def test_plan_leaves_compile_under_zero3_out_of_the_grid_and_refuses_it_named():
    plan = build_plan("vit_test4", "32", "2,3", "off", "both", [])
    assert [(c.zero_stage, c.compile) for c in plan] == [(2, False), (2, True), (3, False)]
    with pytest.raises(UserError, match="model.compile"):
        build_plan("", "32", "2", "off", "off", ["vit_test4@32:z3:compile"])


@pytest.mark.parametrize("bad", [dict(models="vit_nope4"), dict(img_sizes="30"), dict(zero_stages="4"),
                                 dict(act_ckpt="maybe"), dict(extras=["vit_test4@32:z9"])])
def test_plan_rejects_mistakes_before_running(bad):
    kwargs = dict(models="vit_test4", img_sizes="32", zero_stages="2", act_ckpt="off", compile_="off", extras=[])
    kwargs.update(bad)
    with pytest.raises(UserError):
        build_plan(**kwargs)


def test_budget_stops_starting_what_would_overrun():
    now = [0.0]
    budget = Budget(100.0, clock=lambda: now[0])
    assert budget.allows(compiled=False)
    now[0] = 30.0
    budget.record(False, 30.0)
    budget.record(True, 80.0)
    assert budget.allows(compiled=False) and not budget.allows(compiled=True)
    now[0] = 101.0
    assert not budget.allows(compiled=False)
    assert Budget(None).allows(compiled=True) and Budget(None).kill_at() is None
    assert budget.kill_at() == 130.0 and Budget(1000.0, clock=lambda: 5.0).kill_at() == 1105.0


def test_sdpa_backend_from_profiler_names():
    from pretrain.bench.evidence import sdpa_from_profile

    cudnn = ["aten::scaled_dot_product_attention", "aten::_scaled_dot_product_cudnn_attention",
             "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128"]
    assert sdpa_from_profile(cudnn, "cuda")[0] == "cudnn"
    flash = ["aten::_scaled_dot_product_flash_attention", "aten::_flash_attention_forward",
             "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<80, 128, 64, 4>>(Flash_fwd_params)"]
    backend, evidence = sdpa_from_profile(flash, "cuda")
    assert backend == "flash" and "aten::_scaled_dot_product_flash_attention" in evidence
    assert sdpa_from_profile(["fmha_cutlassF_bf16_aligned_64x64_rf_sm80(Params)"], "cuda")[0] == "efficient"
    assert sdpa_from_profile(["aten::_scaled_dot_product_attention_math", "aten::bmm"], "cuda")[0] == "math"
    assert sdpa_from_profile(["aten::_scaled_dot_product_flash_attention_for_cpu"], "cpu")[0] == "cpu-flash"
    assert sdpa_from_profile(["aten::linear", "aten::bmm"], "cuda") == (None, [])


def _rec(**kw) -> dict:
    from pretrain.bench.records import RECORD_KEYS

    base = {"framework": "vitscale", "img_size": 224, "zero_stage": 2, "act_ckpt": False, "compile": False,
            "fp8": "off", "loader": None}
    return {**dict.fromkeys(RECORD_KEYS), **base, **kw}


def test_speedups_vs_timm_on_the_reference_model_and_vs_bf16_on_fp8():
    from pretrain.bench.records import fill_speedups

    records = [_rec(model="vit_h14", images_per_s=300.0),
               _rec(model="vit_h14", img_size=518, images_per_s=50.0),
               _rec(model="timm:vit_huge_patch14_224", framework="timm", baseline_of="vit_h14", zero_stage=None,
                    images_per_s=250.0),
               _rec(model="vit_h14", fp8="tensorwise", images_per_s=330.0),
               _rec(model="vit_h14", fp8="tensorwise", act_ckpt=True, images_per_s=200.0),  # no bf16 twin
               _rec(model="vit_h14", loader="cpu", images_per_s=290.0)]
    fill_speedups(records)
    assert [r["speedup_vs_timm"] for r in records] == [1.2, None, None, 1.32, 0.8, None]
    assert [r["speedup_vs_bf16"] for r in records] == [None, None, None, 1.1, None, None]


def test_reference_record_is_the_fastest_bf16_device_measurement_of_the_model():
    records = [_rec(model="vit_h14", images_per_s=300.0), _rec(model="vit_h14", act_ckpt=True, images_per_s=320.0),
               _rec(model="vit_h14", act_ckpt=False, fp8="tensorwise", images_per_s=400.0),
               _rec(model="vit_h14", loader="cpu", images_per_s=500.0),
               _rec(model="vit_h14", act_ckpt=False, error="boom", images_per_s=None),
               _rec(model="vit_b16", images_per_s=3000.0)]
    case = parse_extra("vit_h14@224:z3:bestckpt", 2)
    assert case.act_ckpt is None and reference_record(records, case)["act_ckpt"] is True
    assert reference_record(records[4:], case) is None


def test_gpu_flow_searches_once_backs_off_after_oom_and_reuses_the_search(monkeypatch, tmp_path):
    """The parent's side of `--micro-batch auto` on a GPU, with the child processes faked: the
    first configuration searches (the child reports 64), its measurement runs out of memory at 64
    and is retried in a new child at 48; the compiled and ZeRO-3 variants start from 48."""
    from pretrain.bench import train as bench_train

    jobs = []

    def fake_child(job, kill_at):
        jobs.append(job)
        mb = job["micro_batch"]
        if job["kind"] == "case" and mb is None:
            return {"search": {"best": 64, "trials": [[8, True], [64, True], [128, False]], "probe_stage": 2},
                    "measurement": None, "oom": "micro batch 64: CUDA out of memory", "device_name": "NVIDIA H100"}
        if mb > 48:
            return {"search": None, "measurement": None, "oom": f"micro batch {mb}", "device_name": "NVIDIA H100"}
        check = {"dispatcher": "flash", "profiled": "flash", "agree": True, "evidence": [], "rejected": {}}
        return {"search": None, "oom": None, "device_name": "NVIDIA H100",
                "measurement": {"images_per_s": 10.0 * mb, "step_time_s": 0.1, "final_loss": 6.9,
                                "peak_mem_gb": 70.0, "step_breakdown": dict.fromkeys(BREAKDOWN, 0.01),
                                "sdpa_backend": "flash", "sdpa_check": check, "compile_stats": None}}

    monkeypatch.setattr(bench_train, "run_child", fake_child)
    monkeypatch.setattr(bench_train.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("pretrain.bench.records.gpu_name", lambda: "NVIDIA H100")
    args = bench_train.parse_args(["--models", "vit_test4", "--img-sizes", "32", "--zero-stages", "2",
                                   "--act-ckpt", "off", "--compile", "both", "--extra", "vit_test4@32:z3",
                                   "--out", str(tmp_path)])
    plan = build_plan(args.models, args.img_sizes, args.zero_stages, args.act_ckpt, args.compile, args.extra)
    records, table = bench_train.BenchRun(args, plan, "vitscale bench train ...", Budget(None)).run()
    assert [r["micro_batch"] for r in records] == [48, 48, 48]
    assert records[0]["micro_batch_search"]["oom_backoff"] == [64]
    assert [r["micro_batch_search"]["mode"] for r in records] == ["auto", "auto (reused)", "auto (reused)"]
    assert [j["micro_batch"] for j in jobs] == [None, 48, 48, 48]
    assert all(r["mfu"] == pytest.approx(r["images_per_s"] * r["train_tflops_per_image"] * 1e12 / 989e12)
               for r in records)
    assert records[0]["device"] == "NVIDIA H100" and "NVIDIA H100" in table
    assert json.loads(next(tmp_path.glob("nvidia-h100-*.json")).read_text()) == records


def test_budget_cut_keeps_what_was_measured_and_names_the_rerun(tmp_path):
    """The first configuration starts (nothing says it will not fit), takes longer than the whole
    budget, so the rest is skipped; its record is in the file with the skipped ones."""
    proc = vitscale("bench", "train", "--models", "vit_test4", "--img-sizes", "32", "--zero-stages", "2,3",
                    "--act-ckpt", "off", "--compile", "off", "--extra", "vit_test4@32:z2:fp8", "--steps", "2",
                    "--warmup", "1", "--phase-steps", "1", "--budget-s", "5", "--out", str(tmp_path), check=True)
    records = json.loads(next(tmp_path.glob("cpu-*.json")).read_text())
    assert records[0]["error"] is None and records[0]["images_per_s"] > 0
    assert [r["error"].split(":")[0] for r in records[1:]] == ["skipped", "skipped"]
    assert "--extra vit_test4@32:z3,vit_test4@32:z2:fp8" in proc.stderr
    assert "vit_test4@32" in proc.stdout  # the table still comes


def test_a_running_measurement_is_stopped_at_the_deadline():
    import time

    from pretrain.bench.train import run_child

    job = {"kind": "case", "case": {"model": "vit_test4", "img_size": 32, "zero_stage": 2, "act_ckpt": False,
                                    "compile": False}, "micro_batch": 8, "search": None,
           "passes": {"warmup": 1, "steps": 1000, "phase_steps": 1}}
    t0 = time.monotonic()
    result = run_child(job, kill_at=t0 + 1.0)
    assert result["error"].startswith("stopped") and time.monotonic() - t0 < 60
