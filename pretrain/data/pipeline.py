"""Input pipelines behind one small interface, with resumable state.

A train source yields :class:`~pretrain.data.batch.Batch` objects, one micro batch per call of
``next_batch()``, and its ``state_dict()`` (epoch, position, bad-sample counts) goes into every
checkpoint so a resumed run continues with exactly the next samples. Data order is a pure
function of (seed, epoch, position). An eval source is an iterable of batches with ``expected``
(samples the set holds, when known) and ``bad`` (unusable samples, after iterating).
``data.train`` / ``data.val`` pick the source: ``synthetic`` (:mod:`pretrain.data.synthetic`) or
WebDataset shards (:mod:`pretrain.data.loader`).
"""

from __future__ import annotations

from pretrain.data.config import LoaderSpec
from pretrain.data.loader import ShardEval, ShardTrain
from pretrain.data.synthetic import SyntheticEval, SyntheticTrain


def build_train_data(spec: LoaderSpec, rank: int, world: int) -> ShardTrain | SyntheticTrain:
    if spec.data.train == "synthetic":
        return SyntheticTrain(spec, rank, world)
    return ShardTrain(spec, rank, world)


def build_eval_data(spec: LoaderSpec, rank: int, world: int) -> ShardEval | SyntheticEval | None:
    """The ``data.val`` source, or None when ``data.val`` is unset."""
    if not spec.data.val:
        return None
    if spec.data.val == "synthetic":
        return SyntheticEval(spec, rank, world)
    return ShardEval(spec, rank, world, spec.data.val)
