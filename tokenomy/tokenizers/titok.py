"""TiTok-style 1D tokenizer: a ViT reads image patches plus K learned latent tokens; only the latents are quantized."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenomy.errors import InputError
from tokenomy.tokenizers.base import ImageTokenizer, register
from tokenomy.tokenizers.blocks import ViTBlock, patchify, unpatchify
from tokenomy.tokenizers.vq import VectorQuantizer


@dataclass
class TiTokConfig:
    image_size: int = 32
    patch_size: int = 4
    width: int = 128
    depth: int = 4
    heads: int = 4
    num_latent_tokens: int = 16
    codebook_size: int = 512
    code_dim: int = 8


@register("titok")
class TiTokTokenizer(ImageTokenizer):
    config_class = TiTokConfig

    def __init__(self, config: TiTokConfig = TiTokConfig()):
        super().__init__(config)
        c = config
        self.grid = (c.image_size // c.patch_size, c.image_size // c.patch_size)
        num_patches, patch_dim, scale = self.grid[0] * self.grid[1], 3 * c.patch_size**2, c.width**-0.5
        self.patch_embed = nn.Linear(patch_dim, c.width)
        self.patch_pos = nn.Parameter(scale * torch.randn(num_patches, c.width))
        self.latent_tokens = nn.Parameter(scale * torch.randn(c.num_latent_tokens, c.width))
        self.latent_pos = nn.Parameter(scale * torch.randn(c.num_latent_tokens, c.width))
        self.encoder = nn.ModuleList(ViTBlock(c.width, c.heads) for _ in range(c.depth))
        self.encoder_norm = nn.LayerNorm(c.width)
        self.to_code = nn.Linear(c.width, c.code_dim)
        self.quantizer = VectorQuantizer(c.codebook_size, c.code_dim)
        self.from_code = nn.Linear(c.code_dim, c.width)
        self.mask_token = nn.Parameter(scale * torch.randn(c.width))
        self.decoder_patch_pos = nn.Parameter(scale * torch.randn(num_patches, c.width))
        self.decoder_latent_pos = nn.Parameter(scale * torch.randn(c.num_latent_tokens, c.width))
        self.decoder = nn.ModuleList(ViTBlock(c.width, c.heads) for _ in range(c.depth))
        self.decoder_norm = nn.LayerNorm(c.width)
        self.to_pixels = nn.Linear(c.width, patch_dim)

    @property
    def num_tokens(self) -> int:
        return self.config.num_latent_tokens

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    def _quantize(self, images):
        patches = self.patch_embed(patchify(images, self.config.patch_size)) + self.patch_pos
        latents = (self.latent_tokens + self.latent_pos).expand(images.shape[0], -1, -1)
        x = torch.cat([patches, latents], dim=1)
        for block in self.encoder:
            x = block(x)
        latent_out = self.encoder_norm(x[:, -self.num_tokens :])
        return self.quantizer(self.to_code(latent_out))

    def _decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        batch = codes.shape[0]
        masks = (self.mask_token + self.decoder_patch_pos).expand(batch, -1, -1)
        x = torch.cat([masks, self.from_code(codes) + self.decoder_latent_pos], dim=1)
        for block in self.decoder:
            x = block(x)
        pixels = self.to_pixels(self.decoder_norm(x[:, : masks.shape[1]]))
        return unpatchify(pixels, self.config.patch_size, 3, self.grid)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return self._quantize(images)[1]

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.shape[1] != self.num_tokens:
            raise InputError(f"TiTok decodes exactly {self.num_tokens} tokens per image, got ids of shape {tuple(ids.shape)}")
        return self._decode_codes(self.quantizer.ids_to_codes(ids)).clamp(-1, 1)

    def loss(self, images: torch.Tensor, generator=None):
        quantized, ids, vq_loss = self._quantize(images)
        recon = self._decode_codes(quantized)
        pixel = F.l1_loss(recon, images) + F.mse_loss(recon, images)
        return pixel + vq_loss, {"pixel": pixel.item(), "vq": vq_loss.item()}
