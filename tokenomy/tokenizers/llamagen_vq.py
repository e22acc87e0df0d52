"""LlamaGen's VQ tokenizer (FoundationVision/LlamaGen `VQ-16`, the tokenizer of RandAR and ARPG).

A taming-style convolutional encoder (GroupNorm-32 ResNet blocks, single-head attention at the lowest
resolution, stride-2 downsampling with right/bottom zero padding) maps images to z-channel features, a 1x1 conv
to the code dimension, and an l2-normalised codebook lookup gives one id per cell of the (size / 2^(levels-1))
grid, row-major. The decoder mirrors it with nearest-neighbour upsampling and one more ResNet block per level.

`load_llamagen_vq` reads the official `vq_ds16_c2i.pt` (weights under `model`), local paths only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenomy.errors import InputError
from tokenomy.tokenizers.base import ImageTokenizer, register
from tokenomy.tokenizers.vq import VectorQuantizer


@dataclass
class LlamaGenVQConfig:
    image_size: int = 256
    codebook_size: int = 16384
    code_dim: int = 8
    l2_norm: bool = True
    channels: int = 128
    channel_mult: tuple = (1, 1, 2, 2, 4)
    z_channels: int = 256
    res_blocks: int = 2


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1, self.conv1 = _group_norm(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2, self.conv2 = _group_norm(out_channels), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W cells with 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q, k, v = (f(h).flatten(2).transpose(1, 2) for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(out.transpose(1, 2).reshape(batch, channels, height, width))


class Stage(nn.Module):
    """ResNet blocks (each followed by attention at the lowest resolution), then an optional resampling conv."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, attention: bool, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(blocks))
        self.attentions = nn.ModuleList(AttnBlock(out_channels) for _ in range(blocks if attention else 0))
        self.resample = resample
        if resample is not None:
            self.resample_conv = nn.Conv2d(out_channels, out_channels, 3, stride=2 if resample == "down" else 1,
                                           padding=0 if resample == "down" else 1)

    def forward(self, x):
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions:
                x = self.attentions[i](x)
        if self.resample == "down":  # asymmetric padding, as the taming encoder
            x = self.resample_conv(F.pad(x, (0, 1, 0, 1)))
        elif self.resample == "up":
            x = self.resample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class Middle(nn.Sequential):
    def __init__(self, channels: int):
        super().__init__(ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels))


class ConvEncoder(nn.Module):
    def __init__(self, c: LlamaGenVQConfig):
        super().__init__()
        levels = len(c.channel_mult)
        widths = [c.channels * m for m in c.channel_mult]
        self.conv_in = nn.Conv2d(3, c.channels, 3, padding=1)
        self.stages = nn.ModuleList(
            Stage(c.channels if i == 0 else widths[i - 1], widths[i], c.res_blocks, i == levels - 1, "down" if i < levels - 1 else None)
            for i in range(levels))
        self.middle = Middle(widths[-1])
        self.norm_out, self.conv_out = _group_norm(widths[-1]), nn.Conv2d(widths[-1], c.z_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for stage in self.stages:
            x = stage(x)
        return self.conv_out(F.silu(self.norm_out(self.middle(x))))


class ConvDecoder(nn.Module):
    def __init__(self, c: LlamaGenVQConfig):
        super().__init__()
        levels = len(c.channel_mult)
        widths = [c.channels * m for m in reversed(c.channel_mult)]  # stage 0 works at the lowest resolution
        self.conv_in = nn.Conv2d(c.z_channels, widths[0], 3, padding=1)
        self.middle = Middle(widths[0])
        self.stages = nn.ModuleList(
            Stage(widths[max(i - 1, 0)], widths[i], c.res_blocks + 1, i == 0, "up" if i < levels - 1 else None)
            for i in range(levels))
        self.norm_out, self.conv_out = _group_norm(widths[-1]), nn.Conv2d(widths[-1], 3, 3, padding=1)

    def forward(self, z):
        x = self.middle(self.conv_in(z))
        for stage in self.stages:
            x = stage(x)
        return self.conv_out(F.silu(self.norm_out(x)))


@register("llamagen_vq")
class LlamaGenVQ(ImageTokenizer):
    config_class = LlamaGenVQConfig

    def __init__(self, config: LlamaGenVQConfig = LlamaGenVQConfig()):
        super().__init__(config)
        self.encoder = ConvEncoder(config)
        self.to_code = nn.Conv2d(config.z_channels, config.code_dim, 1)
        self.quantizer = VectorQuantizer(config.codebook_size, config.code_dim, l2_norm=config.l2_norm)
        self.from_code = nn.Conv2d(config.code_dim, config.z_channels, 1)
        self.decoder = ConvDecoder(config)

    @property
    def grid(self) -> int:
        return self.config.image_size // 2 ** (len(self.config.channel_mult) - 1)

    @property
    def num_tokens(self) -> int:
        return self.grid**2

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-quantization features [B, code_dim, g, g]."""
        return self.to_code(self.encoder(images))

    def ids_to_latents(self, ids: torch.Tensor) -> torch.Tensor:
        """Row-major ids [B, g*g] -> (l2-normalised) codes [B, code_dim, g, g]."""
        codes = self.quantizer.ids_to_codes(ids)
        return codes.view(ids.shape[0], self.grid, self.grid, -1).permute(0, 3, 1, 2)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        _, ids, _ = self.quantizer(self.latents(images).permute(0, 2, 3, 1))
        return ids.flatten(1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.shape[1] != self.num_tokens:
            raise InputError(f"LlamaGen VQ decodes {self.num_tokens} ids per image ({self.grid}x{self.grid}), got shape {tuple(ids.shape)}")
        return self.decoder(self.from_code(self.ids_to_latents(ids))).clamp(-1, 1)


# our name fragment -> official one; applied to every key of our model, this is the whole key table
_VQ_RENAMES = [
    ("quantizer.", "quantize."), ("to_code.", "quant_conv."), ("from_code.", "post_quant_conv."),
    (".stages.", ".conv_blocks."), (".resnets.", ".res."), (".attentions.", ".attn."), (".middle.", ".mid."),
    (".shortcut.", ".nin_shortcut."),
]


def llamagen_vq_key_table(model: LlamaGenVQ) -> dict[str, str]:
    """Official key -> our key for every parameter of `model` (resample convs are `downsample`/`upsample.conv`)."""
    table = {}
    for ours in model.state_dict():
        official = ours
        for fragment, replacement in _VQ_RENAMES:
            official = official.replace(fragment, replacement)
        if ".resample_conv." in official:
            direction = "downsample" if official.startswith("encoder.") else "upsample"
            official = official.replace(".resample_conv.", f".{direction}.conv.")
        table[official] = ours
    return table


def load_llamagen_vq(path, image_size: int = 256, channels: int = 128, channel_mult=(1, 1, 2, 2, 4),
                     z_channels: int = 256) -> LlamaGenVQ:
    """Our `LlamaGenVQ` from an official `vq_ds16_c2i.pt` (`model` key or raw); codebook size/dim from the weights.

    The architecture widths are not stored in the file: the defaults are VQ-16's (use channel_mult=(1, 2, 2, 4)
    for VQ-8). The usage buffer `quantize.codebook_used` (a training statistic) is dropped.
    """
    from tokenomy.generation.loaders import load_official_state, read_state_dict, require_keys

    state = read_state_dict(path)
    require_keys(state, ["quantize.embedding.weight", "quant_conv.weight"], path)
    codebook_size, code_dim = state["quantize.embedding.weight"].shape
    model = LlamaGenVQ(LlamaGenVQConfig(image_size=image_size, codebook_size=codebook_size, code_dim=code_dim, channels=channels,
                                        channel_mult=tuple(channel_mult), z_channels=z_channels))
    return load_official_state(model, state, llamagen_vq_key_table(model), path, ignored=("quantize.codebook_used",))
