"""2D grid VQ tokenizer: a small convolutional autoencoder whose f4 latent grid is vector-quantized."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenomy.tokenizers.base import ImageTokenizer, register
from tokenomy.tokenizers.vq import VectorQuantizer


@dataclass
class GridVQConfig:
    image_size: int = 32
    channels: int = 64
    downsample: int = 4
    codebook_size: int = 256
    code_dim: int = 8


def _res_block(channels: int) -> nn.Module:
    return nn.Sequential(nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))


@register("grid_vq")
class GridVQTokenizer(ImageTokenizer):
    config_class = GridVQConfig

    def __init__(self, config: GridVQConfig = GridVQConfig()):
        super().__init__(config)
        width, stages = config.channels, config.downsample.bit_length() - 1
        down = [nn.Conv2d(3, width, 3, padding=1)]
        for _ in range(stages):
            down += [nn.SiLU(), nn.Conv2d(width, width, 4, stride=2, padding=1)]
        self.encoder = nn.Sequential(*down)
        self.encoder_res = _res_block(width)
        self.to_code = nn.Conv2d(width, config.code_dim, 1)
        self.quantizer = VectorQuantizer(config.codebook_size, config.code_dim)
        self.from_code = nn.Conv2d(config.code_dim, width, 1)
        self.decoder_res = _res_block(width)
        up = []
        for _ in range(stages):
            up += [nn.SiLU(), nn.ConvTranspose2d(width, width, 4, stride=2, padding=1)]
        self.decoder = nn.Sequential(*up, nn.SiLU(), nn.Conv2d(width, 3, 3, padding=1))

    @property
    def grid(self) -> tuple[int, int]:
        side = self.config.image_size // self.config.downsample
        return side, side

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    def _quantize(self, images):
        h = self.encoder(images)
        h = self.to_code(h + self.encoder_res(h)).permute(0, 2, 3, 1)
        return self.quantizer(h)

    def _decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        h = self.from_code(codes.permute(0, 3, 1, 2))
        return self.decoder(h + self.decoder_res(h))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return self._quantize(images)[1].flatten(1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        codes = self.quantizer.ids_to_codes(ids).view(ids.shape[0], *self.grid, -1)
        return self._decode_codes(codes).clamp(-1, 1)

    def loss(self, images: torch.Tensor, generator=None):
        quantized, ids, vq_loss = self._quantize(images)
        recon = self._decode_codes(quantized)
        pixel = F.l1_loss(recon, images) + F.mse_loss(recon, images)
        return pixel + vq_loss, {"pixel": pixel.item(), "vq": vq_loss.item()}
