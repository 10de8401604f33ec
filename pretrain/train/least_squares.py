"""Closed-form regularised least squares to {-1, 1}^K targets: the few-shot linear classifier.

The ViT paper's few-shot metric (and big_vision's ``fewshot_lsr`` evaluator) fits frozen features
``x`` (N, D) of a few labelled images to one-vs-rest targets ``2 * onehot(y) - 1`` (N, K) by ridge
regression and predicts the class with the largest score. Everything here is float64 numpy and
pure.

Contract of :func:`fit`:

- features are standardised with the training rows' per-dimension mean and std (+1e-5), as
  big_vision does, unless ``standardize=False``;
- the intercept is not penalised: features and targets are centred on the training rows and the
  intercept is the targets' mean (scikit-learn's ``Ridge(fit_intercept=True)``; big_vision
  approximates this with a constant feature of 100). So ``RidgeClassifier(alpha=l2)`` on the
  same (standardised) features predicts exactly the same classes;
- one Gram matrix serves every ``l2``: ``z^T z`` (D, D) when N >= D, else ``z z^T`` (N, N) (the
  dual form ``W = z^T (z z^T + l2 I)^-1 y``); each ``l2`` costs one (P, P) linear solve, which is
  cheaper than the eigen-decomposition big_vision caches for grids of up to ~20 values (measured
  with ``vitscale bench fewshot``: an eigh of 1280 x 1280 takes ~2 s on 2 CPU cores, a solve
  ~0.1 s). The right-hand side ``z^T y`` is twice the per-class sums of ``z`` (z is centred), an
  O(N D) pass instead of an (N, D) x (N, K) product.

A class without training rows gets a constant score of -1 (its targets are all -1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

STD_EPS = 1e-5


@dataclass(frozen=True)
class RidgeCache:
    """What :func:`fit` precomputes; :func:`scores` turns it into predictions for any l2."""

    mean: np.ndarray  # (D,) subtracted from features
    scale: np.ndarray  # (D,) features are divided by it (std + eps, or ones)
    y_mean: np.ndarray  # (K,) the intercept
    gram: np.ndarray  # (P, P): z^T z (primal, P = D) or z z^T (dual, P = N)
    rhs: np.ndarray  # (P, K): z^T yc (primal) or yc (dual)
    z: np.ndarray | None  # (N, D) standardised rows, kept for the dual form only
    _weights: dict = field(default_factory=dict, compare=False, repr=False)  # l2 -> (D, K)

    @property
    def num_classes(self) -> int:
        return int(self.y_mean.shape[0])


def targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N,) class indices -> (N, K) float64 with 1 at the label and -1 elsewhere."""
    y = -np.ones((len(labels), num_classes), dtype=np.float64)
    y[np.arange(len(labels)), labels] = 1.0
    return y


def fit(x: np.ndarray, labels: np.ndarray, num_classes: int, standardize: bool = True) -> RidgeCache:
    """Precompute the ridge solution of ``x`` (N, D) -> ``targets(labels)`` for every l2."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if x.ndim != 2 or len(x) != len(labels) or len(x) == 0:
        raise ValueError(f"fit needs features (N, D) and N labels with N > 0, got {x.shape} and {labels.shape}")
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + STD_EPS if standardize else np.ones(x.shape[1])
    z = (x - mean) / scale  # centred columns
    y = targets(labels, num_classes)
    y_mean = y.mean(axis=0)
    yc = y - y_mean
    n, d = z.shape
    if n >= d:
        class_sums = np.zeros((num_classes, d))
        np.add.at(class_sums, labels, z)
        return RidgeCache(mean, scale, y_mean, z.T @ z, 2.0 * class_sums.T, None)
    return RidgeCache(mean, scale, y_mean, z @ z.T, yc, z)


def weights(cache: RidgeCache, l2: float) -> np.ndarray:
    """(D, K) weights for ``l2`` > 0 (``(z^T z + l2 I)^-1 z^T y`` on the standardised, centred rows);
    computed once per l2 and kept in the cache."""
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    if l2 not in cache._weights:
        a = cache.gram + l2 * np.eye(len(cache.gram))
        w = np.linalg.solve(a, cache.rhs)
        cache._weights[l2] = w if cache.z is None else cache.z.T @ w
    return cache._weights[l2]


def scores(cache: RidgeCache, x: np.ndarray, l2: float) -> np.ndarray:
    """(M, K) class scores of features ``x`` (M, D)."""
    z = (np.asarray(x, dtype=np.float64) - cache.mean) / cache.scale
    return z @ weights(cache, l2) + cache.y_mean


def predict(cache: RidgeCache, x: np.ndarray, l2: float) -> np.ndarray:
    """(M,) predicted classes (ties: the lowest class index)."""
    return scores(cache, x, l2).argmax(axis=1)


def accuracy(cache: RidgeCache, x: np.ndarray, labels: np.ndarray, l2: float) -> float:
    if len(labels) == 0:
        return float("nan")
    return float((predict(cache, x, l2) == np.asarray(labels)).mean())


def choose_l2(cache: RidgeCache, x_held: np.ndarray, labels_held: np.ndarray, grid: tuple[float, ...]) -> float:
    """The ``l2`` of ``grid`` with the best accuracy on the held-out rows; among equals the
    largest (the most regularised fit is the safer one with few shots)."""
    accs = [accuracy(cache, x_held, labels_held, l2) for l2 in grid]
    best = max(accs)
    return max(l2 for l2, a in zip(grid, accs, strict=True) if a == best)
