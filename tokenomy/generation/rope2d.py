"""2D rotary position embedding (LlamaGen / RandAR): half the rotation pairs encode the row, half the column."""
from __future__ import annotations

import torch


def axis_frequencies(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    pairs = head_dim // 2
    return 1.0 / base ** (torch.arange(0, pairs, 2)[: pairs // 2].float() / pairs)


def grid_angles(rows: int, cols: int, head_dim: int, base: float = 10000.0, train_grid: int | None = None,
                ntk_boundary: int = 2) -> torch.Tensor:
    """Rotation angles [rows*cols, head_dim/2] of every grid cell, row-major.

    With `train_grid` smaller than the grid (resolution extrapolation) the first `ntk_boundary` frequency slots of
    each axis keep extrapolated positions and the rest use positions squeezed into the trained range (NTK mixing).
    """
    freqs = axis_frequencies(head_dim, base)
    r, c = torch.meshgrid(torch.arange(rows).float(), torch.arange(cols).float(), indexing="ij")
    r, c = r.flatten()[:, None], c.flatten()[:, None]
    row_angles, col_angles = r * freqs, c * freqs
    if train_grid is not None and (rows > train_grid or cols > train_grid):
        slot = torch.arange(freqs.numel())
        extrapolate = slot < ntk_boundary
        row_angles = torch.where(extrapolate, row_angles, r * (train_grid / rows) * freqs)
        col_angles = torch.where(extrapolate, col_angles, c * (train_grid / cols) * freqs)
    return torch.cat([row_angles, col_angles], dim=-1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D], angles [B, L, D/2] -> x with consecutive (even, odd) channel pairs rotated."""
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)
