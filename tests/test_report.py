"""Seeing a run: `vitscale report` (figures whose data equal metrics.jsonl, a page that shows every
one, a crashed or partial run), the W&B sink (the offline run files hold metrics.jsonl's values;
a resumed job continues the same W&B run), the console's health line at each eval, and the
refusals when wandb or matplotlib is missing.

One real job is shared by the file: the CPU twin on 2 processes over shards with a truncated
shard (lost samples), EMA, few-shot evaluation and W&B offline, 8 steps, then relaunched with
``train.steps=12`` so that it resumes from its step-8 checkpoint.
"""

from __future__ import annotations

import html.parser
import json
import math
import re
import shutil
import struct
from pathlib import Path

import pytest

from tests.helpers import TINY, cli_env, vitscale, vitscale_here

EVAL_EVERY = 4


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("report")
    vitscale_here("shards", "synth", str(root / "img"), "--classes", "4", "--per-class", "60", "--img-size", "16",
                  check=True)
    vitscale_here("shards", "write", str(root / "img"), str(root / "sh"), "--samples-per-shard", "50",
                  "--val-fraction", "0.2", "--workers", "1", "--no-progress", check=True)
    cut = root / "sh" / "train-000002.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # a shard cut short: its tail is lost
    run = root / "run"
    args = ["pretrain", "--config", "configs/demo_cpu.yaml", "--nproc-per-node", "2", *TINY, f"run.dir={run}",
            f"data.train={root / 'sh'}", f"data.val={root / 'sh'}", "data.workers=1", "data.crop_scale_min=0.6",
            "data.max_bad_frac=0.5", f"train.eval_every={EVAL_EVERY}", f"checkpoint.every={EVAL_EVERY}",
            "ema.decay=0.9", f"fewshot.datasets=[{{name: syn, train: {root / 'sh'}, val: {root / 'sh'}}}]",
            f"fewshot.every={EVAL_EVERY}", "fewshot.shots=[1, 2]", "log.wandb=true", "log.peak_flops=1e12"]
    env = {**cli_env(), "WANDB_MODE": "offline"}
    first = vitscale(*args, "train.steps=8", env=env, check=True)
    after_first = root / "after_first"  # what a copy pulled from the cluster at step 8 holds
    shutil.copytree(run, after_first, ignore=shutil.ignore_patterns("*.pt", "wandb"))
    second = vitscale(*args, "train.steps=12", env=env, check=True)
    report = vitscale("report", str(run), check=True)
    return {"root": root, "run": run, "after_first": after_first, "first": first, "second": second,
            "report": report, "out": run / "report"}


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(records: list[dict]) -> list[dict]:
    return [r for r in records if "kind" not in r]


def _of(records: list[dict], kind: str, event: str | None = None) -> list[dict]:
    return [r for r in records if r.get("kind") == kind and (event is None or r.get("event") == event)]


def _series(data: dict, figure: str, panel: int, label: str, run: str | None = None) -> dict:
    found = [s for s in data["figures"][figure]["panels"][panel]["series"]
             if s["label"] == label and (run is None or s["run"] == run)]
    assert len(found) == 1, (figure, panel, label, data["figures"][figure]["panels"][panel]["series"])
    return found[0]


def _xy(records: list[dict], key) -> tuple[list, list]:
    get = key if callable(key) else (lambda r: r[key])
    return [r["step"] for r in records], [get(r) for r in records]


def test_report_figures_plot_exactly_what_metrics_jsonl_holds(job):
    records = _records(job["run"])
    train, evals, fewshot = _train(records), _of(records, "eval"), _of(records, "fewshot")
    assert [r["step"] for r in train] == list(range(1, 13))  # 8 steps, then 9..12 after the resume
    data = json.loads((job["out"] / "report.json").read_text())
    expected = {
        ("loss_lr", 0, "loss"): _xy(train, "loss"),
        ("loss_lr", 1, "lr"): _xy(train, "lr"),
        ("eval", 0, "top1"): _xy(evals, "top1"),
        ("eval", 0, "ema_top1"): _xy(evals, "ema_top1"),
        ("eval", 1, "eval_loss"): _xy(evals, "eval_loss"),
        ("throughput", 0, "images/s"): _xy(train, "images_per_s"),
        ("throughput", 1, "mfu"): _xy(train, "mfu"),
        ("data_wait", 0, "data wait"): _xy(train, "data_wait_frac"),
        ("lost_samples", 0, "truncated_shard"): _xy(train, lambda r: r["bad_by_reason"].get("truncated_shard", 0)),
        ("skipped_steps", 0, "skipped steps"): _xy(train, "bad_steps_total"),
        ("checkpoints", 0, "blocked_s"): _xy(_of(records, "event", "checkpoint"), "blocked_s"),
    }
    for (figure, panel, label), (x, y) in expected.items():
        s = _series(data, figure, panel, label)
        assert (s["x"], s["y"]) == (x, y), (figure, label)
    assert [e["step"] for e in _of(records, "event", "checkpoint")] == [4, 8, 12]
    assert all(isinstance(v, float) for v in _series(data, "throughput", 1, "mfu")["y"])  # log.peak_flops given
    assert train[-1]["bad_samples"] > 0  # the cut shard lost samples ...
    shards = _series(data, "lost_samples", 1, "lost samples")  # ... and the worst shards name it
    assert dict(zip(shards["x"], shards["y"], strict=True)) == train[-1]["bad_by_shard"] == {
        "train-000002.tar": train[-1]["bad_samples"]}
    for k in (1, 2):
        s = _series(data, "fewshot", 0, f"{k}-shot")
        assert data["figures"]["fewshot"]["panels"][0]["title"] == "few-shot syn"
        assert s["x"] == [r["step"] for r in fewshot] == [4, 8, 12]
        assert s["y"] == [r[f"syn/{k}shot"] for r in fewshot]
        assert s["low"] == [r[f"syn/{k}shot"] - r[f"syn/{k}shot_std"] for r in fewshot]
        assert s["high"] == [r[f"syn/{k}shot"] + r[f"syn/{k}shot_std"] for r in fewshot]
    assert data["figures"]["loss_lr"]["panels"][0]["markers"] == [{"run": "run", "x": 8, "label": "resumed"}]
    for figure in data["figures"].values():
        png = job["out"] / figure["png"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def test_report_header_names_the_run(job):
    from pretrain.core.version import package_version

    (head,) = json.loads((job["out"] / "report.json").read_text())["runs"]
    summary = json.loads((job["run"] / "summary.json").read_text())
    assert head["status"] == "finished" and head["mode"] == "pretrain" and head["model"] == "vit_test4"
    assert head["recipe"] == "configs/demo_cpu.yaml" and head["world_size"] == 2 and head["zero_stage"] == 2
    assert head["steps"] == head["total_steps"] == 12 and head["starts"] == 2
    assert head["resumed_from"] == [{"step": 8, "path": str(job["run"] / "checkpoints" / "step_00000008")}]
    assert head["version"] == package_version() and head["best_eval"] == summary["best_eval"]
    assert head["lost_samples"] == summary["bad_samples"] and head["skipped_steps"] == 0
    assert head["checkpoints"] == ["step 8", "step 12"]  # checkpoint.keep=2
    assert str(job["out"] / "index.html") == job["report"].stdout.strip().splitlines()[-1]


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "a":
            self.links.append(attrs["href"])


def _page_links(out: Path) -> _Links:
    parser = _Links()
    parser.feed((out / "index.html").read_text())
    return parser


def test_page_shows_every_figure_and_references_only_files_that_exist(job):
    out = job["out"]
    page = _page_links(out)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 8 and sorted(page.images) == pngs
    assert all((out / ref).is_file() for ref in page.images + page.links) and "report.json" in page.links
    text = (out / "index.html").read_text()
    assert "configs/demo_cpu.yaml" in text and "http" not in text  # self-contained: nothing from outside


def _report(*args: str) -> None:
    """``vitscale report ARGS`` in this process (matplotlib is imported once for the file)."""
    from pretrain.cli import main

    assert main(["report", *args]) == 0


def test_several_runs_overlay_with_a_legend_of_run_names(job, tmp_path):
    out = tmp_path / "compare"
    _report(str(job["after_first"]), str(job["run"]), "--out", str(out))
    data = json.loads((out / "report.json").read_text())
    assert [r["run"] for r in data["runs"]] == ["after_first", "run"]
    first, final = _train(_records(job["after_first"])), _train(_records(job["run"]))
    assert _series(data, "loss_lr", 0, "loss", "after_first")["y"] == [r["loss"] for r in first]
    assert _series(data, "loss_lr", 0, "loss", "run")["y"] == [r["loss"] for r in final]
    assert [r["steps"] for r in data["runs"]] == [8, 12]
    assert sorted(_page_links(out).images) == sorted(p.name for p in out.glob("*.png"))


def test_report_of_a_crashed_copy_reads_what_is_there(job, tmp_path, capsys):
    """A copy taken while the job was writing: the last line cut in half, no summary.json, no
    checkpoints; the 2 steps before it re-logged after a resume from an earlier checkpoint; no
    few-shot records and no ``lr`` key. Panels without data say so; nothing fails."""
    run = tmp_path / "crashed"
    run.mkdir()
    lines = (job["run"] / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    kept = [{k: v for k, v in r.items() if k != "lr"} for r in records if r.get("kind") != "fewshot"]
    again = [{**r, "loss": r["loss"] + 1.0} for r in _train(kept)[5:7]]  # steps 6 and 7 run again
    text = "\n".join(json.dumps(r) for r in kept + again) + "\n" + lines[-1][: len(lines[-1]) // 2]
    (run / "metrics.jsonl").write_text(text)
    _report(str(run))
    assert "1 line(s) of metrics.jsonl could not be read" in capsys.readouterr().out
    data = json.loads((run / "report" / "report.json").read_text())
    loss = _series(data, "loss_lr", 0, "loss")
    newest = {r["step"]: r["loss"] for r in _train(kept) + again}
    assert loss["x"] == sorted(newest) and loss["y"] == [newest[s] for s in sorted(newest)]
    assert loss["y"][5:7] == [r["loss"] for r in again]
    for figure, panel in (("loss_lr", 1), ("fewshot", 0)):
        assert data["figures"][figure]["panels"][panel]["series"] == []
        assert data["figures"][figure]["panels"][panel]["empty"] == "no data"
    (head,) = data["runs"]
    assert head["status"].startswith("no summary.json") and head["unreadable_lines"] == 1
    assert head["checkpoints"] == [] and head["world_size"] == 2  # from the start record
    assert sorted(_page_links(run / "report").images) == sorted(p.name for p in (run / "report").glob("*.png"))


# ---- W&B ----

def _wandb_records(path: Path):
    """The records of a W&B transaction log (``run-ID.wandb``): a 7-byte header, then LevelDB-log
    blocks of 32 KiB holding protobuf ``Record`` messages, possibly in pieces."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, pieces = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or its last piece
            record = pb.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def _expected_tags(record: dict) -> dict:
    """The documented W&B / TensorBoard tags of a metrics.jsonl record: every number under
    ``<kind>/<key>`` (kind ``train`` for step records, ``event/<name>`` for events), a dict's
    numbers under ``<kind>/<key>/<name>``."""
    kind = record.get("kind", "train")
    prefix = f"event/{record['event']}" if kind == "event" else kind
    out = {}
    for key, value in record.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            if key not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool) and \
                    math.isfinite(v):
                out[f"{prefix}/{key}" + (f"/{sub}" if sub is not None else "")] = v
    return out


def test_offline_wandb_run_holds_metrics_jsonl_and_the_resume_continues_it(job):
    run = job["run"]
    run_id = (run / "wandb_id").read_text().strip()
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2, files  # one per job segment, both of the same W&B run
    rows = []
    for path in files:
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                assert (record.run.run_id, record.run.project, record.run.display_name) == (run_id, "vitscale", "run")
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in
                       record.history.item}
                rows.append({k: v for k, v in row.items() if not k.startswith("_")})
    expected = [{"step": r["step"], **_expected_tags(r)} for r in _records(run) if _expected_tags(r)]
    assert rows == expected
    tags = set().union(*rows)
    assert {"train/mfu", "train/bad_by_reason/truncated_shard", "eval/ema_top1", "fewshot/syn/2shot",
            "event/checkpoint/blocked_s"} <= tags


# ---- the console ----

def test_console_one_line_per_log_step_and_a_health_line_at_each_eval(job):
    records = _records(job["run"])
    lost = {r["step"]: r["bad_samples"] for r in _train(records)}
    blocked = {r["step"]: r["blocked_s"] for r in _of(records, "event", "checkpoint")}
    for proc, steps, evals in ((job["first"], range(1, 9), (4, 8)), (job["second"], range(9, 13), (12,))):
        out = proc.stdout
        assert [int(m) for m in re.findall(r"^step +(\d+)/", out, flags=re.M)] == list(steps)
        for step in evals:
            since = step - EVAL_EVERY
            line = re.search(rf"^health @ step {step} \(since step {since}\): (\d+) lost samples, (\d+) skipped steps, "
                             rf"data-wait ([\d.]+)%, checkpoint blocking ([\d.]+) s$", out, flags=re.M)
            assert line, out[-3000:]
            assert int(line[1]) == lost[step] - lost.get(since, 0) and int(line[2]) == 0
            assert 0 <= float(line[3]) <= 100 and line[4] == f"{blocked[step]:.2f}"
    shown = [int(n) for p in ("first", "second") for n in re.findall(r"^data: (\d+) samples? lost since the last line",
                                                                     job[p].stdout, flags=re.M)]
    assert sum(shown) == lost[12] > 0  # a resumed job does not announce the earlier losses again


# ---- refusals ----

def _without(package: str, tmp_path: Path) -> dict:
    """The CLI's environment with ``import PACKAGE`` failing, as where it is not installed."""
    fake = tmp_path / f"no_{package}"
    fake.mkdir()
    message = f"No module named {package!r}"
    (fake / f"{package}.py").write_text(f"raise ImportError({message!r})\n")
    env = cli_env()
    env["PYTHONPATH"] = f"{fake}:{env['PYTHONPATH']}"
    return env


def test_log_wandb_without_wandb_fails_before_any_rank_starts(tmp_path):
    run = tmp_path / "run"
    proc = vitscale("pretrain", *TINY, "--nproc-per-node", "2", "log.wandb=true", f"run.dir={run}",
                    env=_without("wandb", tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "log.wandb=true needs the wandb package" in line and "pip install 'vitscale[wandb]'" in line
    assert not run.exists()  # refused before the run dir or any rank existed


def test_report_without_matplotlib_names_the_package(job, tmp_path):
    proc = vitscale("report", str(job["run"]), "--out", str(tmp_path / "out"), env=_without("matplotlib", tmp_path))
    assert proc.returncode == 2 and not (tmp_path / "out").exists()
    (line,) = proc.stderr.strip().splitlines()
    assert "matplotlib" in line and "pip install 'vitscale[report]'" in line
