"""Tensors sharded over ranks as flat partitions, described by fragment tables.

A rank's state holds ``flats`` (one flat tensor per parameter group) and ``table`` (a list of
:class:`Fragment` as dicts): which piece of which parameter sits where in those flats. From the
tables of every rank a full tensor per parameter can be assembled (:func:`assemble`), and the
partitions of another layout (another world size) can be filled from the old ones
(:func:`reshard`), piece by piece, with nothing but copies. The EMA weights
(:mod:`pretrain.train.ema`) are saved this way in every rank's checkpoint file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Fragment:
    """A piece of parameter ``name`` held by one rank: ``numel`` values from ``start`` in the
    flattened parameter, at ``offset`` in partition ``group``."""

    name: str
    start: int
    numel: int
    group: int
    offset: int


def _pieces(states: list[dict]) -> dict[str, list[tuple[Fragment, torch.Tensor]]]:
    out: dict[str, list[tuple[Fragment, torch.Tensor]]] = {}
    for state in states:
        for f in (Fragment(**d) for d in state["table"]):
            out.setdefault(f.name, []).append((f, state["flats"][f.group]))
    return out


@torch.no_grad()
def reshard(old_states: list[dict], table: list[Fragment], flats: list[torch.Tensor]) -> None:
    """Fill ``flats`` (laid out as ``table``) from the old ranks' states, wherever they overlap."""
    pieces = _pieces(old_states)
    for mine in table:
        for old, flat in pieces.get(mine.name, []):
            lo, hi = max(mine.start, old.start), min(mine.start + mine.numel, old.start + old.numel)
            if lo < hi:
                src = flat.narrow(0, old.offset + lo - old.start, hi - lo)
                flats[mine.group].narrow(0, mine.offset + lo - mine.start, hi - lo).copy_(src)


def assemble(states: list[dict]) -> dict[str, torch.Tensor]:
    """Full fp32 tensors by parameter name from every rank's state (``shapes`` names the shapes);
    a :class:`ValueError` names a parameter whose pieces do not cover it."""
    shapes = states[0]["shapes"]
    out = {}
    for name, pieces in _pieces(states).items():
        full = torch.zeros(torch.Size(shapes[name]).numel())
        covered = 0
        for f, flat in pieces:
            full.narrow(0, f.start, f.numel).copy_(flat.narrow(0, f.offset, f.numel))
            covered += f.numel
        if covered != full.numel():
            raise ValueError(f"{name}: the ranks' pieces cover {covered} of {full.numel()} values")
        out[name] = full.view(shapes[name])
    missing = sorted(set(shapes) - set(out))
    if missing:
        raise ValueError(f"no rank holds a piece of {', '.join(missing)}")
    return out
