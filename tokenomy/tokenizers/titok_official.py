"""The released TiTok tokenizers (bytedance/1d-tokenizer), architecture-exact, for loading official weights.

Encoder: [CLS ; conv-patchified image ; K learned latent tokens] (+ learned positions) -> ln_pre -> pre-LN ViT ->
ln_post of the K latent outputs -> 1x1 conv to the code size -> VQ. Decoder: [CLS ; mask token per patch ; the K
codes projected to width] -> ViT -> ln_post of the patch outputs, then
- legacy two-stage models (TiTok-L-32/B-64/S-128): 1x1 conv, tanh, 1x1 conv to logits over the 1024 MaskGIT-VQGAN
  codes; their softmax mixes the VQGAN codebook and the MaskGIT-VQGAN pixel decoder draws the image;
- single-stage models (TiTok-BL/SL VQ): 1x1 conv to p*p*3 values per patch, pixel shuffle, 3x3 conv.
The legacy encoder also reinterprets the [B, K, W] latent outputs as [B, W, K] without a transpose before its 1x1
conv (the released weights were trained that way), which `is_legacy` reproduces. The official models read and
write images in [0, 1]; this wrapper keeps tokenomy's [-1, 1] convention and converts at the edges.

`load_titok` reads a hub-mixin folder (config.json + model.safetensors / pytorch_model.bin) or a legacy
`tokenizer_titok_*.bin` with a named variant; local paths only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tokenomy.errors import InputError, ModelLoadError, UnknownNameError
from tokenomy.tokenizers.base import ImageTokenizer, register
from tokenomy.tokenizers.blocks import ViTBlock
from tokenomy.tokenizers.vq import VectorQuantizer

# vit_{enc,dec}_model_size -> (width, depth, heads), as hard-coded in the official TiTokEncoder/TiTokDecoder
TITOK_MODEL_SIZES = {"small": (512, 8, 8), "base": (768, 12, 12), "large": (1024, 24, 16)}


@dataclass
class OfficialTiTokConfig:
    image_size: int = 256
    encoder_patch: int = 16
    decoder_patch: int = 16
    encoder_width: int = 1024
    encoder_depth: int = 24
    encoder_heads: int = 16
    decoder_width: int = 1024
    decoder_depth: int = 24
    decoder_heads: int = 16
    num_latent_tokens: int = 32
    codebook_size: int = 4096
    token_size: int = 12
    use_l2_norm: bool = True
    is_legacy: bool = True
    finetune_decoder: bool = True  # two-stage: the decoder predicts MaskGIT-VQGAN codes, a pixel decoder follows
    # MaskGIT-VQGAN pixel decoder (fixed in the official code; configurable only so tests can stay tiny)
    pixel_channels: int = 128
    pixel_channel_mult: tuple = (1, 1, 2, 2, 4)
    pixel_res_blocks: int = 2
    pixel_codebook_size: int = 1024
    pixel_code_dim: int = 256


# the values of configs/infer/TiTok/*.yaml, for legacy .bin files that come without a config
TITOK_VARIANTS = {
    "titok_l32": dict(sizes=("large", "large"), num_latent_tokens=32, codebook_size=4096, token_size=12, use_l2_norm=True, is_legacy=True, finetune_decoder=True),
    "titok_b64": dict(sizes=("base", "base"), num_latent_tokens=64, codebook_size=4096, token_size=12, use_l2_norm=True, is_legacy=True, finetune_decoder=True),
    "titok_s128": dict(sizes=("small", "small"), num_latent_tokens=128, codebook_size=4096, token_size=12, use_l2_norm=True, is_legacy=True, finetune_decoder=True),
    "titok_bl64_vq8k": dict(sizes=("base", "large"), num_latent_tokens=64, codebook_size=8192, token_size=64, use_l2_norm=False, is_legacy=False, finetune_decoder=False),
    "titok_bl128_vq8k": dict(sizes=("base", "large"), num_latent_tokens=128, codebook_size=8192, token_size=64, use_l2_norm=False, is_legacy=False, finetune_decoder=False),
    "titok_sl256_vq8k": dict(sizes=("small", "large"), num_latent_tokens=256, codebook_size=8192, token_size=64, use_l2_norm=False, is_legacy=False, finetune_decoder=False),
}


class MaskGITResnetBlock(nn.Module):
    """MaskGIT-VQGAN's ResNet block: bias-free 3x3 convs ('same' padding)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(32, in_channels, eps=1e-6), nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2, self.conv2 = nn.GroupNorm(32, out_channels, eps=1e-6), nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(out_channels, out_channels, 1, bias=False) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        # when the width changes, the released weights add a 1x1 conv of h itself, not of the input
        return h + (self.shortcut(h) if self.shortcut is not None else x)


class MaskGITPixelDecoder(nn.Module):
    """VQGAN decoder without attention: stages run from the lowest resolution up, nearest upsampling + 3x3 conv."""

    def __init__(self, c: OfficialTiTokConfig):
        super().__init__()
        mult, levels = c.pixel_channel_mult, len(c.pixel_channel_mult)
        top = c.pixel_channels * mult[-1]
        self.conv_in = nn.Conv2d(c.pixel_code_dim, top, 3, padding=1)
        self.middle = nn.ModuleList(MaskGITResnetBlock(top, top) for _ in range(c.pixel_res_blocks))
        self.stages = nn.ModuleList()  # index = resolution level, 0 the finest (official order)
        for level in range(levels):
            stage = nn.Module()
            width_in = c.pixel_channels * mult[min(level + 1, levels - 1)]
            width_out = c.pixel_channels * mult[level]
            stage.resnets = nn.ModuleList(MaskGITResnetBlock(width_in if j == 0 else width_out, width_out) for j in range(c.pixel_res_blocks))
            if level != 0:
                stage.upsample_conv = nn.Conv2d(width_out, width_out, 3, padding=1)
            self.stages.append(stage)
        self.norm_out = nn.GroupNorm(32, c.pixel_channels * mult[0], eps=1e-6)
        self.conv_out = nn.Conv2d(c.pixel_channels * mult[0], 3, 3, padding=1)

    def forward(self, z):
        x = self.conv_in(z)
        for block in self.middle:
            x = block(x)
        for level in reversed(range(len(self.stages))):
            stage = self.stages[level]
            for block in stage.resnets:
                x = block(x)
            if level != 0:
                x = stage.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(x)))


class TiTokViT(nn.Module):
    """Shared skeleton of the official encoder and decoder: CLS + positions, ln_pre, blocks, ln_post."""

    def __init__(self, width: int, depth: int, heads: int, grid: int, num_latent_tokens: int):
        super().__init__()
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(1, width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid**2 + 1, width))
        self.latent_token_positional_embedding = nn.Parameter(scale * torch.randn(num_latent_tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(ViTBlock(width, heads) for _ in range(depth))
        self.ln_post = nn.LayerNorm(width)

    def run(self, grid_tokens, latents):
        """grid_tokens [B, g*g, W] (without CLS), latents [B, K, W] -> all outputs [B, 1 + g*g + K, W] after the blocks."""
        cls = self.class_embedding.expand(grid_tokens.shape[0], -1, -1)
        x = torch.cat([cls, grid_tokens], 1) + self.positional_embedding
        x = self.ln_pre(torch.cat([x, latents + self.latent_token_positional_embedding[: latents.shape[1]]], 1))
        for block in self.blocks:
            x = block(x)
        return x


@register("titok_official")
class OfficialTiTok(ImageTokenizer):
    config_class = OfficialTiTokConfig

    def __init__(self, config: OfficialTiTokConfig = OfficialTiTokConfig()):
        super().__init__(config)
        c = config
        if c.is_legacy != c.finetune_decoder:
            raise ModelLoadError("released TiTok tokenizers are either legacy two-stage (is_legacy and finetune_decoder) or "
                                 f"single-stage (neither); got is_legacy={c.is_legacy}, finetune_decoder={c.finetune_decoder}")
        self.encoder_grid, self.decoder_grid = c.image_size // c.encoder_patch, c.image_size // c.decoder_patch
        self.latent_tokens = nn.Parameter(c.encoder_width**-0.5 * torch.randn(c.num_latent_tokens, c.encoder_width))
        self.encoder = TiTokViT(c.encoder_width, c.encoder_depth, c.encoder_heads, self.encoder_grid, c.num_latent_tokens)
        self.encoder.patch_embed = nn.Conv2d(3, c.encoder_width, c.encoder_patch, stride=c.encoder_patch)
        self.encoder.conv_out = nn.Conv2d(c.encoder_width, c.token_size, 1)
        self.quantizer = VectorQuantizer(c.codebook_size, c.token_size, l2_norm=c.use_l2_norm)
        self.decoder = TiTokViT(c.decoder_width, c.decoder_depth, c.decoder_heads, self.decoder_grid, c.num_latent_tokens)
        self.decoder.decoder_embed = nn.Linear(c.token_size, c.decoder_width)
        self.decoder.mask_token = nn.Parameter(c.decoder_width**-0.5 * torch.randn(1, 1, c.decoder_width))
        if c.is_legacy:
            self.decoder.ffn = nn.Sequential(nn.Conv2d(c.decoder_width, 2 * c.decoder_width, 1), nn.Tanh(),
                                             nn.Conv2d(2 * c.decoder_width, c.pixel_codebook_size, 1))
            self.pixel_quantizer = nn.Embedding(c.pixel_codebook_size, c.pixel_code_dim)
            self.pixel_decoder = MaskGITPixelDecoder(c)
        else:
            self.decoder.ffn = nn.Sequential(nn.Conv2d(c.decoder_width, c.decoder_patch**2 * 3, 1))
            self.decoder.conv_out = nn.Conv2d(3, 3, 3, padding=1)

    @property
    def num_tokens(self) -> int:
        return self.config.num_latent_tokens

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    def latents(self, images01: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> pre-quantization latents [B, K, token_size]."""
        c, batch = self.config, images01.shape[0]
        patches = self.encoder.patch_embed(images01).flatten(2).transpose(1, 2)
        out = self.encoder.run(patches, self.latent_tokens.expand(batch, -1, -1))
        latent = self.encoder.ln_post(out[:, 1 + self.encoder_grid**2 :])
        if c.is_legacy:  # reinterpret memory, no transpose: token and channel axes get mixed, as in training
            latent = latent.reshape(batch, c.encoder_width, c.num_latent_tokens, 1)
        else:
            latent = latent.transpose(1, 2)[..., None]
        return self.encoder.conv_out(latent)[..., 0].transpose(1, 2)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Quantized codes [B, K, token_size] -> images in [0, 1] (unclamped)."""
        c, batch = self.config, codes.shape[0]
        masks = self.decoder.mask_token.expand(batch, self.decoder_grid**2, -1)
        out = self.decoder.run(masks, self.decoder.decoder_embed(codes))
        x = self.decoder.ln_post(out[:, 1 : 1 + self.decoder_grid**2])
        x = x.transpose(1, 2).reshape(batch, c.decoder_width, self.decoder_grid, self.decoder_grid)
        if c.is_legacy:
            proxy = self.decoder.ffn(x).softmax(1)  # distribution over the VQGAN codes of every patch
            return self.pixel_decoder(torch.einsum("nchw,cd->ndhw", proxy, self.pixel_quantizer.weight))
        p, g = c.decoder_patch, self.decoder_grid
        # channels are ordered (p1, p2, rgb): pixel (h*p + p1, w*p + p2)
        pixels = self.decoder.ffn(x).view(batch, p, p, 3, g, g).permute(0, 3, 4, 1, 5, 2).reshape(batch, 3, g * p, g * p)
        return self.decoder.conv_out(pixels)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return self.quantizer(self.latents((images + 1) / 2))[1]

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.shape[1] != self.num_tokens:
            raise InputError(f"TiTok decodes exactly {self.num_tokens} tokens per image, got ids of shape {tuple(ids.shape)}")
        return self.decode_codes(self.quantizer.ids_to_codes(ids)).clamp(0, 1) * 2 - 1


_VIT_RENAMES = [(".blocks.", ".transformer."), (".norm1.", ".ln_1."), (".norm2.", ".ln_2."), (".attn.qkv.weight", ".attn.in_proj_weight"),
                (".attn.qkv.bias", ".attn.in_proj_bias"), (".attn.proj.", ".attn.out_proj."), (".mlp.0.", ".mlp.c_fc."), (".mlp.2.", ".mlp.c_proj.")]
_OTHER_RENAMES = [("quantizer.", "quantize."), ("pixel_quantize.", "pixel_quantize.embedding."), ("pixel_decoder.middle.", "pixel_decoder.mid."),
                  ("pixel_decoder.stages.", "pixel_decoder.up."), (".resnets.", ".block."), (".shortcut.", ".nin_shortcut.")]


def titok_key_table(model: OfficialTiTok) -> dict[str, str]:
    """Official key -> our key for every parameter of `model`: transformer blocks follow open_clip's
    ResidualAttentionBlock naming (nn.MultiheadAttention's packed in_proj), the rest keeps the official names."""
    table = {}
    for ours in model.state_dict():
        official = ours
        for fragment, replacement in _VIT_RENAMES if ".blocks." in ours else _OTHER_RENAMES:
            official = official.replace(fragment, replacement)
        table[official] = ours
    return table


def titok_config_from_tree(tree: dict, sizes: dict = TITOK_MODEL_SIZES, **pixel_decoder) -> OfficialTiTokConfig:
    """Our config from the OmegaConf tree a hub-mixin `config.json` holds (`model.vq_model.*`, crop size)."""
    try:
        vq = tree["model"]["vq_model"]
        crop = tree.get("dataset", {}).get("preprocessing", {}).get("crop_size", 256)
        if vq.get("quantize_mode", "vq") != "vq":
            raise ModelLoadError(f"TiTok quantize_mode {vq['quantize_mode']!r} (continuous tokens) is not supported, only 'vq'")
        encoder, decoder = sizes[vq["vit_enc_model_size"]], sizes[vq["vit_dec_model_size"]]
        return OfficialTiTokConfig(
            image_size=crop, encoder_patch=vq["vit_enc_patch_size"], decoder_patch=vq["vit_dec_patch_size"],
            encoder_width=encoder[0], encoder_depth=encoder[1], encoder_heads=encoder[2],
            decoder_width=decoder[0], decoder_depth=decoder[1], decoder_heads=decoder[2],
            num_latent_tokens=vq["num_latent_tokens"], codebook_size=vq["codebook_size"], token_size=vq["token_size"],
            use_l2_norm=vq.get("use_l2_norm", False), is_legacy=vq.get("is_legacy", True),
            finetune_decoder=vq.get("finetune_decoder", True), **pixel_decoder)
    except KeyError as exc:
        raise ModelLoadError(f"TiTok config lacks field {exc} (expected model.vq_model.* as in configs/infer/TiTok/*.yaml)") from exc


def variant_tree(name: str) -> dict:
    """The config tree of a released variant (`titok_l32`, `titok_bl64_vq8k`, ...)."""
    if name not in TITOK_VARIANTS:
        raise UnknownNameError("TiTok variant", name, TITOK_VARIANTS)
    values = dict(TITOK_VARIANTS[name])
    encoder_size, decoder_size = values.pop("sizes")
    vq = dict(values, vit_enc_model_size=encoder_size, vit_dec_model_size=decoder_size, vit_enc_patch_size=16, vit_dec_patch_size=16)
    return {"model": {"vq_model": vq}, "dataset": {"preprocessing": {"crop_size": 256}}}


def load_titok(path, variant: str | None = None, config: dict | None = None, sizes: dict = TITOK_MODEL_SIZES,
               **pixel_decoder) -> OfficialTiTok:
    """An official TiTok tokenizer from a local hub-mixin folder, or from a `.bin` / `.safetensors` state dict with
    its config given as a released `variant` name or a config tree (`config`). Strict; legacy two-stage weights
    must include `pixel_quantize` and `pixel_decoder`. `sizes`/`pixel_decoder` override the fixed official widths
    (for tests on tiny models)."""
    from tokenomy.generation.loaders import load_official_state, local_path, read_state_dict

    resolved = Path(path)
    if resolved.is_dir():
        tree = json.loads((local_path(resolved / "config.json")).read_text())
        weights = next((resolved / n for n in ("model.safetensors", "pytorch_model.bin") if (resolved / n).is_file()), None)
        if weights is None:
            raise ModelLoadError(f"TiTok folder {path} has neither model.safetensors nor pytorch_model.bin")
    else:
        weights = local_path(path)
        if (variant is None) == (config is None):
            raise ModelLoadError(f"{path} is a bare state dict: pass exactly one of variant= ({', '.join(TITOK_VARIANTS)}) or config=")
        tree = config if config is not None else variant_tree(variant)
    model = OfficialTiTok(titok_config_from_tree(tree, sizes, **pixel_decoder))
    return load_official_state(model, read_state_dict(weights), titok_key_table(model), weights)

