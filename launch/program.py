"""How launchers that run a program on every rank (DeepSpeed, accelerate) are told to run vitscale."""

from __future__ import annotations


def program_args(vitscale: list[str]) -> list[str]:
    """``--no_python SCRIPT`` for an installed console script, ``--module pretrain`` for
    ``[python, -m, pretrain]``; both launchers accept these two forms."""
    if len(vitscale) == 1:
        return ["--no_python", vitscale[0]]
    if len(vitscale) == 3 and vitscale[1] == "-m":
        return ["--module", vitscale[2]]
    raise ValueError(f"vitscale command must be [script] or [python, -m, module], got {vitscale}")
