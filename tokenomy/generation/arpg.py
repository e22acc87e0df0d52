"""ARPG (hp-l33/ARPG): randomized parallel decoding with a decoder-decoder GPT.

The self-decoder (causal, LlamaGen blocks, 2D RoPE at each input's own cell) reads the known context
[c, x_pi(0), ..., x_pi(t-1)]; one shared RMSNorm + K/V projection turns its output into keys (rotated to the
inputs' cells) and values. The cross-decoder runs queries that all start as the mask-token embedding, each rotated
to the cell it must predict; query i sees context 0..i and never another query, so any number of tokens per step
is exactly the trained factorization. Ids: [0, V) codes, V mask, V+1+class, V+1+C null class, V+C+2 drop token.

`load_arpg` reads the official `arpg_*.pt` checkpoints (local paths only).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenomy.errors import InputError, ModelLoadError, UnknownNameError
from tokenomy.generation.loaders import load_official_state, read_state_dict, require_keys, swiglu_hidden
from tokenomy.generation.randar import make_order
from tokenomy.generation.rope2d import apply_rope, condition_rotation, grid_angles, rotations
from tokenomy.generation.sampling import apply_cfg, guidance_scale, sample_logits
from tokenomy.generation.transformer import RMSNorm, SwiGLU

# (total layers, width) -> heads of the released ARPG-L / XL / XXL
ARPG_HEADS = {(24, 1024): 16, (36, 1280): 20, (48, 1536): 24}


@dataclass
class ARPGConfig:
    vocab_size: int = 16384
    num_classes: int = 1000
    grid: int = 16
    width: int = 1024
    depth: int = 24  # half self-decoder, half cross-decoder
    heads: int = 16
    ffn_multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_base: float = 10000.0


def arpg_step_sizes(total: int, steps: int, schedule: str = "arccos") -> list[int]:
    """Tokens decoded per step: the masked count after step s is N * arccos((s+1)/S) / (pi/2) (or cos(pi/2 (s+1)/S)),
    at least one decoded and one left masked per step, everything left at the last step. steps >= N: one per step."""
    if steps >= total:
        return [1] * total
    ratios = {"arccos": lambda x: math.acos(x) / (math.pi / 2), "cosine": lambda x: math.cos(math.pi / 2 * x)}
    if schedule not in ratios:
        raise UnknownNameError("ARPG step schedule", schedule, ratios)
    sizes, done = [], 0
    for step in range(steps):
        masked = max(1, min(total - done - 1, int(total * ratios[schedule]((step + 1) / steps))))
        sizes.append(total - done if step == steps - 1 else total - done - masked)
        done += sizes[-1]
    return sizes


class ARPGCache:
    """Self-decoder K/V per layer and the shared cross K/V, grown by concatenation."""

    def __init__(self, depth: int):
        self.self_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * depth
        self.shared_kv: tuple[torch.Tensor, torch.Tensor] | None = None


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def _attend(q, k, v, causal: bool):
    # training layout: query i sees keys 0..i; at inference every cached key is known, so no mask (as the official)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(width, width, bias=False) for _ in range(3))
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x, rope, causal: bool, cache: ARPGCache | None = None, layer: int = 0):
        q, k, v = (_split_heads(f(x), self.heads) for f in (self.q, self.k, self.v))
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None:
            if cache.self_kv[layer] is not None:
                k, v = torch.cat([cache.self_kv[layer][0], k], 2), torch.cat([cache.self_kv[layer][1], v], 2)
            cache.self_kv[layer] = (k, v)
        return self.proj(_attend(q, k, v, causal))


class CrossAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x, keys, values, query_rope, causal: bool):
        q = apply_rope(_split_heads(self.q(x), self.heads), query_rope)
        return self.proj(_attend(q, keys, values, causal))


class ARPGBlock(nn.Module):
    def __init__(self, config: ARPGConfig, cross: bool):
        super().__init__()
        self.attention_norm = RMSNorm(config.width, config.norm_eps)
        self.attention = (CrossAttention if cross else SelfAttention)(config.width, config.heads)
        self.ffn_norm = RMSNorm(config.width, config.norm_eps)
        self.ffn = SwiGLU(config.width, config.ffn_multiple_of)

    def forward(self, x, *attention_args):
        x = x + self.attention(self.attention_norm(x), *attention_args)
        return x + self.ffn(self.ffn_norm(x))


class ARPG(nn.Module):
    def __init__(self, config: ARPGConfig):
        super().__init__()
        self.config = c = config
        if c.depth % 2:
            raise InputError(f"ARPG splits its layers evenly between self- and cross-decoder; depth {c.depth} is odd")
        self.embed = nn.Embedding(c.vocab_size + 1 + c.num_classes + 2, c.width)
        self.self_blocks = nn.ModuleList(ARPGBlock(c, cross=False) for _ in range(c.depth // 2))
        self.context_norm = RMSNorm(c.width, c.norm_eps)
        self.context_k = nn.Linear(c.width, c.width, bias=False)
        self.context_v = nn.Linear(c.width, c.width, bias=False)
        self.cross_blocks = nn.ModuleList(ARPGBlock(c, cross=True) for _ in range(c.depth // 2))
        self.norm = RMSNorm(c.width, c.norm_eps)
        self.head = nn.Linear(c.width, c.vocab_size, bias=False)
        nn.init.zeros_(self.head.weight)
        cells = rotations(grid_angles(c.grid, c.grid, c.width // c.heads, c.rope_base))
        self.register_buffer("cell_rotations", cells, persistent=False)

    @property
    def num_tokens(self) -> int:
        return self.config.grid**2

    @property
    def mask_id(self) -> int:
        return self.config.vocab_size

    def condition_ids(self, labels) -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.cell_rotations.device)
        if labels.ndim != 1 or (labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.config.num_classes)):
            raise InputError(f"labels must be a 1D tensor of class ids in [0, {self.config.num_classes}], got {labels.tolist()}")
        return labels + self.config.vocab_size + 1  # label C (null class) lands on the official null id

    def condition_rotation(self, batch: int) -> torch.Tensor:
        # the official table's condition row is cos = sin = 0: the condition's q and k vanish in every layer
        return condition_rotation("zero", batch, self.config.width // self.config.heads, self.cell_rotations.device)

    def decode(self, context_ids, context_rope, query_rope, causal: bool, cache: ARPGCache | None = None):
        """Self-decoder over new context ids, shared K/V (appended to the cache), cross-decoder queries -> logits."""
        x = self.embed(context_ids)
        for layer, block in enumerate(self.self_blocks):
            x = block(x, context_rope, causal, cache, layer)
        h = self.context_norm(x)
        keys = apply_rope(_split_heads(self.context_k(h), self.config.heads), context_rope)
        values = _split_heads(self.context_v(h), self.config.heads)
        if cache is not None:
            if cache.shared_kv is not None:
                keys, values = torch.cat([cache.shared_kv[0], keys], 2), torch.cat([cache.shared_kv[1], values], 2)
            cache.shared_kv = (keys, values)
        queries = self.embed.weight[self.mask_id].expand(x.shape[0], query_rope.shape[1], -1)
        for block in self.cross_blocks:
            queries = block(queries, keys, values, query_rope, causal)
        return self.head(self.norm(queries)).float()

    def forward(self, labels, tokens, order):
        """Training layout: labels [B], tokens [B, q-1] in decoding order, order [B, q] cells -> logits [B, q, V]."""
        batch, queries = order.shape
        if tokens.shape[1] != queries - 1:
            raise InputError(f"ARPG reads q-1 context tokens for q target cells, got {tokens.shape[1]} tokens for {queries} cells")
        context = torch.cat([self.condition_ids(labels)[:, None], tokens], 1)
        target_rope = self.cell_rotations[order]
        context_rope = torch.cat([self.condition_rotation(batch), target_rope[:, :-1]], 1)
        return self.decode(context, context_rope, target_rope, causal=True)

    @torch.no_grad()
    def generate(self, labels, steps: int = 64, schedule: str = "arccos", order="random", cfg: float = 1.0,
                 cfg_schedule: str = "constant", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, return_logits: bool = False):
        """Decode N tokens in `steps` forwards with the KV cache; each step feeds only the previous step's tokens.

        `order` "random" draws one order for the whole batch (official behaviour); pass a [B, N] tensor for one each.
        The linear CFG ramp counts the tokens decoded including the current step, as the official sampler.
        Returns tokens [B, N] in grid order (and, with `return_logits`, the guided logits [B, N, V] in decoding order).
        """
        cond = self.condition_ids(labels)
        batch, total, device = cond.shape[0], self.num_tokens, cond.device
        if isinstance(order, str) and order == "random":  # one order shared by the batch, as the official sampler
            order = torch.rand(total, generator=generator).argsort()
        order = make_order(order, batch, total, generator, device)
        guided = not (cfg_schedule == "constant" and cfg == 1.0)
        copies = 1 + guided
        if guided:
            cond = torch.cat([cond, torch.full_like(cond, self.config.vocab_size + 1 + self.config.num_classes)])
        rope = self.cell_rotations[order].repeat(copies, 1, 1, 1)
        in_order = torch.zeros(batch, total, dtype=torch.long, device=device)
        context, context_rope = cond[:, None], self.condition_rotation(cond.shape[0])
        cache, decoded, all_logits = ARPGCache(len(self.self_blocks)), 0, []
        for k in arpg_step_sizes(total, steps, schedule):
            logits = self.decode(context, context_rope, rope[:, decoded : decoded + k], causal=False, cache=cache)
            if guided:
                logits = apply_cfg(logits, guidance_scale(cfg_schedule, cfg, decoded + k, total))
            in_order[:, decoded : decoded + k] = sample_logits(logits, temperature, top_k, top_p, generator)
            all_logits.append(logits)
            context, context_rope = in_order[:, decoded : decoded + k].repeat(copies, 1), rope[:, decoded : decoded + k]
            decoded += k
        tokens = in_order.new_zeros(batch, total).scatter(1, order, in_order)
        return (tokens, torch.cat(all_logits, 1)) if return_logits else tokens


_ARPG_BLOCK_KEYS = {
    "attn_norm.weight": "attention_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    "attn.to_q.weight": "attention.q.weight", "attn.proj.weight": "attention.proj.weight",
    "ffn.w1.weight": "ffn.gate.weight", "ffn.w3.weight": "ffn.up.weight", "ffn.w2.weight": "ffn.down.weight",
}
_ARPG_SELF_ONLY_KEYS = {"attn.to_k.weight": "attention.k.weight", "attn.to_v.weight": "attention.v.weight"}
_ARPG_TOP_KEYS = {
    "embeddings.weight": "embed.weight", "layers.norm.weight": "context_norm.weight", "layers.to_k.weight": "context_k.weight",
    "layers.to_v.weight": "context_v.weight", "norm.weight": "norm.weight", "head.weight": "head.weight",
}


def arpg_key_table(depth: int) -> dict[str, str]:
    """Official ARPG state-dict key -> our key for `depth` layers in all (depth/2 self, depth/2 cross)."""
    table = dict(_ARPG_TOP_KEYS)
    for i in range(depth // 2):
        for official, ours in {**_ARPG_BLOCK_KEYS, **_ARPG_SELF_ONLY_KEYS}.items():
            table[f"layers.self_dec.{i}.{official}"] = f"self_blocks.{i}.{ours}"
        for official, ours in _ARPG_BLOCK_KEYS.items():
            table[f"layers.cross_dec.{i}.{official}"] = f"cross_blocks.{i}.{ours}"
    return table


def arpg_config_from_state(state, source, heads: int | None, grid: int) -> ARPGConfig:
    """Sizes from tensor shapes: the table has V + 1 + C + 2 rows (codes, mask, classes, null, drop), the head V."""
    require_keys(state, ["embeddings.weight", "head.weight", "layers.self_dec.0.ffn.w1.weight"], source)
    vocab, width = state["head.weight"].shape
    depth = 2 * (1 + max(int(m.group(1)) for k in state if (m := re.match(r"layers\.self_dec\.(\d+)\.", k))))
    heads = heads or ARPG_HEADS.get((depth, width))
    if heads is None:
        raise ModelLoadError(f"{source}: cannot infer the head count of an ARPG model with {depth} layers of width {width}; pass heads=")
    hidden = state["layers.self_dec.0.ffn.w1.weight"].shape[0]
    multiple = next((m for m in (256, 128, 64, 32, 16, 8, 1) if swiglu_hidden(width, m) == hidden), None)
    if multiple is None:
        raise ModelLoadError(f"{source}: FFN hidden size {hidden} does not follow LlamaGen's rounding for width {width}")
    return ARPGConfig(vocab_size=vocab, num_classes=state["embeddings.weight"].shape[0] - vocab - 3, grid=grid, width=width, depth=depth, heads=heads,
                      ffn_multiple_of=multiple)


def load_arpg(path, heads: int | None = None, grid: int = 16) -> ARPG:
    """Our `ARPG` from an official `arpg_*.pt` (weights under `model` / `module` / `state_dict`, or raw); strict.

    Heads default to the released sizes' and the token grid to 16 x 16 (neither is stored in the checkpoint).
    """
    state = read_state_dict(path)
    config = arpg_config_from_state(state, path, heads, grid)
    return load_official_state(ARPG(config), state, arpg_key_table(config.depth), path)
