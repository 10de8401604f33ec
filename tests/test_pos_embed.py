"""resample_pos_embed: the interpolation fine-tuning at a new resolution relies on."""

from __future__ import annotations

import pytest
import torch

from pretrain.model.pos_embed import resample_pos_embed


def _pos_embed(grid: tuple[int, int], dim: int = 8, prefix: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, prefix + grid[0] * grid[1], dim, generator=g)


def _grid(pe: torch.Tensor, grid: tuple[int, int], prefix: int = 1) -> torch.Tensor:
    return pe[0, prefix:].reshape(grid[0], grid[1], pe.shape[-1])


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_same_grid_is_identity(mode):
    pe = _pos_embed((5, 5))
    out = resample_pos_embed(pe, (5, 5), mode=mode)
    assert torch.equal(out, pe)
    assert out.data_ptr() != pe.data_ptr()


def test_linear_plane_stays_linear_under_bilinear():
    old, new, dim = (4, 4), (7, 10), 3
    a, b, c = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 0.25, -1.0]), torch.tensor([0.0, 1.0, 2.0])
    rows = torch.arange(old[0], dtype=torch.float32)[:, None, None]
    cols = torch.arange(old[1], dtype=torch.float32)[None, :, None]
    plane = a * rows + b * cols + c  # (4, 4, 3)
    cls = torch.full((1, 1, dim), 7.0)
    pe = torch.cat([cls, plane.reshape(1, -1, dim)], dim=1)

    out = resample_pos_embed(pe, new)

    r = torch.linspace(0, old[0] - 1, new[0])[:, None, None]  # align_corners: corners map to corners
    q = torch.linspace(0, old[1] - 1, new[1])[None, :, None]
    expected = a * r + b * q + c
    assert out.shape == (1, 1 + new[0] * new[1], dim)
    torch.testing.assert_close(_grid(out, new), expected, atol=1e-5, rtol=0)
    assert torch.equal(out[:, :1], cls)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_prefix_tokens_untouched(mode, prefix):
    pe = _pos_embed((3, 3), prefix=prefix)
    out = resample_pos_embed(pe, (6, 5), num_prefix_tokens=prefix, mode=mode)
    assert out.shape == (1, prefix + 30, pe.shape[-1])
    assert torch.equal(out[:, :prefix], pe[:, :prefix])


@pytest.mark.parametrize(("old", "new"), [((4, 4), (6, 6)), ((5, 5), (8, 8)), ((8, 8), (5, 5)),
                                          ((3, 5), (7, 4))])
def test_bilinear_matches_scipy_zoom_order1(old, new):
    ndimage = pytest.importorskip("scipy.ndimage")
    pe = _pos_embed(old, dim=6)
    grid = _grid(pe, old).double().numpy()
    expected = ndimage.zoom(grid, (new[0] / old[0], new[1] / old[1], 1), order=1)
    assert expected.shape == (*new, 6)

    out = resample_pos_embed(pe, new, old_grid=old)
    torch.testing.assert_close(_grid(out, new), torch.from_numpy(expected).float(), atol=1e-5, rtol=0)


def test_non_square_grids_are_row_major():
    old = (2, 3)
    pe = torch.arange(6, dtype=torch.float32).reshape(1, 6, 1)  # value = row * 3 + col
    out = resample_pos_embed(pe, (3, 5), old_grid=old, num_prefix_tokens=0)
    g = _grid(out, (3, 5), prefix=0)[..., 0]
    torch.testing.assert_close(g[:, 0], torch.tensor([0.0, 1.5, 3.0]))
    torch.testing.assert_close(g[0], torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0]))

    back = resample_pos_embed(out, old, old_grid=(3, 5), num_prefix_tokens=0)
    assert back.shape == (1, 6, 1)


def test_grid_errors():
    with pytest.raises(ValueError, match="not a square grid"):
        resample_pos_embed(_pos_embed((2, 3)), (4, 4))
    with pytest.raises(ValueError, match="old_grid 3x3"):
        resample_pos_embed(_pos_embed((2, 3)), (4, 4), old_grid=(3, 3))
    with pytest.raises(ValueError, match="shape"):
        resample_pos_embed(torch.zeros(2, 5, 4), (2, 2))


def test_unknown_mode_names_the_options():
    with pytest.raises(ValueError, match="bilinear or bicubic or timm"):
        resample_pos_embed(_pos_embed((2, 2)), (3, 3), mode="nearest")


def test_bicubic_runs_and_differs_from_bilinear():
    pe = _pos_embed((4, 4))
    cubic = resample_pos_embed(pe, (7, 7), mode="bicubic")
    linear = resample_pos_embed(pe, (7, 7), mode="bilinear")
    assert cubic.shape == linear.shape == (1, 50, pe.shape[-1])
    assert torch.isfinite(cubic).all()
    assert (cubic - linear).abs().max() > 1e-2


@pytest.mark.parametrize("grids", [((4, 4), (7, 7)), ((14, 14), (37, 37)), ((24, 24), (16, 16)), ((3, 5), (6, 4))])
def test_timm_mode_is_exactly_timms_resample_abs_pos_embed(grids):
    """Up, down and non-square: the "timm" mode gives timm's own result (antialiased bicubic)."""
    from timm.layers import resample_abs_pos_embed

    old, new = grids
    pe = _pos_embed(old)
    ours = resample_pos_embed(pe, new, old_grid=old, mode="timm")
    theirs = resample_abs_pos_embed(pe, list(new), old_size=list(old), num_prefix_tokens=1)
    assert torch.equal(ours, theirs)
    plain = resample_pos_embed(pe, new, old_grid=old, mode="bicubic")
    assert (plain - theirs).abs().max() > 1e-4  # torch's plain bicubic (a = -0.75) is another kernel


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "timm"])
def test_low_precision_in_same_dtype_out(mode):
    pe = _pos_embed((4, 4)).bfloat16()
    out = resample_pos_embed(pe, (6, 6), mode=mode)
    assert out.dtype == torch.bfloat16
    reference = resample_pos_embed(pe.float(), (6, 6), mode=mode)
    torch.testing.assert_close(out, reference.bfloat16())
    assert torch.equal(out[:, :1], pe[:, :1])
