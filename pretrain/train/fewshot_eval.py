"""Few-shot evaluation inside a training run, on every rank (what is measured:
:mod:`pretrain.train.fewshot`).

At start-up (:class:`FewshotEvaluator` is built with the engine) every rank scans the labels of
its shards (``i % world``) of every few-shot set, the scans are shared (one object all-gather per
dataset) and every rank derives the same catalogue and plan: a mistake (no labels, too many classes
for the feature width, no held-out images for an l2 grid) stops the run here, at step 0, not at its
end; classes short of shots are reported as a warning line and an event record.

An evaluation (every ``fewshot.every`` steps and at the end) runs the model in eval mode through
the engine's top-level forward (``pre_logits=True``: under ZeRO-3 the parameters are gathered as
for a training forward) on the planned images of every rank's shards with the eval transform,
every rank the same number of batches, read by ``data.workers`` decode processes that start at the
first evaluation and serve every later one; the features are summed over ranks in float32 (one
all-reduce per set and side) and rank 0 solves in float64 and logs one ``"kind": "fewshot"``
record: ``<name>/<k>shot`` (mean over seeds), ``<name>/<k>shot_std``, per-seed values, the
subsets' digests, ``seconds`` (all), ``feature_seconds`` (model and data), ``solve_seconds``
(rank 0's least squares) and ``images``. TensorBoard shows them as ``fewshot/<name>/<k>shot``.
"""

from __future__ import annotations

import time

import torch

from pretrain.data.fewshot import SelectedImages
from pretrain.train.config import Config
from pretrain.train.engine import Comm, Engine, all_reduce_
from pretrain.train.fewshot import (
    Features,
    catalog,
    collect_features,
    feature_width,
    fewshot_jobs,
    plan,
    resolve_dataset,
    result_cells,
    result_line,
    scan_dataset,
    score,
    short_line,
    unreadable_line,
)
from pretrain.train.metrics import MetricsLog


class FewshotEvaluator:
    """The few-shot evaluator of one rank (see the module docstring). Holds no state worth a
    checkpoint: the plan is a pure function of the data and the config."""

    def __init__(self, cfg: Config, rank: int, world: int, spec, log: MetricsLog):
        self.cfg, self.fc, self.rank, self.world, self.log = cfg, cfg.fewshot, rank, world, log
        self.width = feature_width(spec)
        self.last: dict = {}
        self.sets = []
        for ds in self.fc.datasets:
            train, val = resolve_dataset(ds)
            scans = Comm.all_gather_object(scan_dataset(train, val, self.fc, rank, world))
            cat = catalog(ds, train, val, scans, self.fc, self.width)
            p = plan(cat, self.fc)
            self.sets.append((cat, p))
            line = short_line(cat, p)
            if line:
                log.console(line)
                log.write({"kind": "event", "step": 0, "event": "fewshot_short_classes", "dataset": cat.name,
                           "short": {str(k): v for k, v in p.short.items()}})
            log.console(f"fewshot {cat.name}: {len(cat.train.labels)} train images, {cat.num_classes} classes; "
                        f"each evaluation runs {len(p.train_rows())} train + {len(p.val_rows)} val images through "
                        f"the model ({self.width}-d features)")

        jobs, self.ids = fewshot_jobs(self.sets)
        c = cfg
        self.source = SelectedImages(jobs, rank, world, c.train.micro_batch, c.model.img_size, c.data.eval_crop_pct,
                                     c.data.workers)

    def due(self, step: int) -> bool:
        return bool(self.fc.every) and step % self.fc.every == 0

    @torch.no_grad()
    def run(self, engine: Engine, step: int) -> dict:
        """One evaluation on every rank; rank 0 logs the record (returned; empty on other ranks)."""
        t0 = time.perf_counter()
        engine.train(False)
        try:
            feats = collect_features(self.source, lambda images: engine.forward(images, pre_logits=True), self.ids,
                                     self.width, engine.device)
            for x, ok in feats:
                all_reduce_(x)
                all_reduce_(ok)
        finally:
            engine.train(True)
        feature_s = time.perf_counter() - t0
        if self.rank != 0:
            return {}
        tables = [Features(i, x.cpu().numpy(), ok.cpu().numpy() > 0) for i, (x, ok) in zip(self.ids, feats,
                                                                                             strict=True)]
        t = time.perf_counter()
        record: dict = {"kind": "fewshot", "step": step}
        for n, (cat, p) in enumerate(self.sets):
            record.update(score(cat, p, self.fc, tables[2 * n], tables[2 * n + 1]))
            if record[f"{cat.name}/unreadable"]:
                self.log.console(unreadable_line(cat.name, record[f"{cat.name}/unreadable"]))
        solve_s = time.perf_counter() - t
        seconds = time.perf_counter() - t0
        images = int(sum(f.ok.sum() for f in tables))
        record.update(seconds=round(seconds, 3), feature_seconds=round(feature_s, 3), solve_seconds=round(solve_s, 3),
                      images=images)
        self.last = record
        self.log.write(record)
        self.log.console(result_line(step, record, self.fc) + f"  ({seconds:.1f} s: features {feature_s:.1f} s, "
                         f"solve {solve_s:.1f} s, {images} images)")
        return record

    def line(self) -> str:
        """The last result for the end-of-run summary."""
        return f"{result_cells(self.last, self.fc)} (step {self.last['step']})" if self.last else "n/a"

    def summary(self) -> dict:
        """The last evaluation's means and spreads as ``fewshot/<name>/<k>shot[_std]`` (summary.json)."""
        rec = self.last
        out = {f"fewshot/{k}": v for k, v in rec.items() if k.endswith("shot") or k.endswith("shot_std")}
        if rec:
            out.update({"fewshot_step": rec["step"], "fewshot_seconds": rec["seconds"]})
        return out


def build_fewshot(cfg: Config, rank: int, world: int, spec, log: MetricsLog) -> FewshotEvaluator | None:
    """The evaluator when ``fewshot.datasets`` names any, else None."""
    if not cfg.fewshot.datasets:
        return None
    return FewshotEvaluator(cfg, rank, world, spec, log)
