"""2D rotary position embedding (LlamaGen / RandAR / ARPG): half the rotation pairs encode the row, half the column.

Rotations are tables of (cos, sin) per channel pair, [..., D/2, 2], as the official `freqs_cis`. A table is more
than angles can say: the official condition-token row is cos = sin = 0, which zeroes that token's query and key
in every layer (every query then scores the condition key exactly 0), while a zero angle (cos = 1) leaves it be.
"""
from __future__ import annotations

import torch

from tokenomy.errors import UnknownNameError

# "zero": the official row (cos = sin = 0); "identity": angle 0, which tokenomy's models trained before the fix used
CONDITION_ROPE = ("zero", "identity")


def axis_frequencies(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    pairs = head_dim // 2
    return 1.0 / base ** (torch.arange(0, pairs, 2)[: pairs // 2].float() / pairs)


def _axis_positions(size: int, train_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(extrapolated, interpolated) positions of one axis; interpolation spreads the trained range 0..train-1 over
    the whole axis, endpoints included, as the official linspace(0, train - 1, size)."""
    extrapolated = torch.arange(size).float()
    if train_size is None or size <= train_size:
        return extrapolated, extrapolated
    return extrapolated, torch.linspace(0, train_size - 1, size)


def grid_angles(rows: int, cols: int, head_dim: int, base: float = 10000.0, train_grid: int | None = None,
                ntk_boundary: int = 2) -> torch.Tensor:
    """Rotation angles [rows*cols, head_dim/2] of every grid cell, row-major.

    With `train_grid` smaller than the grid (resolution extrapolation, RandAR's
    precompute_freqs_cis_2d_extrapolation) the first `ntk_boundary` frequency slots of each axis keep the
    extrapolated positions and the rest use interpolated ones (NTK mixing).
    """
    freqs = axis_frequencies(head_dim, base)
    extrapolate = torch.arange(freqs.numel()) < ntk_boundary

    def axis(size):
        extra, inter = _axis_positions(size, train_grid)
        return torch.where(extrapolate, extra[:, None] * freqs, inter[:, None] * freqs)

    row_angles, col_angles = axis(rows), axis(cols)
    return torch.cat([row_angles[:, None].expand(-1, cols, -1), col_angles[None].expand(rows, -1, -1)], -1).flatten(0, 1)


def rotations(angles: torch.Tensor) -> torch.Tensor:
    """angles [..., D/2] -> rotation table [..., D/2, 2] of (cos, sin)."""
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def condition_rotation(kind: str, batch: int, head_dim: int, device=None) -> torch.Tensor:
    """Rotation row [B, 1, D/2, 2] of the class / condition token."""
    if kind not in CONDITION_ROPE:
        raise UnknownNameError("condition rope", kind, CONDITION_ROPE)
    row = torch.zeros(batch, 1, head_dim // 2, 2, device=device)
    if kind == "identity":
        row[..., 0] = 1.0
    return row


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D], rotation [B, L, D/2, 2] -> x with consecutive (even, odd) channel pairs rotated."""
    cos, sin = rotation[:, None, ..., 0], rotation[:, None, ..., 1]
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
    return rotated.flatten(-2).type_as(x)
