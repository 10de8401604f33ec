"""The data behind every figure of ``vitscale report``, read from run directories.

A run is read from three kinds of files only, so a report works on a run that is still going, on
one that crashed and on a copy pulled from a cluster: ``metrics.jsonl`` (a line that cannot be
read, such as the partial last line of a killed job, is skipped and counted), ``summary.json``
(written when a run finishes) and the checkpoint meta files (``checkpoints/*/vitscale.json``).
A missing file or key leaves the figure it feeds without data; nothing here raises on what a
run dir holds.

:func:`figure_data` is a pure function of the loaded runs. It returns, per figure, its panels;
a panel has a ``title``, axis labels, a ``kind`` (``xy``, or ``barh`` whose ``x`` are category
names) and its ``series``: ``{"run", "label", "style", "x", "y"}`` (few-shot series add
``low`` / ``high``, mean -/+ the standard deviation over seeds). The values are the records' own,
null included; a step logged twice (a resume re-ran it) keeps its newest record, and series are
in step order. A series without a single number is left out, so an empty panel means "no data".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.checkpoint.layout import read_meta, tags_of
from pretrain.train.sinks import read_records

SUMMARY_FILE = "summary.json"
WORST_SHARDS = 10
_FEWSHOT_KEY = re.compile(r"^(?P<name>.+)/(?P<k>\d+)shot$")


@dataclass
class RunData:
    """What a report reads from one run directory."""

    name: str
    path: Path
    records: list[dict] = field(default_factory=list)
    unreadable_lines: int = 0
    summary: dict | None = None
    metas: list[dict] = field(default_factory=list)  # checkpoint meta files, lowest step first


def load_run(path: str | Path, name: str | None = None) -> RunData:
    """The records, summary and checkpoint metas of the run directory ``path``."""
    path = Path(path)
    records, bad = read_records(path)
    try:
        summary = json.loads((path / SUMMARY_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        summary = None
    ckdir = path / "checkpoints"
    metas = [m for m in (read_meta(ckdir / tag) for tag in tags_of(ckdir)) if m is not None] if ckdir.is_dir() else []
    return RunData(name or path.name, path, records, bad, summary if isinstance(summary, dict) else None,
                   sorted(metas, key=lambda m: m.get("step") or 0))


def run_names(paths: list[Path]) -> list[str]:
    """Short, distinct legend names: the folder name, with its parents while two runs share it."""
    paths = [Path(p).resolve() for p in paths]
    depth = 1
    while True:
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names) or depth >= max(len(p.parts) for p in paths):
            return names
        depth += 1


def report_data(runs: list[RunData]) -> dict:
    """Everything the page shows: a header per run and the data of every figure."""
    return {"runs": [header(run) for run in runs], "figures": figure_data(runs)}


# ---- record selection ----

def train_records(run: RunData) -> list[dict]:
    """The step records (no ``kind``), in file order."""
    return [r for r in run.records if "kind" not in r and _placed(r)]


def records_of(run: RunData, kind: str, event: str | None = None) -> list[dict]:
    """The records of ``kind`` (and ``event``), in file order."""
    return [r for r in run.records if r.get("kind") == kind and _placed(r) and
            (event is None or r.get("event") == event)]


def _placed(record: dict) -> bool:
    """Whether a record has a step to be plotted at (a damaged line may parse to anything)."""
    return _is_number(record.get("step"))


def _newest_per_step(records: list[dict]) -> list[dict]:
    """One record per step, the newest (a resume from an earlier checkpoint re-runs steps), in step order."""
    by_step = {}
    for r in records:
        by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step, key=_number_or_zero)]


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _number_or_zero(x) -> float:
    return x if _is_number(x) else 0


def _series(run: RunData, records: list[dict], key, label: str, style: str = "line") -> dict:
    """``key`` (a name, or a function of a record) over the steps of ``records`` that hold it."""
    get = key if callable(key) else (lambda r: r.get(key))
    rows = [r for r in _newest_per_step(records) if callable(key) or key in r]
    return {"run": run.name, "label": label, "style": style, "x": [r["step"] for r in rows],
            "y": [get(r) for r in rows]}


def _has_numbers(series: dict) -> bool:
    return any(_is_number(y) for y in series["y"])


def _panel(title: str, ylabel: str, series: list[dict], kind: str = "xy", xlabel: str = "step",
           percent: bool = False, markers: list[dict] | None = None, empty: str = "no data") -> dict:
    """``empty``: what the panel says when no series has a number."""
    return {"title": title, "xlabel": xlabel, "ylabel": ylabel, "kind": kind, "percent": percent,
            "series": [s for s in series if _has_numbers(s)], "markers": markers or [], "empty": empty}


# ---- figures ----

def figure_data(runs: list[RunData]) -> dict:
    """Per figure: ``{"title", "panels": [...]}`` (see the module docstring), in page order."""
    return {
        "loss_lr": {"title": "Training loss and learning rate", "panels": [
            _panel("training loss", "loss", [_series(r, train_records(r), "loss", "loss") for r in runs],
                   markers=_resumes(runs)),
            _panel("learning rate", "lr", [_series(r, train_records(r), "lr", "lr") for r in runs])]},
        "eval": {"title": "Evaluation", "panels": [
            _panel("eval accuracy", "accuracy", [_series(r, records_of(r, "eval"), k, k) for r in runs
                                                 for k in ("top1", "ema_top1", "prec1", "ema_prec1")], percent=True),
            _panel("eval loss", "loss", [_series(r, records_of(r, "eval"), k, k) for r in runs
                                         for k in ("eval_loss", "ema_eval_loss")])]},
        "fewshot": {"title": "Few-shot linear accuracy (mean and spread over seeds)", "panels": _fewshot_panels(runs)},
        "throughput": {"title": "Throughput", "panels": [
            _panel("images/s", "images/s", [_series(r, train_records(r), "images_per_s", "images/s") for r in runs]),
            _panel("MFU", "model FLOPs utilisation", [_series(r, train_records(r), "mfu", "mfu") for r in runs],
                   percent=True, empty=_mfu_empty(runs))]},
        "data_wait": {"title": "Data wait", "panels": [
            _panel("data-wait share of wall time", "share", [_series(r, train_records(r), "data_wait_frac",
                                                                     "data wait") for r in runs], percent=True)]},
        "lost_samples": {"title": "Lost samples", "panels": [
            _panel("lost samples by reason (run total)", "samples", [s for r in runs for s in _by_reason(r)],
                   empty=_counted(runs)),
            _panel(f"worst shards (up to {WORST_SHARDS}, run total)", "", [_worst_shards(r) for r in runs],
                   kind="barh", xlabel="lost samples", empty=_counted(runs))]},
        "skipped_steps": {"title": "Skipped steps (non-finite loss or gradient)", "panels": [
            _panel("skipped steps (run total)", "steps", [s for r in runs for s in _skipped(r)])]},
        "checkpoints": {"title": "Checkpoints", "panels": [
            _panel("time training stood still per checkpoint", "seconds",
                   [_series(r, records_of(r, "event", "checkpoint"), "blocked_s", "blocked_s", "stem")
                    for r in runs])]},
    }


def _mfu_empty(runs: list[RunData]) -> str:
    """Why the MFU panel can be empty: ``mfu`` is null without a known peak (CPU, an unknown GPU)."""
    logged = any("mfu" in r for run in runs for r in train_records(run))
    return "no data: mfu is null without a known peak FLOP/s (set log.peak_flops)" if logged else "no data"


def _resumes(runs: list[RunData]) -> list[dict]:
    return [{"run": r.name, "x": e["step"], "label": "resumed"}
            for r in runs for e in records_of(r, "event", "resumed")]


def _fewshot_panels(runs: list[RunData]) -> list[dict]:
    """One panel per few-shot dataset, a series per run and shot count."""
    shots: dict[str, set[int]] = {}
    for run in runs:
        for rec in records_of(run, "fewshot"):
            for key in rec:
                m = _FEWSHOT_KEY.match(key)
                if m:
                    shots.setdefault(m["name"], set()).add(int(m["k"]))
    panels = []
    for name in sorted(shots):
        series = [_fewshot_series(run, f"{name}/{k}shot", f"{k}-shot") for run in runs for k in sorted(shots[name])]
        panels.append(_panel(f"few-shot {name}", "accuracy", series, percent=True))
    return panels or [_panel("few-shot", "accuracy", [])]


def _fewshot_series(run: RunData, key: str, label: str) -> dict:
    """Mean accuracy over seeds at each few-shot step, with ``low`` / ``high`` = mean -/+ its
    standard deviation when every record holds one."""
    rows = _newest_per_step([r for r in records_of(run, "fewshot") if key in r])
    s = {"run": run.name, "label": label, "style": "line", "x": [r["step"] for r in rows], "y": [r[key] for r in rows]}
    std = [r.get(f"{key}_std") for r in rows]
    if rows and all(_is_number(v) for v in s["y"] + std):
        s["low"] = [m - d for m, d in zip(s["y"], std, strict=True)]
        s["high"] = [m + d for m, d in zip(s["y"], std, strict=True)]
    return s


def _by_reason(run: RunData) -> list[dict]:
    """The run's lost-sample count of every reason at each logged step (0 before its first loss)."""
    rows = [r for r in train_records(run) if isinstance(r.get("bad_by_reason"), dict)]
    reasons = sorted({reason for r in rows for reason in r["bad_by_reason"]})
    return [_series(run, rows, lambda r, reason=reason: r["bad_by_reason"].get(reason, 0), reason) for reason in
            reasons]


def _counted(runs: list[RunData]) -> str:
    """"none lost" when some run counts lost samples (shard data) and none lost any, else "no data"."""
    counts = any(isinstance(r.get("bad_by_reason"), dict) for run in runs for r in train_records(run))
    return "none lost" if counts else "no data"


def _worst_shards(run: RunData) -> dict:
    """The shards that lost the most samples, from the newest record that counts them by shard
    (else summary.json), largest first."""
    counts = next((r["bad_by_shard"] for r in reversed(train_records(run)) if isinstance(r.get("bad_by_shard"),
                                                                                           dict)), None)
    if counts is None and run.summary is not None and isinstance(run.summary.get("bad_by_shard"), dict):
        counts = run.summary["bad_by_shard"]
    top = sorted(((k, n) for k, n in (counts or {}).items() if _is_number(n)), key=lambda kv: -kv[1])[:WORST_SHARDS]
    return {"run": run.name, "label": "lost samples", "style": "bar", "x": [k for k, _ in top],
            "y": [n for _, n in top]}


def _skipped(run: RunData) -> list[dict]:
    """The run's count of skipped steps at each logged step, and each skip as a point."""
    events = [r for r in records_of(run, "event") if str(r.get("event", "")).endswith("_skipped")]
    points = {"run": run.name, "label": "skipped step", "style": "points", "x": [e["step"] for e in events],
              "y": [e.get("bad_steps_total") for e in events]}
    return [_series(run, train_records(run), "bad_steps_total", "skipped steps", "steps"), points]


# ---- the header ----

def header(run: RunData) -> dict:
    """The run's identity and state: model, recipe, world size, steps, wall time, where it
    resumed from, package version; from the newest start record, else the newest checkpoint meta."""
    starts = records_of(run, "event", "start")
    start = starts[-1] if starts else {}
    meta = run.metas[-1] if run.metas else {}
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    train = train_records(run)
    last = train[-1] if train else {}
    times = [r["time"] for r in run.records if isinstance(r.get("time"), (int, float))]
    steps = [r["step"] for r in run.records if isinstance(r.get("step"), int)]
    return {
        "run": run.name,
        "path": str(run.path),
        "status": _status(run, max(steps, default=None)),
        "mode": start.get("mode", meta.get("mode")),
        "model": start.get("model", (config.get("model") or {}).get("name")),
        "recipe": start.get("recipe"),
        "world_size": start.get("world_size", meta.get("world_size")),
        "zero_stage": start.get("zero_stage", meta.get("zero_stage")),
        "steps": max(steps, default=None),
        "total_steps": start.get("total_steps", (config.get("train") or {}).get("steps")),
        "wall_time_s": round(max(times) - min(times), 1) if times else None,
        "starts": len(starts),
        "resumed_from": [{"step": e["step"], "path": e.get("path")} for e in records_of(run, "event", "resumed")],
        "version": start.get("version", meta.get("version")),
        "final_loss": last.get("loss"),
        "best_eval": (run.summary or {}).get("best_eval"),
        "lost_samples": last.get("bad_samples"),
        "skipped_steps": last.get("bad_steps_total"),
        "checkpoints": [f"step {m['step']}" for m in run.metas if isinstance(m.get("step"), int)],
        "unreadable_lines": run.unreadable_lines,
    }


def _status(run: RunData, last_step: int | None) -> str:
    if not run.records:
        return "no metrics.jsonl records"
    if run.summary is not None and run.summary.get("steps") == last_step:
        return "finished"
    events = [r.get("event") for r in run.records if r.get("kind") == "event"]
    if events and events[-1] == "preempted":
        return "preempted (relaunch to resume)"
    return "no summary.json for its last step: still running, stopped or crashed"

