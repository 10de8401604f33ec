"""Resume on the real path: `vitscale pretrain` (torchrun, 2 gloo processes, DeepSpeed ZeRO bf16)
killed, preempted or damaged, then relaunched with the same command.

Each case compares with one uninterrupted 16-step run on a tiny shard set (``reference``, made
once per session: tests/runs.py): same
losses bit for bit and the same sample keys on every rank when the world size is unchanged; the
same samples in every step and the losses up to reduction order when the world size or the
number of loader workers changes.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint.layout import verify_checkpoint
from tests.helpers import TINY as RUN_TINY
from tests.helpers import cli_env, vitscale, vitscale_here
from tests.runs import (
    EPOCH,
    copy_checkpoint,
    events,
    kill_job,
    latest,
    losses,
    output,
    pretrain_args,
    reference_run,
    sample_keys,
    start,
    wait_until,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference():
    return reference_run()  # shared with the multi-node test


def _resumed_at(run) -> list[int]:
    return [e["step"] for e in events(run, "resumed")]


def test_kill_mid_save_keeps_latest_and_relaunch_reproduces_the_run(reference, tmp_path):
    """SIGKILL of the whole job after step 10, while step 15 is being saved; the same command
    again resumes from step 10 and reproduces the uninterrupted run exactly."""
    run = tmp_path / "run"
    ck = run / "checkpoints"
    proc = start(run, fault="slowsave@15")  # the save of step 15 pauses before it is made visible
    try:
        wait_until(lambda: (ck / ".tmp-step_00000015" / "rank_00001.pt").is_file(), proc, what="the step-15 save")
    finally:
        kill_job(proc)
    assert latest(run) == "step_00000010"
    assert verify_checkpoint(ck / "step_00000010") == []
    assert not (ck / "step_00000015").exists()

    vitscale(*pretrain_args(run), check=True)
    assert _resumed_at(run) == [10]
    assert losses(run) == losses(reference)  # steps 1-16, bitwise
    for rank in (0, 1):
        assert sample_keys(run, rank) == sample_keys(reference, rank)
    assert latest(run) == "step_00000016"
    assert not list(ck.glob(".tmp-*"))


def test_sigterm_during_a_save_completes_it_then_stops_cleanly(reference, tmp_path):
    """SIGTERM to the `vitscale pretrain` parent while step 10 is being written in the background
    (``checkpoint.async_save``, the default): training went on meanwhile; every rank stops at the
    same later step, the step-10 checkpoint is completed and published, the stop step is saved and
    the command exits 0; relaunching finishes the run exactly (so training on while a save is
    written changes nothing). The signal is sent once the step-10 save has begun, so the earliest
    step that can agree on it is 11, and the ranks hold before step 11 until it has reached them
    (``holdstop``): they stop at exactly step 11, however slowly the signal travels on a loaded
    machine."""
    run = tmp_path / "run"
    ck = run / "checkpoints"
    proc = start(run, fault="slowsave@10;holdstop@11")
    try:
        wait_until(lambda: (ck / ".tmp-step_00000010").is_dir(), proc, what="the step-10 save")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, output(run)[-3000:]
    finally:
        kill_job(proc)
    assert [e["step"] for e in events(run, "preempted")] == [11]
    [saved10] = [e for e in events(run, "checkpoint") if e["step"] == 10]
    assert saved10["published_at"] == 11  # step 11 ran while it was written (in the background) ...
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    at = records.index(saved10)
    assert [r["step"] for r in records[:at] if "loss" in r and "kind" not in r][-1] == 11  # ... logged before
    assert latest(run) == "step_00000011"
    for tag in ("step_00000010", "step_00000011"):
        assert verify_checkpoint(ck / tag) == []

    vitscale(*pretrain_args(run), check=True)
    assert _resumed_at(run) == [11]
    assert losses(run) == losses(reference)
    for rank in (0, 1):
        assert sample_keys(run, rank) == sample_keys(reference, rank)


# ZeRO-2 here; ZeRO-3's 2 -> 1 resume through the CLI is tests/test_augreg.py
# (test_ema_continues_exactly_after_a_2_to_1_process_resume, EMA included), its universal load
# tests/test_convert_deepspeed.py (bitwise master weights), and its same-world-size resume
# tests/test_exact_resume.py (bitwise, with every stochastic piece on).
def test_world_size_and_worker_changes_change_nothing_about_the_data(reference, tmp_path):
    """From the reference's step-10 checkpoint (2 processes, in-process readers): 2 processes x 2
    loader workers to step 11, then 1 process x 2 workers (grad_accum derived: 2) to step 13,
    then 2 x 1 to the end, each resume on another world size converting the checkpoint itself.
    Every step holds exactly the samples of the uninterrupted run (each rank the same canonical
    micro batches), so epoch 1 (steps 7-12, crossing two resumes) holds every sample once, and the
    losses agree up to floating-point reduction order."""
    run = tmp_path / "run"
    copy_checkpoint(reference, run, "step_00000010")
    vitscale(*pretrain_args(run, "data.workers=2", "checkpoint.every=1"), env=_env(fault="stop@11"), check=True)
    one = vitscale(*pretrain_args(run, "data.workers=2", "--nproc-per-node", "1"), env=_env(fault="stop@13"),
                   check=True)
    assert "universal" in one.stdout
    vitscale(*pretrain_args(run, "data.workers=1"), check=True)
    resumed = [(e["step"], e["universal"]) for e in events(run, "resumed")]
    assert resumed == [(10, False), (11, True), (13, True)]

    ref = [sample_keys(reference, r) for r in (0, 1)]
    got = [sample_keys(run, r) for r in (0, 1)]
    for step in range(11, 17):
        want = ref[0][step] + ref[1][step]
        have = got[0][step] + (got[1][step] if step not in (12, 13) else [])  # steps 12-13: one process
        assert have == want, step
    epoch1 = [k for step in range(7, 13) for k in (ref[0] if step <= 10 else got[0])[step]
              + ((ref[1] if step <= 10 else got[1])[step] if step not in (12, 13) else [])]
    assert len(epoch1) == EPOCH and len(set(epoch1)) == EPOCH

    have, want = losses(run), losses(reference)
    assert sorted(have) == list(range(11, 17))
    diff = max(abs(have[s] - want[s]) for s in have)
    print(f"largest loss difference to the uninterrupted run: {diff:.2e}")
    assert diff < 0.01, (have, want)


def test_damaged_checkpoints_are_refused_or_skipped(reference, tmp_path):
    """A byte-flipped file in the newest checkpoint and a truncated one in the next: --resume of the
    damaged one exits 2 naming the file; with garbage in `latest` too, auto-resume falls back to the
    newest intact one (step 10) and reproduces the run from there."""
    run = tmp_path / "run"
    ck = run / "checkpoints"
    shutil.copytree(reference / "checkpoints", ck)
    flipped = ck / "step_00000016" / "mp_rank_00_model_states.pt"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated = next((ck / "step_00000015").glob("*rank_1_*optim_states.pt"))
    truncated.write_bytes(truncated.read_bytes()[:1000])

    bad = vitscale_here(*pretrain_args(run, "--nproc-per-node", "1", "--resume", str(ck / "step_00000016")))
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert str(flipped) in bad.stderr and "sha256" in bad.stderr

    (ck / "latest").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")  # and `latest` itself overwritten with garbage
    good = vitscale(*pretrain_args(run), check=True)
    assert "does not name a checkpoint tag" in good.stdout
    assert str(flipped) in good.stdout and str(truncated) in good.stdout and "truncated" in good.stdout
    assert len(events(run, "checkpoint_rejected")) == 3  # latest, step 16, step 15
    assert _resumed_at(run) == [10]
    want = losses(reference)
    assert losses(run) == {s: want[s] for s in range(11, 17)}
    assert latest(run) == "step_00000016" and verify_checkpoint(ck / "step_00000016") == []


def test_checkpoint_that_does_not_fit_the_config_is_refused(reference, tmp_path):
    run = tmp_path / "run"
    copy_checkpoint(reference, run, "step_00000016")
    for override, message in [("model.num_classes=5", "does not match the config's model"),
                              ("zero.stage=3", "ZeRO stage 2"),
                              ("--no-resume", "already holds checkpoints")]:
        proc = vitscale_here(*pretrain_args(run, "--nproc-per-node", "1", override))
        assert proc.returncode == 2, (override, proc.stderr[-2000:])
        assert message in proc.stderr, (override, proc.stderr[-2000:])
    assert latest(run) == "step_00000016" and not events(run, "resumed")


def _env(fault: str) -> dict:
    return {**cli_env(), "VITSCALE_FAULT": fault}


# ---- the same rules in-process, without DeepSpeed (fast) ----

class _OneRank:
    barrier = staticmethod(lambda: None)
    all_gather_object = staticmethod(lambda obj: [obj])
    broadcast_object = staticmethod(lambda obj, src=0: obj)


class _FakeEngine:
    """Writes one model-states file per save, as DeepSpeed's save_checkpoint would."""

    def __init__(self):
        self.value = 0

    def save(self, save_dir, tag, client_state, defer=False):
        (save_dir / tag).mkdir(parents=True)
        path = save_dir / tag / "mp_rank_00_model_states.pt"
        path.write_bytes(bytes([self.value % 256]) * 64)
        return [(None, path)]  # written now (Engine.save's contract: state None when written)


def _manager(run, keep=2):
    from pretrain.checkpoint.layout import CheckpointManager

    return CheckpointManager(run, 0, 1, keep, _OneRank())


def _save(mgr, engine, step):
    engine.value += 1
    return mgr.save(engine, step, {"model_spec": {}}, {"data": {"position": step}, "loop": {}})


def test_saves_are_published_atomically_pruned_and_never_prune_latest(tmp_path):
    mgr, engine = _manager(tmp_path, keep=2), _FakeEngine()
    (mgr.dir / ".tmp-step_00000009").mkdir(parents=True)  # a save killed earlier
    (mgr.dir / "universal" / "step_00000001" / "zero").mkdir(parents=True)
    for step in (1, 2, 3):
        _save(mgr, engine, step)
    assert mgr.tags() == ["step_00000002", "step_00000003"] and latest(tmp_path) == "step_00000003"
    assert not list(mgr.dir.glob(".tmp-*"))
    assert not (mgr.dir / "universal" / "step_00000001").exists()  # its source was pruned
    assert verify_checkpoint(mgr.dir / "step_00000003") == []
    (mgr.dir / "latest").write_text("step_00000002")  # as after --resume of step 2
    _save(mgr, engine, 2)  # the same step again replaces it
    assert latest(tmp_path) == "step_00000002" and verify_checkpoint(mgr.dir / "step_00000002") == []
    _save(mgr, engine, 1)  # older than both kept ones: kept anyway, latest names it
    assert latest(tmp_path) == "step_00000001" and (mgr.dir / "step_00000001").is_dir()


def test_resume_choice_follows_latest_and_falls_back_past_damage(tmp_path):
    mgr, engine = _manager(tmp_path, keep=5), _FakeEngine()
    for step in (1, 2, 3):
        _save(mgr, engine, step)
    (mgr.dir / "latest").write_text("step_00000002")
    assert mgr.usable_for_resume() == (mgr.dir / "step_00000002", [])  # never the abandoned step 3
    damaged = mgr.dir / "step_00000002" / "mp_rank_00_model_states.pt"
    damaged.write_bytes(b"\xff" * 64)
    chosen, warnings = mgr.usable_for_resume()
    assert chosen == mgr.dir / "step_00000001"
    assert len(warnings) == 1 and str(damaged) in warnings[0] and "sha256" in warnings[0]
    (mgr.dir / "latest").unlink()  # a crash between the first rename and writing `latest`
    assert mgr.usable_for_resume()[0] == mgr.dir / "step_00000003"


def test_a_damaged_latest_file_falls_back_to_the_newest_verified_tag_by_step(tmp_path):
    mgr, engine = _manager(tmp_path, keep=5), _FakeEngine()
    for step in (9, 10, 100000000):  # a 9-digit step sorts after the 8-digit ones by number, not by text
        _save(mgr, engine, step)
    assert mgr.tags() == ["step_00000009", "step_00000010", "step_100000000"]
    for garbage in (b"", b"\x00\xff\xfe binary", b"step_1234", b"../../etc"):
        (mgr.dir / "latest").write_bytes(garbage)
        chosen, warnings = mgr.usable_for_resume()
        assert chosen == mgr.dir / "step_100000000" and "does not name a checkpoint tag" in warnings[0]
    (mgr.dir / "latest").write_text("step_00000042")  # names a tag that is not there
    chosen, warnings = mgr.usable_for_resume()
    assert chosen == mgr.dir / "step_100000000" and "which does not exist" in warnings[0]


def _check(cfg, mode: str, resume, no_resume: bool, hash_files: bool) -> None:
    from pretrain.checkpoint.resume import check_before_launch
    from pretrain.train.config import identity

    check_before_launch(Path(cfg.run.dir), cfg.checkpoint.keep, identity(cfg.for_world(2), mode), resume, no_resume,
                        hash_files)


def test_launch_time_checks_refuse_what_cannot_resume(tmp_path):
    from pretrain.core.errors import UserError
    from pretrain.train.config_file import load_config

    check_before_launch = _check

    cfg = load_config(None, [*RUN_TINY, f"run.dir={tmp_path}"])
    mgr, engine = _manager(tmp_path), _FakeEngine()
    engine.value = 1
    spec = {k: v for k, v in cfg.model.spec().to_dict().items() if k != "norm_eps"}  # written before norm_eps
    meta = {"model_spec": spec, "zero_stage": 2, "world_size": 2, "mode": "pretrain", "config": cfg.to_dict()}
    mgr.save(engine, 4, meta, {"data": {}, "loop": {}})
    check_before_launch(cfg, "pretrain", None, False, hash_files=True)
    other = load_config(None, [*RUN_TINY, f"run.dir={tmp_path}", "model.depth=3"])
    with pytest.raises(UserError, match="depth: checkpoint 2 vs config 3"):
        check_before_launch(other, "pretrain", None, False, hash_files=True)
    with pytest.raises(UserError, match="finetune"):
        check_before_launch(cfg, "finetune", None, False, hash_files=True)
    with pytest.raises(UserError, match="already holds checkpoints"):
        check_before_launch(cfg, "pretrain", None, True, hash_files=True)
    (mgr.dir / "step_00000004" / "mp_rank_00_model_states.pt").write_bytes(b"\x00" * 64)
    check_before_launch(cfg, "pretrain", str(tmp_path), False, hash_files=False)  # sizes only
    with pytest.raises(UserError, match="sha256"):
        check_before_launch(cfg, "pretrain", str(tmp_path), False, hash_files=True)


def test_fault_spec():
    from pretrain.train.faults import Faults

    f = Faults("nan@5,7-8:rank1;stop@3;slowsave@4", rank=1)
    assert [s for s in range(10) if f.loss_fault(s)] == [5, 7, 8] and f.stop(3) and f.save_pause(4)
    assert not Faults("nan@5:rank1", rank=0).loss_fault(5)
    with pytest.raises(ValueError, match="unknown fault"):
        Faults("nna@5", rank=0)


def test_components_restore_by_their_declared_placement_and_missing_state_is_never_silent():
    """The state contract (pretrain/train/state.py): replicated parts load on any world size,
    per-rank parts take their declared default on another one, sharded parts are resharded from
    every old rank's part; a missing part is its default (said) or an error."""
    from pretrain.core.errors import UserError
    from pretrain.train.state import Components, LoopState, RngState

    class Counter:
        placement = "per_rank"

        def __init__(self):
            self.n = 0

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    class WithDefault(Counter):
        def load_default(self):
            self.n = -1
            return "the counter starts at -1"

    class Pieces(Counter):
        placement = "sharded"

        def reshard(self, parts):
            self.n = sum(p["n"] for p in parts)

    def components():
        items = {"loop": LoopState(), "data": Counter(), "ema": WithDefault(), "shards": Pieces()}
        return Components(items), items

    files = {0: {"loop": {"step": 7}, "data": {"n": 3}, "ema": {"n": 5}, "shards": {"n": 10}},
             1: {"loop": {"step": 7}, "data": {"n": 4}, "ema": {"n": 6}, "shards": {"n": 20}}}
    c, items = components()  # same world size: every rank its own part
    assert c.load(files.get, 2, 1, 2, "ck/step_7") == []
    assert (items["loop"].step, items["data"].n, items["ema"].n, items["shards"].n) == (7, 4, 6, 20)

    c, items = components()  # 2 -> 1: per-rank default or refusal, sharded resharded from both parts
    with pytest.raises(UserError, match="'data' has no default"):
        c.load(files.get, 2, 0, 1, "ck/step_7")
    del files[0]["data"], files[1]["data"]
    c = Components({k: v for k, v in items.items() if k != "data"})
    notes = c.load(files.get, 2, 0, 1, "ck/step_7")
    assert notes == ["ck/step_7 was saved by 2 ranks, so this rank's 'ema' state is not in it: "
                     "the counter starts at -1"]
    assert (items["loop"].step, items["ema"].n, items["shards"].n) == (7, -1, 30)

    c, items = components()
    with pytest.raises(UserError, match=r"checkpoint ck/step_7 holds no state for the 'data' component"):
        c.load(files.get, 2, 0, 2, "ck/step_7")
    c = Components({"ema": WithDefault()})
    assert c.load({0: {}}.get, 1, 0, 1, "ck/step_7") == ["ck/step_7 holds no 'ema' state: the counter starts at -1"]

    from pretrain.train.state import BestEval

    best = BestEval()
    for step, top1 in ((10, 0.4), (20, 0.6), (30, 0.5)):
        best.update({"step": step, "top1": top1})
    again = BestEval()
    Components({"best": again}).load({0: {"best": best.state_dict()}}.get, 2, 0, 1, "ck")  # replicated: any world
    assert (again.value, again.step) == (0.6, 20)
    assert "tracked from this step" in Components({"best": BestEval()}).load({0: {}}.get, 1, 0, 1, "ck")[0]

    class Undeclared(Counter):
        placement = None

    with pytest.raises(ValueError, match="declares no placement"):
        Components({"x": Undeclared()})
    with pytest.raises(ValueError, match="no reshard"):
        Components({"x": type("S", (Counter,), {"placement": "sharded"})()})

    rng = RngState(seed=3, rank=1, step=lambda: 7)  # the RNG's default: re-seeded from (seed, rank, step)
    assert "re-seeded" in rng.load_default()
    first = torch.rand(3)
    rng.load_default()
    assert torch.equal(torch.rand(3), first)
