"""Few-shot linear accuracy, the ViT paper's transfer metric: what is measured and how.

For a few-shot dataset (``fewshot.datasets``: shard sets ``train`` and ``val``) the model's frozen
representation before the head (the pre-logits output when the model has that layer, else the
pooled token) is computed for a few training images per class and for the val images; a ridge
regression to {-1, 1}^K one-vs-rest targets is solved in closed form in float64
(:mod:`pretrain.train.least_squares`) and its top-1 accuracy on the val images is the figure
``fewshot/<name>/<k>shot``: the mean over ``fewshot.seeds`` subsets, with their spread
(population std) as ``<k>shot_std``.

The subsets: seed ``s`` orders every class's train rows randomly, fixed by ``(s, class)``
(:func:`pretrain.data.fewshot.class_orders`); the k-shot subset is the first k of every class.
Seeds are 0..seeds-1, independent of ``run.seed``, so runs compare on the same images. A class
with fewer than k train images uses all it has; that is reported (:attr:`FewshotPlan.short`),
not fatal. With an ``l2`` grid, the next ``fewshot.holdout`` images of every class after the
largest k are held out, every l2 is fitted on the k shots and scored on them, and the best one
(ties: the largest) is used for the val accuracy; a single ``l2`` needs no held-out images.

This module is the part shared by the in-training evaluator (:mod:`pretrain.train.fewshot_eval`,
all ranks) and ``vitscale evaluate --fewshot`` (one process): the catalogue of a dataset's rows,
the plan of which rows are needed, and the scoring of their features.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pretrain.core.errors import UserError
from pretrain.data.fewshot import class_orders, prefix_shards, resolve_fewshot_shards, scan_labels, val_subset
from pretrain.data.shard_sets import ShardSet, check_same_classes
from pretrain.train import least_squares as lsq
from pretrain.train.fewshot_config import FewshotConfig, FewshotDataset


def feature_width(spec) -> int:
    """Width of the features the metric uses: the pre-logits width, else the model width."""
    return spec.representation_size or spec.width


@dataclass
class Rows:
    """The usable rows of one side of a dataset, in canonical order: (shard, position) and label."""

    ref: np.ndarray  # (N, 2) int64: shard index, position in the shard
    labels: np.ndarray  # (N,) int64

    @staticmethod
    def from_scans(scans: list[dict[int, list[tuple[int, int]]]], limit: int | None = None) -> Rows:
        """Merge per-rank :func:`pretrain.data.fewshot.scan_labels` results; the first ``limit``."""
        merged = {shard: rows for part in scans for shard, rows in part.items()}
        ref = [(shard, pos) for shard in sorted(merged) for pos, _ in merged[shard]]
        labels = [label for shard in sorted(merged) for _, label in merged[shard]]
        ref_a = np.array(ref, dtype=np.int64).reshape(-1, 2)
        lab = np.array(labels, dtype=np.int64)
        return Rows(ref_a[:limit], lab[:limit]) if limit is not None else Rows(ref_a, lab)


@dataclass
class Catalog:
    """What a few-shot dataset holds: its shard sets and usable rows, and its class count."""

    name: str
    train_shards: ShardSet
    val_shards: ShardSet
    train: Rows
    val: Rows
    num_classes: int


def resolve_dataset(ds: FewshotDataset) -> tuple[ShardSet, ShardSet]:
    prefix = f"fewshot.datasets[{ds.name}]"
    train = resolve_fewshot_shards(ds.train, "train", f"{prefix}.train")
    val = resolve_fewshot_shards(ds.val, "val", f"{prefix}.val")
    shared = set(train.urls) & set(val.urls)
    if shared:
        raise UserError(f"{prefix}: train and val name the same shards ({len(shared)} of {len(val.urls)} val shards, "
                        f"e.g. {sorted(shared)[0]}), so the k-shot images would be scored on themselves; give a val "
                        f"set of other images (`vitscale shards write SRC OUT --val-fraction 0.1` writes both, "
                        f"`vitscale shards index SET --split val` indexes a separate one)")
    check_same_classes(train, val, f"{prefix}.train", f"{prefix}.val")
    return train, val


def scan_dataset(train: ShardSet, val: ShardSet, fc: FewshotConfig, rank: int, world: int) -> dict:
    """This rank's part of the label scan (shards ``i % world``), to be merged by :func:`catalog`."""
    tr = [i for i in prefix_shards(train, fc.max_train) if i % world == rank]
    va = [i for i in range(len(val.urls)) if i % world == rank]
    return {"train": scan_labels(train, tr), "val": scan_labels(val, va)}


def catalog(ds: FewshotDataset, train: ShardSet, val: ShardSet, scans: list[dict], fc: FewshotConfig,
            width: int) -> Catalog:
    """The dataset's rows from every rank's scan; :class:`UserError` (naming the dataset and the
    fix) when it has no labelled image, or more classes than features of ``width`` can fit."""
    tr = Rows.from_scans([s["train"] for s in scans], fc.max_train)
    va = Rows.from_scans([s["val"] for s in scans])
    where = f"fewshot.datasets[{ds.name}]"
    for side, rows, source in (("train", tr, ds.train), ("val", va, ds.val)):
        if len(rows.labels) == 0:
            raise UserError(f"{where}.{side}={source!r} holds no image with a usable label; few-shot evaluation "
                            f"needs labelled single-label shards: check them with `vitscale shards verify`")
    seen = int(max(tr.labels.max(), va.labels.max())) + 1
    known = max(train.num_classes or 0, val.num_classes or 0)
    if known and seen > known:
        raise UserError(f"{where}: labels go up to {seen - 1} but the shards' index says {known} classes; "
                        f"rewrite the shards with `vitscale shards write`")
    classes = max(known, seen)
    check_width(ds.name, classes, width)
    return Catalog(ds.name, train, val, tr, va, classes)


def check_width(name: str, classes: int, width: int) -> None:
    """A linear map of ``width`` features (+ intercept) has rank <= width + 1, while the
    one-vs-rest {-1, 1} codes of K classes have rank K: with K > width + 1 the fit cannot even
    reproduce its own targets, and the figure would measure the solver, not the features."""
    if classes > width + 1:
        raise UserError(f"fewshot.datasets[{name}] has {classes} classes but the model's features are {width}-d: "
                        f"a least-squares classifier on them separates at most {width + 1} classes; use a model "
                        f"with wider features (model.width / model.representation_size) or a dataset with fewer "
                        f"classes")


@dataclass
class FewshotPlan:
    """Which rows one evaluation of a dataset needs (pure function of the catalogue and config)."""

    subsets: dict[tuple[int, int], np.ndarray]  # (seed, k) -> train rows
    held_out: dict[int, np.ndarray]  # seed -> train rows for choosing l2 (empty without a grid)
    val_rows: np.ndarray
    short: dict[int, dict[int, int]] = field(default_factory=dict)  # k -> {class: train images it has}

    def train_rows(self) -> np.ndarray:
        parts = [*self.subsets.values(), *self.held_out.values()]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    def digest(self, seed: int, k: int) -> str:
        """A short fingerprint of the (seed, k) subset, logged so runs can be compared."""
        return hashlib.sha256(np.sort(self.subsets[(seed, k)]).tobytes()).hexdigest()[:12]


def plan(cat: Catalog, fc: FewshotConfig) -> FewshotPlan:
    subsets, held = {}, {}
    top = max(fc.shots)
    counts = np.bincount(cat.train.labels, minlength=cat.num_classes)
    for seed in range(fc.seeds):
        orders = class_orders(cat.train.labels, cat.num_classes, seed)
        for k in fc.shots:
            subsets[(seed, k)] = np.concatenate([o[:k] for o in orders])
        if fc.choose_l2:
            held[seed] = np.concatenate([o[top:top + fc.holdout] for o in orders])
            if len(held[seed]) == 0:
                raise UserError(f"fewshot.datasets[{cat.name}]: fewshot.l2 is a grid but no train image is left "
                                f"beyond {top} per class to choose it on; give one l2 value (fewshot.l2, --l2), "
                                f"or a train set with more than {top} images per class")
    short = {k: {c: int(n) for c, n in enumerate(counts) if n < k} for k in fc.shots}
    return FewshotPlan(subsets, held, val_subset(len(cat.val.labels), fc.max_val),
                       {k: v for k, v in short.items() if v})


def short_line(cat: Catalog, p: FewshotPlan) -> str | None:
    """One warning line when classes have fewer train images than some k, else None."""
    if not p.short:
        return None
    k = max(p.short)
    worst = sorted(p.short[k].items(), key=lambda kv: kv[1])[:5]
    named = ", ".join(f"class {c}: {n}" for c, n in worst)
    return (f"warning: fewshot {cat.name}: {len(p.short[k])} of {cat.num_classes} classes have fewer than {k} "
            f"train images ({named}{', ...' if len(p.short[k]) > 5 else ''}); their {k}-shot sets use what there "
            f"is. Lower fewshot.shots, or give fewshot.datasets[{cat.name}].train more images per class "
            f"(or raise fewshot.max_train)")


def unreadable_line(name: str, n: int) -> str:
    return (f"warning: fewshot {name}: {n} planned images could not be read or decoded and were left out; check "
            f"the shards with `vitscale shards verify`")


def wanted(rows: Rows, ids: np.ndarray) -> dict[tuple[int, int], int]:
    """``{(shard, position): row id}`` for the rows ``ids`` (what :class:`SelectedImages` reads)."""
    return {(int(rows.ref[i, 0]), int(rows.ref[i, 1])): int(i) for i in ids}


@dataclass
class Features:
    """Features of some rows: ``x[j]`` belongs to row ``ids[j]`` (ids sorted); ``ok[j]`` False
    where the image could not be decoded (those rows are left out of fits and scores)."""

    ids: np.ndarray  # (m,) int64, sorted
    x: np.ndarray  # (m, D)
    ok: np.ndarray  # (m,) bool

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(features, rows) of the usable ones among ``rows``."""
        j = np.searchsorted(self.ids, rows)
        keep = self.ok[j]
        return self.x[j[keep]], rows[keep]


def score(cat: Catalog, p: FewshotPlan, fc: FewshotConfig, train: Features, val: Features) -> dict:
    """Accuracy per k: mean and std over seeds, per-seed values, the l2 used (grid), the subsets'
    digests; and the val images scored."""
    val_x, vrows = val.take(p.val_rows)
    out: dict = {}
    for k in fc.shots:
        accs, l2s, digests = [], [], []
        for seed in range(fc.seeds):
            x, rows = train.take(p.subsets[(seed, k)])
            l2 = fc.l2_grid[0]
            if len(rows) == 0:
                accs.append(0.0)
                l2s.append(l2)
                digests.append(p.digest(seed, k))
                continue
            cache = lsq.fit(x, cat.train.labels[rows], cat.num_classes)
            if fc.choose_l2:
                hx, held = train.take(p.held_out[seed])
                l2 = lsq.choose_l2(cache, hx, cat.train.labels[held], fc.l2_grid)
            accs.append(lsq.accuracy(cache, val_x, cat.val.labels[vrows], l2))
            l2s.append(l2)
            digests.append(p.digest(seed, k))
        key = f"{cat.name}/{k}shot"
        out[key] = float(np.mean(accs))
        out[f"{key}_std"] = float(np.std(accs))
        out[f"{key}_seeds"] = accs
        if fc.choose_l2:
            out[f"{key}_l2"] = l2s
        out[f"{key}_subsets"] = digests
    out[f"{cat.name}/val_images"] = int(len(vrows))
    out[f"{cat.name}/unreadable"] = int((~train.ok).sum() + (~val.ok).sum())  # planned images that did not decode
    out[f"{cat.name}/classes"] = cat.num_classes
    return out


def collect_features(pairs, forward, ids: list[np.ndarray], width: int, device) -> list[tuple[torch.Tensor,
                                                                                           torch.Tensor]]:
    """Run ``forward`` (uint8 images -> (B, width) features) on every batch of ``pairs``
    (``(job, batch)`` from :class:`~pretrain.data.fewshot.SelectedImages`, padding included, so
    that every process runs the same forwards); returns per job this process's (len(ids[job]),
    width) float32 features and a float ok-mask on ``device``, zero where another process (or a
    failed image) holds the row, ready to be summed over processes."""
    out = [(torch.zeros(len(i), width, dtype=torch.float32, device=device),
            torch.zeros(len(i), dtype=torch.float32, device=device)) for i in ids]
    for job, batch in pairs:
        feats = forward(batch.images)
        if job < 0 or not batch.valid.any():
            continue
        x, ok = out[job]
        j = torch.from_numpy(np.searchsorted(ids[job], batch.targets[batch.valid].numpy())).to(device)
        x[j] = feats[batch.valid.to(feats.device)].float().to(device)
        ok[j] = 1.0
    return out


def result_cells(result: dict, fc: FewshotConfig) -> str:
    """``pets 1shot 31.2±1.4%  5shot ... | cifar ...`` (mean ± std over seeds)."""
    parts = []
    for name in [d.name for d in fc.datasets if f"{d.name}/{fc.shots[0]}shot" in result]:
        cells = [f"{k}shot {100 * result[f'{name}/{k}shot']:.1f}±{100 * result[f'{name}/{k}shot_std']:.1f}%"
                 for k in fc.shots]
        parts.append(f"{name} " + "  ".join(cells))
    return " | ".join(parts)


def result_line(step: int, result: dict, fc: FewshotConfig) -> str:
    """``fewshot @ step 500: pets 1shot 31.2±1.4%  5shot ...`` for the console."""
    return f"fewshot @ step {step}: {result_cells(result, fc)}"


def evaluate_model(model, fc: FewshotConfig, img_size: int, batch_size: int = 64, workers: int = 0,
                   crop_pct: float = 1.0) -> dict:
    """Few-shot accuracy of a plain model (one process, eval mode, its device) on every dataset
    of ``fc``: :func:`score`'s keys plus ``seconds``, ``feature_seconds``, ``solve_seconds``,
    ``images`` and ``short`` (``{name: {k: {class: images}}}`` for classes short of shots)."""
    from pretrain.data.fewshot import SelectedImages
    from pretrain.data.transforms import normalize

    t0 = time.perf_counter()
    device = next(model.parameters()).device
    width = feature_width(model.spec)
    sets = []
    for ds in fc.datasets:
        train_set, val_set = resolve_dataset(ds)
        cat = catalog(ds, train_set, val_set, [scan_dataset(train_set, val_set, fc, 0, 1)], fc, width)
        sets.append((cat, plan(cat, fc)))
    jobs, ids = fewshot_jobs(sets)
    source = SelectedImages(jobs, 0, 1, batch_size, img_size, crop_pct, workers)
    t = time.perf_counter()
    with torch.no_grad():
        feats = collect_features(source, lambda b: model(normalize(b.to(device)), pre_logits=True), ids, width,
                                 device)
    feature_s = time.perf_counter() - t
    tables = [Features(i, x.cpu().numpy(), ok.cpu().numpy() > 0) for i, (x, ok) in zip(ids, feats, strict=True)]
    t = time.perf_counter()
    out: dict = {"short": {cat.name: dict(p.short) for cat, p in sets if p.short}}
    for n, (cat, p) in enumerate(sets):
        out.update(score(cat, p, fc, tables[2 * n], tables[2 * n + 1]))
    solve_s = time.perf_counter() - t
    out.update(seconds=time.perf_counter() - t0, feature_seconds=feature_s, solve_seconds=solve_s,
               images=int(sum(f.ok.sum() for f in tables)))
    return out


def fewshot_jobs(sets: list[tuple[Catalog, FewshotPlan]]) -> tuple[list, list[np.ndarray]]:
    """The (shard set, wanted rows) jobs of every dataset (train, then val) and their row ids."""
    jobs, ids = [], []
    for cat, p in sets:
        for shards, rows, need in ((cat.train_shards, cat.train, p.train_rows()), (cat.val_shards, cat.val,
                                                                                     p.val_rows)):
            jobs.append((shards, wanted(rows, need)))
            ids.append(need)
    return jobs, ids
