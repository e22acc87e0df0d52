"""RAR (bytedance/1d-tokenizer): a causal adaLN-zero GPT with a target-aware position embedding.

Sequence for an order pi: [CLS, c, x_pi(0), ..., x_pi(t-1)]; the output at c predicts x_pi(0) and the output at
x_pi(i) predicts x_pi(i+1). Every input carries the absolute embedding P of its own cell and the embedding T of the
cell it must predict next (CLS and the last token get none), which is what lets one model decode in any order.
Ids share one table: [0, V) codes, V the mask id, V+1+class the classes, V+1+C the null class.

`load_rar` reads the official `rar_{b,l,xl,xxl}.bin` state dicts (local paths only).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenomy.errors import InputError
from tokenomy.generation.loaders import load_official_state, read_state_dict, require_keys
from tokenomy.generation.randar import make_order
from tokenomy.generation.sampling import apply_cfg, guidance_scale, sample_logits

# the official tables keep spare rows beyond the sequence (1024 for positions, 100 for steps); kept so shapes match
POSITION_SPARE_ROWS, STEP_SPARE_ROWS = 1024, 100
RAR_SIZES = {"rar_b": (768, 24, 3072), "rar_l": (1024, 24, 4096), "rar_xl": (1280, 32, 5120), "rar_xxl": (1408, 40, 6144)}


@dataclass
class RARConfig:
    codebook_size: int = 1024
    num_classes: int = 1000
    image_seq_len: int = 256
    width: int = 768
    depth: int = 24
    heads: int = 16
    mlp_hidden: int = 3072


class RARCache:
    """Per-layer keys/values grown by concatenation (RAR decodes one token per step)."""

    def __init__(self, depth: int):
        self.keys: list[torch.Tensor | None] = [None] * depth
        self.values: list[torch.Tensor | None] = [None] * depth

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]


class RARAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(width, width)

    def forward(self, x, start: int, cache: RARCache | None, layer: int):
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None:
            if cache.keys[layer] is not None:
                k, v = torch.cat([cache.keys[layer], k], 2), torch.cat([cache.values[layer], v], 2)
            cache.keys[layer], cache.values[layer] = k, v
        # query at absolute index start+i sees keys 0..start+i
        mask = torch.ones(length, k.shape[2], dtype=torch.bool, device=x.device).tril(start)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class RARBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width, eps=1e-6), RARAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, cond, start=0, cache=None, layer=0):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond).chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1, start, cache, layer)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class RAR(nn.Module):
    def __init__(self, config: RARConfig):
        super().__init__()
        self.config = c = config
        table = lambda rows: nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, rows, c.width), std=0.02))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.embeddings = nn.Embedding(c.codebook_size + 1 + c.num_classes + 1, c.width)
        self.pos_embed = table(c.image_seq_len + POSITION_SPARE_ROWS)
        self.target_pos_embed = table(c.image_seq_len + POSITION_SPARE_ROWS)
        self.step_embed = table(c.image_seq_len + STEP_SPARE_ROWS)
        self.blocks = nn.ModuleList(RARBlock(c.width, c.heads, c.mlp_hidden) for _ in range(c.depth))
        self.final_norm = nn.LayerNorm(c.width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c.width, 2 * c.width))
        self.head = nn.Linear(c.width, c.codebook_size)
        for module in [*(b.modulation[1] for b in self.blocks), self.final_modulation[1]]:
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def num_tokens(self) -> int:
        return self.config.image_seq_len

    def condition_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """Class labels in [0, C] (C = null class) -> ids in the shared table."""
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.cls_token.device)
        if labels.ndim != 1 or (labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.config.num_classes)):
            raise InputError(f"labels must be a 1D tensor of class ids in [0, {self.config.num_classes}], got {labels.tolist()}")
        return labels + self.config.codebook_size + 1

    def input_embeddings(self, labels, tokens, order):
        """[CLS, c, x_pi(0..t-1)] with P and T added -> ([B, t+2, W], adaLN conditions [B, t+2, W])."""
        batch, length = tokens.shape
        cond_ids = self.condition_ids(labels)
        x = torch.cat([self.cls_token.expand(batch, -1, -1), self.embeddings(torch.cat([cond_ids[:, None], tokens], 1))], 1)
        prefix = torch.tensor([0, 1], device=x.device).expand(batch, -1)
        x = x + self.pos_embed[0][torch.cat([prefix, 2 + order[:, :length]], 1)]
        # c and x_pi(i) get T of the next cell pi(i+1); once the order is exhausted the slot gets nothing
        targets = self.target_pos_embed[0][2 + order[:, : length + 1]]
        padding = x.new_zeros(batch, length + 1 - targets.shape[1], x.shape[2])
        x = x + torch.cat([x.new_zeros(batch, 1, x.shape[2]), targets, padding], 1)
        cond = self.embeddings(cond_ids)[:, None] + self.step_embed[:, : length + 2]
        return x, cond

    def forward(self, labels, tokens, order=None, cache: RARCache | None = None):
        """labels [B], tokens [B, t] in decoding order, order [B, N] cells (default raster) -> logits.

        Without a cache: logits [B, t+1, V] from c onward. With a cache, only the positions it lacks are run and
        their logits returned (the CLS position, run once, gives none).
        """
        order = make_order("raster" if order is None else order, tokens.shape[0], self.num_tokens, device=tokens.device)
        if tokens.shape[1] > self.num_tokens:
            raise InputError(f"RAR reads at most {self.num_tokens} tokens, got {tokens.shape[1]}")
        x, cond = self.input_embeddings(labels, tokens, order)
        start = 0 if cache is None else cache.length
        x, cond = x[:, start:], cond[:, start:]
        for layer, block in enumerate(self.blocks):
            x = block(x, cond, start, cache, layer)
        if start == 0:  # the CLS output predicts nothing
            x, cond = x[:, 1:], cond[:, 1:]
        scale, shift = self.final_modulation(cond).chunk(2, dim=-1)  # official order: scale first
        return self.head(self.final_norm(x) * (1 + scale) + shift)

    @torch.no_grad()
    def generate(self, labels, cfg: float = 1.0, cfg_schedule: str = "power-cosine", cfg_power: float = 1.0,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, order="raster",
                 generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
        """Sample N tokens one per step (raster by default, as the released models were trained to end in raster).

        CFG runs [cond; null] as one 2B batch with logits = u + w (c - u), w from `cfg_schedule` (RAR: power-cosine
        with `cfg_power`). Returns tokens [B, N] in grid order.
        """
        cond_labels = torch.as_tensor(labels, dtype=torch.long, device=self.cls_token.device)
        batch, total = cond_labels.shape[0], self.num_tokens
        order = make_order(order, batch, total, generator, cond_labels.device)
        guided = not (cfg_schedule == "constant" and cfg == 1.0)
        if guided:
            cond_labels = torch.cat([cond_labels, torch.full_like(cond_labels, self.config.num_classes)])
        copies = 1 + guided
        in_order = torch.zeros(batch, total, dtype=torch.long, device=cond_labels.device)
        cache = RARCache(self.config.depth) if use_cache else None
        for j in range(total):
            logits = self.forward(cond_labels, in_order[:, :j].repeat(copies, 1), order.repeat(copies, 1), cache)[:, -1]
            if guided:
                logits = apply_cfg(logits, guidance_scale(cfg_schedule, cfg, j, total, cfg_power))
            in_order[:, j] = sample_logits(logits, temperature, top_k, top_p, generator)
        return in_order.new_zeros(batch, total).scatter(1, order, in_order)


_RAR_TOP_KEYS = {
    "cls_token": "cls_token",
    "embeddings.weight": "embeddings.weight",
    "pos_embed": "pos_embed",
    "target_aware_pos_embed": "target_pos_embed",
    "timesteps_embeddings": "step_embed",
    "adaln_before_head.adaLN_modulation.1.weight": "final_modulation.1.weight",
    "adaln_before_head.adaLN_modulation.1.bias": "final_modulation.1.bias",
    "lm_head.weight": "head.weight",
    "lm_head.bias": "head.bias",
}
_RAR_BLOCK_KEYS = {
    "norm1": "norm1", "attn.qkv": "attn.qkv", "attn.q_norm": "attn.q_norm", "attn.k_norm": "attn.k_norm",
    "attn.proj": "attn.proj", "norm2": "norm2", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2", "adaLN_modulation.1": "modulation.1",
}


def rar_key_table(depth: int) -> dict[str, str]:
    """Official RAR state-dict key -> our key, for a model of `depth` blocks."""
    table = dict(_RAR_TOP_KEYS)
    for i in range(depth):
        for official, ours in _RAR_BLOCK_KEYS.items():
            for leaf in ("weight", "bias"):
                table[f"blocks.{i}.{official}.{leaf}"] = f"blocks.{i}.{ours}.{leaf}"
    return table


def rar_config_from_state(state: dict[str, torch.Tensor], source) -> RARConfig:
    """Every hyper-parameter of a RAR checkpoint follows from its tensor shapes (heads from the QK-norm width)."""
    require_keys(state, ["cls_token", "embeddings.weight", "pos_embed", "lm_head.weight", "blocks.0.attn.q_norm.weight",
                         "blocks.0.mlp.fc1.weight"], source)
    width = state["cls_token"].shape[-1]
    codebook = state["lm_head.weight"].shape[0]
    return RARConfig(codebook_size=codebook, num_classes=state["embeddings.weight"].shape[0] - codebook - 2,
                     image_seq_len=state["pos_embed"].shape[1] - POSITION_SPARE_ROWS, width=width,
                     depth=1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))),
                     heads=width // state["blocks.0.attn.q_norm.weight"].shape[0],
                     mlp_hidden=state["blocks.0.mlp.fc1.weight"].shape[0])


def load_rar(path) -> RAR:
    """Our `RAR` from an official `rar_*.bin` (raw state dict, or wrapped under `model`/`state_dict`); strict."""
    state = read_state_dict(path)
    config = rar_config_from_state(state, path)
    return load_official_state(RAR(config), state, rar_key_table(config.depth), path)
