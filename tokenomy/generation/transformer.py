"""LlamaGen-style decoder trunk (RMSNorm, SwiGLU, 2D RoPE) with a KV cache written at explicit buffer positions.

Writing K/V at given indices (instead of appending) is what lets RandAR overwrite provisional entries when a
parallel step is rewritten into the training layout; the raster model simply writes at consecutive indices.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenomy.generation.rope2d import apply_rope


@dataclass
class TransformerConfig:
    width: int = 128
    depth: int = 4
    heads: int = 4
    ffn_multiple_of: int = 64
    dropout: float = 0.0


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class KVCache:
    """Preallocated [B, H, length, D] key/value buffers, one pair per layer."""

    def __init__(self, depth: int, batch: int, heads: int, length: int, head_dim: int, device=None, dtype=torch.float32):
        self.keys = [torch.zeros(batch, heads, length, head_dim, device=device, dtype=dtype) for _ in range(depth)]
        self.values = [torch.zeros_like(k) for k in self.keys]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x, rope, input_pos=None, cache: KVCache | None = None, layer: int = 0):
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            cache.keys[layer][:, :, input_pos] = k
            cache.values[layer][:, :, input_pos] = v
            # a query at buffer index i sees every entry at index <= i: exactly the causal training layout
            mask = torch.arange(cache.length, device=x.device)[None] <= input_pos[:, None]
            out = F.scaled_dot_product_attention(q, cache.keys[layer], cache.values[layer], attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class SwiGLU(nn.Module):
    def __init__(self, width: int, multiple_of: int):
        super().__init__()
        hidden = int(2 * 4 * width / 3)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        self.gate, self.up = nn.Linear(width, hidden, bias=False), nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.attention_norm, self.attention = RMSNorm(config.width), Attention(config.width, config.heads)
        self.ffn_norm, self.ffn = RMSNorm(config.width), SwiGLU(config.width, config.ffn_multiple_of)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, input_pos=None, cache=None, layer=0):
        x = x + self.dropout(self.attention(self.attention_norm(x), rope, input_pos, cache, layer))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class Trunk(nn.Module):
    """Stack of blocks + final norm + zero-initialised output head."""

    def __init__(self, config: TransformerConfig, vocab_size: int):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = RMSNorm(config.width)
        self.head = nn.Linear(config.width, vocab_size, bias=False)
        nn.init.zeros_(self.head.weight)

    @property
    def head_dim(self) -> int:
        return self.config.width // self.config.heads

    def new_cache(self, batch: int, length: int, device=None) -> KVCache:
        return KVCache(self.config.depth, batch, self.config.heads, length, self.head_dim, device)

    def forward(self, x, rope, input_pos=None, cache=None):
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, input_pos, cache, layer)
        return self.head(self.norm(x))
