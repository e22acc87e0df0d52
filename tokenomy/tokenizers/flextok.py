"""Ordered 1D tokenizer in the FlexTok style.

Encoder: ViT over [image patches ; K registers]; patches see all patches, register i sees all patches and
registers <= i, so token i only summarises what tokens < i left out. Registers are FSQ-quantized.
Nested dropout keeps a random power-of-two prefix during training, so every prefix decodes.
Decoder: a rectified-flow transformer (adaLN-zero on the time step) over [noised patches ; register slots];
slots past the kept prefix hold one learned mask token, and a learned null condition gives classifier-free guidance.
As in FlexTok, both run on the latents of a frozen autoencoder when one is attached (`vae`: the config of a
trained 2D grid VQ tokenizer, whose weights are stored with this model); without it they run on pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tokenomy.errors import InputError
from tokenomy.tokenizers.base import ImageTokenizer, register
from tokenomy.tokenizers.blocks import AdaLNZeroBlock, ViTBlock, patchify, timestep_embedding, unpatchify
from tokenomy.tokenizers.fsq import FSQ
from tokenomy.tokenizers.grid_vq import GridVQConfig, GridVQTokenizer
from tokenomy.tokenizers.rectified_flow import euler_sample, flow_matching_loss


@dataclass
class FlexTokConfig:
    image_size: int = 32
    patch_size: int = 4
    width: int = 128
    encoder_depth: int = 4
    decoder_depth: int = 4
    heads: int = 4
    num_registers: int = 32
    levels: tuple = (8, 5, 5, 5)
    null_condition_p: float = 0.1
    sample_steps: int = 25
    guidance: float = 1.5
    vae: dict | None = None
    latent_scale: float = 1.0


def power_of_two_keep(batch: int, max_tokens: int, device, generator=None) -> torch.Tensor:
    """Per-sample prefix length drawn uniformly from {1, 2, 4, ..., max_tokens}."""
    choices = [1 << i for i in range(max_tokens.bit_length()) if 1 << i <= max_tokens]
    if choices[-1] != max_tokens:
        choices.append(max_tokens)
    picks = torch.randint(len(choices), (batch,), device=device, generator=generator)
    return torch.tensor(choices, device=device)[picks]


def causal_last_mask(num_patches: int, num_registers: int, device=None) -> torch.Tensor:
    total = num_patches + num_registers
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[:, :num_patches] = True
    mask[num_patches:, num_patches:] = torch.ones(num_registers, num_registers, dtype=torch.bool, device=device).tril()
    return mask


@register("flextok")
class FlexTokTokenizer(ImageTokenizer):
    config_class = FlexTokConfig

    def __init__(self, config: FlexTokConfig = FlexTokConfig()):
        super().__init__(config)
        c = config
        if c.vae is not None:
            self.vae = GridVQTokenizer(GridVQConfig(**c.vae)).eval().requires_grad_(False)
            side = c.image_size // self.vae.config.downsample
            self.latent_shape = (self.vae.config.code_dim, side, side)
        else:
            self.vae = None
            self.latent_shape = (3, c.image_size, c.image_size)
        self.grid = (self.latent_shape[1] // c.patch_size, self.latent_shape[2] // c.patch_size)
        num_patches, patch_dim, scale = self.grid[0] * self.grid[1], self.latent_shape[0] * c.patch_size**2, 0.02
        self.fsq = FSQ(c.levels)
        # encoder
        self.patch_embed = nn.Linear(patch_dim, c.width)
        self.patch_pos = nn.Parameter(scale * torch.randn(num_patches, c.width))
        self.registers = nn.Parameter(scale * torch.randn(c.num_registers, c.width))
        self.encoder = nn.ModuleList(ViTBlock(c.width, c.heads) for _ in range(c.encoder_depth))
        self.encoder_norm = nn.LayerNorm(c.width)
        self.to_code = nn.Linear(c.width, self.fsq.dim)
        self.register_buffer("encoder_mask", causal_last_mask(num_patches, c.num_registers), persistent=False)
        # flow decoder
        self.noisy_embed = nn.Linear(patch_dim, c.width)
        self.decoder_patch_pos = nn.Parameter(scale * torch.randn(num_patches, c.width))
        self.from_code = nn.Linear(self.fsq.dim, c.width)
        self.register_pos = nn.Parameter(scale * torch.randn(c.num_registers, c.width))
        self.mask_token = nn.Parameter(scale * torch.randn(c.width))
        self.null_condition = nn.Parameter(scale * torch.randn(c.num_registers, c.width))
        self.time_mlp = nn.Sequential(nn.Linear(c.width, c.width), nn.SiLU(), nn.Linear(c.width, c.width))
        self.part_embed = nn.Parameter(torch.zeros(2, c.width))  # patches and registers get separate modulation
        self.decoder = nn.ModuleList(AdaLNZeroBlock(c.width, c.heads) for _ in range(c.decoder_depth))
        self.decoder_norm = nn.LayerNorm(c.width, elementwise_affine=False, eps=1e-6)
        self.to_velocity = nn.Linear(c.width, patch_dim)
        nn.init.zeros_(self.to_velocity.weight)
        nn.init.zeros_(self.to_velocity.bias)

    @property
    def num_tokens(self) -> int:
        return self.config.num_registers

    @property
    def vocab_size(self) -> int:
        return self.fsq.codebook_size

    @property
    def noise_shape(self) -> tuple[int, int, int]:
        return self.latent_shape

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()  # the autoencoder stays frozen
        return self

    @torch.no_grad()
    def to_latent(self, images: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return images
        return self.vae._quantize(images)[0].permute(0, 3, 1, 2) * self.config.latent_scale

    @torch.no_grad()
    def from_latent(self, latent: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latent.clamp(-1, 1)
        # snap the sampled latent onto the autoencoder's codebook, the only inputs its decoder was trained on
        codes = self.vae.quantizer(latent.permute(0, 2, 3, 1) / self.config.latent_scale)[0]
        return self.vae._decode_codes(codes).clamp(-1, 1)

    # ---- encoder -------------------------------------------------------------------------------------------
    def _encode_codes(self, images: torch.Tensor):
        return self._encode_latent(self.to_latent(images))

    def _encode_latent(self, latent: torch.Tensor):
        patches = self.patch_embed(patchify(latent, self.config.patch_size)) + self.patch_pos
        x = torch.cat([patches, self.registers.expand(latent.shape[0], -1, -1)], dim=1)
        for block in self.encoder:
            x = block(x, self.encoder_mask)
        return self.fsq(self.to_code(self.encoder_norm(x[:, -self.num_tokens :])))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return self._encode_codes(images)[1]

    # ---- decoder -------------------------------------------------------------------------------------------
    def condition(self, codes: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """codes [B, K, D] (only the first keep[b] rows matter) -> register-slot embeddings [B, K, width]."""
        slots = torch.arange(self.num_tokens, device=codes.device)
        kept = (slots[None] < keep[:, None]).unsqueeze(-1)
        return torch.where(kept, self.from_code(codes), self.mask_token) + self.register_pos

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor, merge_ratio: float = 0.0) -> torch.Tensor:
        patches = self.noisy_embed(patchify(x_t, self.config.patch_size)) + self.decoder_patch_pos
        x = torch.cat([patches, condition], dim=1)
        t_emb = self.time_mlp(timestep_embedding(t, self.config.width))[:, None]
        part = torch.cat([self.part_embed[:1].expand(patches.shape[1], -1), self.part_embed[1:].expand(condition.shape[1], -1)])
        cond = t_emb + part
        # token merging (ToMe-SD) acts on patch tokens only; the register slots carry the condition
        merge_r = int(merge_ratio * patches.shape[1])
        protected = tuple(range(patches.shape[1], x.shape[1])) if merge_r else ()
        for block in self.decoder:
            x = block(x, cond, merge_r=merge_r, protected=protected)
        v = self.to_velocity(self.decoder_norm(x[:, : patches.shape[1]]))
        return unpatchify(v, self.config.patch_size, self.latent_shape[0], self.grid)

    def ids_to_condition(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or not 1 <= ids.shape[1] <= self.num_tokens:
            raise InputError(f"FlexTok decodes a prefix of 1..{self.num_tokens} tokens per image, got ids of shape {tuple(ids.shape)}")
        codes = self.fsq.ids_to_codes(ids)
        padded = torch.zeros(ids.shape[0], self.num_tokens, self.fsq.dim, device=ids.device)
        padded[:, : ids.shape[1]] = codes
        return self.condition(padded, torch.full((ids.shape[0],), ids.shape[1], device=ids.device))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, steps: int | None = None, guidance: float | None = None,
               noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
               merge_ratio: float = 0.0) -> torch.Tensor:
        """Decode any prefix ids [B, k], 1 <= k <= K. `noise` [B, *noise_shape] (or `generator`) fixes the
        flow's starting point. `merge_ratio` (< 0.5) merges that fraction of patch tokens in every decoder
        block through tokenomy.kernels (ToMe-SD), trading fidelity for speed."""
        if not 0.0 <= merge_ratio < 0.5:
            raise InputError(f"merge_ratio must lie in [0, 0.5), got {merge_ratio}")
        steps = steps or self.config.sample_steps
        guidance = self.config.guidance if guidance is None else guidance
        cond = self.ids_to_condition(ids)
        if noise is None:
            noise = torch.randn(ids.shape[0], *self.latent_shape, device=ids.device, generator=generator)
        if noise.shape[1:] != self.latent_shape:
            raise InputError(f"FlexTok noise must be [B, {', '.join(map(str, self.latent_shape))}], got {tuple(noise.shape)}")
        if guidance == 1.0:
            return self.from_latent(euler_sample(lambda x, t: self.velocity(x, t, cond, merge_ratio), noise, steps))
        null = self.null_condition.expand_as(cond)

        def guided(x, t):
            v_cond, v_null = self.velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null]), merge_ratio).chunk(2)
            return v_null + guidance * (v_cond - v_null)

        return self.from_latent(euler_sample(guided, noise, steps))

    def loss(self, images: torch.Tensor, generator: torch.Generator | None = None, latent: torch.Tensor | None = None):
        """Flow-matching loss with nested dropout; pass `latent` (= to_latent(images)) to skip the autoencoder."""
        latent = self.to_latent(images) if latent is None else latent
        codes, _ = self._encode_latent(latent)
        keep = power_of_two_keep(latent.shape[0], self.num_tokens, latent.device, generator)
        cond = self.condition(codes, keep)
        drop = torch.rand(latent.shape[0], device=latent.device, generator=generator) < self.config.null_condition_p
        cond = torch.where(drop[:, None, None], self.null_condition.expand_as(cond), cond)
        loss = flow_matching_loss(lambda x, t: self.velocity(x, t, cond), latent, generator)
        return loss, {"flow": loss.item()}
