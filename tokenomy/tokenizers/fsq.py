"""Finite scalar quantization (FSQ): each latent dimension is squashed and rounded onto a small integer grid."""
from __future__ import annotations

import math

import torch
from torch import nn

from tokenomy.errors import InputError, ShapeError


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return x + (x.round() - x).detach()


class FSQ(nn.Module):
    """Quantizer over a product lattice of `levels`; the code index is the mixed-radix number of the digits."""

    def __init__(self, levels=(8, 5, 5, 5), eps: float = 1e-3):
        super().__init__()
        if any(level < 2 for level in levels):
            raise InputError(f"FSQ levels must all be >= 2, got {tuple(levels)}")
        self.levels = tuple(int(level) for level in levels)
        self.eps = eps
        levels_t = torch.tensor(self.levels, dtype=torch.float64)
        self.register_buffer("_levels", levels_t.float(), persistent=False)
        self.register_buffer("_half_width", torch.floor(levels_t / 2).float(), persistent=False)
        radix = torch.cumprod(torch.tensor([1] + list(self.levels[:-1]), dtype=torch.int64), 0)
        self.register_buffer("_radix", radix, persistent=False)

    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        # even level counts need a half-step offset so the rounded grid has exactly L points
        half = (self._levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def forward(self, z: torch.Tensor):
        """z: [..., D] -> (codes in [-1, 1] with straight-through gradient, ids [...])."""
        if z.shape[-1] != self.dim:
            raise ShapeError(f"FSQ with {self.dim} levels got latent of last dim {z.shape[-1]}")
        with torch.autocast(z.device.type, enabled=False):
            codes = round_ste(self.bound(z.float())) / self._half_width
        return codes, self.codes_to_ids(codes)

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        digits = (codes * self._half_width + self._half_width).round().long()
        return (digits * self._radix).sum(-1)

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise InputError(f"FSQ ids must lie in [0, {self.codebook_size}), got range [{int(ids.min())}, {int(ids.max())}]")
        digits = (ids.long().unsqueeze(-1) // self._radix) % self._levels.long()
        return (digits.float() - self._half_width) / self._half_width
