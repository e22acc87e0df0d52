"""Transformer pieces shared by the tokenizers: a pre-LN ViT block and an adaLN-zero block for the flow decoder."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class Mlp(nn.Sequential):
    def __init__(self, width: int, ratio: float = 4.0):
        hidden = int(width * ratio)
        super().__init__(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


class ViTBlock(nn.Module):
    """Pre-LN block; `mask` is a boolean [L, L] (True = may attend), as SDPA takes it."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width), Attention(width, heads)
        self.norm2, self.mlp = nn.LayerNorm(width), Mlp(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class AdaLNZeroBlock(nn.Module):
    """DiT block: shift/scale/gate for attention and MLP come from a per-token conditioning vector.

    The modulation layer starts at zero, so every block is the identity at initialisation.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn, self.mlp = Attention(width, heads), Mlp(width)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None, merge_r: int = 0,
                protected: tuple = ()) -> torch.Tensor:
        """With merge_r > 0, ToMe-SD: attention and MLP run on x with its merge_r most redundant tokens merged
        (bipartite matching on x through tokenomy.kernels, `protected` positions never merged), and their
        outputs are unmerged back to every position before the gated residual add."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond).chunk(6, dim=-1)
        if merge_r <= 0:
            x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1, mask)
            return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)
        from tokenomy.kernels import tome

        plan = tome.match(x.contiguous(), merge_r, protected)
        merged = lambda h: tome.merge(h.contiguous(), plan)[0]
        x = x + gate1 * tome.unmerge(self.attn(merged(self.norm1(x) * (1 + scale1) + shift1)), plan)
        return x + gate2 * tome.unmerge(self.mlp(merged(self.norm2(x) * (1 + scale2) + shift2)), plan)


def timestep_embedding(t: torch.Tensor, width: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of a continuous time t in [0, 1] (scaled by 1000 as in DiT)."""
    half = width // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C p p], row-major over the patch grid."""
    batch, channels, height, width = images.shape
    x = images.view(batch, channels, height // patch, patch, width // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // patch) * (width // patch), channels * patch * patch)


def unpatchify(tokens: torch.Tensor, patch: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    batch = tokens.shape[0]
    rows, cols = grid
    x = tokens.view(batch, rows, cols, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(batch, channels, rows * patch, cols * patch)
