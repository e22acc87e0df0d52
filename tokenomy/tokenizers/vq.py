"""Vector quantizer with l2-normalised codes (TiTok / LlamaGen style) and straight-through gradients."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenomy.errors import InputError, ShapeError


class VectorQuantizer(nn.Module):
    """Nearest-code lookup; with `l2_norm` both latents and codes live on the unit sphere (cosine matching)."""

    def __init__(self, codebook_size: int = 512, dim: int = 8, beta: float = 0.25, l2_norm: bool = True):
        super().__init__()
        self.codebook_size, self.dim, self.beta, self.l2_norm = codebook_size, dim, beta, l2_norm
        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def codebook(self) -> torch.Tensor:
        weight = self.embedding.weight.float()
        return F.normalize(weight, dim=-1) if self.l2_norm else weight

    def forward(self, z: torch.Tensor):
        """z: [..., dim] -> (quantized z with straight-through gradient, ids [...], commitment+codebook loss)."""
        if z.shape[-1] != self.dim:
            raise ShapeError(f"VectorQuantizer of dim {self.dim} got latent of last dim {z.shape[-1]}")
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            if self.l2_norm:
                z = F.normalize(z, dim=-1)
            codes = self.codebook()
            flat = z.reshape(-1, self.dim)
            distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)[None]
            ids = distances.argmin(1).view(z.shape[:-1])
            quantized = codes[ids]
            loss = self.beta * (quantized.detach() - z).pow(2).mean() + (quantized - z.detach()).pow(2).mean()
            quantized = z + (quantized - z).detach()
        return quantized, ids, loss

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise InputError(f"VQ ids must lie in [0, {self.codebook_size}), got range [{int(ids.min())}, {int(ids.max())}]")
        return self.codebook()[ids.long()]
