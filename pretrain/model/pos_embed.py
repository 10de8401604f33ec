"""Resample a ViT's learned position embeddings to another patch grid.

A ViT learns one embedding per patch position; fine-tuning at a higher resolution (224 -> 384)
gives more patches, so the learned grid is interpolated to the new one. The prefix tokens
(the class token's slot) have no position and are carried over unchanged.

``bilinear`` (the default) uses ``align_corners=True``: the corner embeddings stay exactly in
the corners and output row ``i`` samples input row ``i * (old - 1) / (new - 1)``. That is what
``scipy.ndimage.zoom(order=1)`` computes, which is how the original vit_jax fine-tune code
resamples, so checkpoints fine-tuned there and here see the same embeddings.

``bicubic`` is torch's plain bicubic: Keys' cubic convolution with a = -0.75, half-pixel centres
(``align_corners=False``: each embedding is the value at the centre of its patch) and the grid's
edge values repeated beyond its border; no antialiasing, so it overshoots slightly between grid
points and is meant for upsampling.

``timm`` is exactly what ``timm.layers.resample_abs_pos_embed`` does by default, so a model
fine-tuned here sees the embeddings a timm fine-tune of the same checkpoint would: torch's
antialiased bicubic (``antialias=True``), whose kernel is a = -0.5 (PIL's) with its weights
renormalised where they fall outside the grid, half-pixel centres.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RESAMPLE_MODES = ("bilinear", "bicubic", "timm")


def _square_grid(num_tokens: int) -> tuple[int, int]:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"pos_embed has {num_tokens} grid tokens, which is not a square grid: pass old_grid=(rows, cols)"
        )
    return side, side


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Resample ``pos_embed`` (1, P + gh*gw, D) to (1, P + nh*nw, D) for ``new_grid = (nh, nw)``.

    The first ``num_prefix_tokens`` rows (P; 1 for a class token, 0 for big_vision-style
    embeddings without one) are kept bit for bit. The rest is read as a row-major (gh, gw, D)
    grid, the order in which the patch embed flattens (B, D, gh, gw), and interpolated.
    ``old_grid`` None means square. Interpolation runs in float32; the result has the input's
    dtype. Resampling to the same grid returns an equal copy. Raises ValueError for a bad shape,
    a grid that does not match the token count, or an unknown ``mode``.
    """
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"unknown pos-embed resample mode {mode!r}: choose {' or '.join(RESAMPLE_MODES)}")
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, tokens, dim), got {tuple(pos_embed.shape)}")
    num_grid = pos_embed.shape[1] - num_prefix_tokens
    if num_prefix_tokens < 0 or num_grid <= 0:
        raise ValueError(
            f"pos_embed has {pos_embed.shape[1]} tokens: too few for {num_prefix_tokens} prefix token(s) "
            f"and a grid"
        )
    gh, gw = _square_grid(num_grid) if old_grid is None else (int(old_grid[0]), int(old_grid[1]))
    if gh * gw != num_grid:
        raise ValueError(f"old_grid {gh}x{gw} = {gh * gw} tokens, but pos_embed has {num_grid} grid tokens")
    nh, nw = int(new_grid[0]), int(new_grid[1])
    if nh <= 0 or nw <= 0:
        raise ValueError(f"new_grid must be positive, got {tuple(new_grid)}")
    if (nh, nw) == (gh, gw):
        return pos_embed.clone()

    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid = grid.float().reshape(1, gh, gw, dim).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    if mode == "bilinear":
        grid = F.interpolate(grid, size=(nh, nw), mode="bilinear", align_corners=True)
    else:
        grid = F.interpolate(grid, size=(nh, nw), mode="bicubic", align_corners=False, antialias=mode == "timm")
    grid = grid.permute(0, 2, 3, 1).reshape(1, nh * nw, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
