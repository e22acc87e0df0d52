"""The rectified-flow decoder half of the released FlexTok tokenizers (apple/ml-flextok): ordered ids -> images.

The official decoder is a `SequentialModuleDictWrapper`: modules run in config order on a shared dictionary, each
reading and writing the keys its config names. We do the same, with one small module of ours per recognised
`_target_` class (parameter names as in the official classes, so the key table is `decoder.module_dict.<name>.<p>`
-> `decoder.<name>.<p>`). Any other class, or any option of a recognised class that is not ported, is refused by
name. The tensors are batched [B, ...] instead of the official lists of [1, ...] samples: every sample of one
`decode` call has the same latent size and register count, and the official packed sequence keeps samples apart
with a block-diagonal mask anyway (its padding tokens are never attended by real tokens, so they are dropped).

Recognised classes: LinearLayer, PositionalEmbeddingAdder, MaskedNestedDropout, ZeroNullCond / LearnedNullCond,
PerSampleOp (channels first<->last), PatchEmbedder, BlockWiseSequencePacker, TimestepEmbedder, FlexTransformer
(FlexBlock / FlexBlockAdaLN), SequenceUnpacker, LinearHead / ToPatchesLinearHead. The table is built from the
classes in the public code and tested on synthetic configs only: no released decoder config was read here.

Sampling follows the official MinRFPipeline: x ~ N(0, I); for t = i/T, i = T..1: x <- x - v(x, t)/T, with
classifier-free guidance (or APG, `perform_norm_guidance`) from a second pass whose condition is the null condition.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tokenomy.errors import InputError, ModelLoadError
from tokenomy.tokenizers.flextok_official import (FlexTokEncoder, _class_name, _target_name, flextok_encoder_key_table,
                                                  unported_layers)

# options that change nothing at inference (initialisation, training-time dropout, kernels, padding for FlexAttention)
_INERT = {"_target_", "weight_init_style", "dtype_override", "use_act_checkpoint", "drop", "drop_path_rate",
          "compile_block_mask", "return_materialized_mask", "pad_to_multiple", "max_seq_len", "dropout_prob",
          "train_keep_k_write_key", "size_sampling_mode", "zero_init_query_proj", "intermediate_layer_write_key",
          "intermediate_layers", "inner_packed_shapes_read_key", "outer_packed_shapes_read_key", "n_patches_write_key"}


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],)).type_as(x)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1.0 + scale) + shift


def _refuse(name: str, kind: str, why: str):
    raise ModelLoadError(f"FlexTok decoder module {name} ({kind}): {why}")


def _check_options(name: str, kind: str, module: dict, known: set[str]):
    unknown = sorted(set(module) - known - _INERT)
    if unknown:
        _refuse(name, kind, f"options {unknown} are not ported")


class LinearLayer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.read_key, self.write_key = c["read_key"], c["write_key"]
        self.proj = nn.Linear(c["dim_in"], c["dim"], bias=c.get("proj_bias", True))

    def forward(self, d: dict) -> dict:
        d[self.write_key] = self.proj(d[self.read_key])
        return d


class PositionalEmbeddingAdder(nn.Module):
    """Adds a stored table over the spatial / sequence dims of a channels-last tensor."""

    def __init__(self, c: dict):
        super().__init__()
        self.read_key, self.write_key = c["read_key"], c["write_key"]
        self.kind, self.scaling, sizes = c.get("posemb_type", "sincos"), c.get("posemb_scaling", "absolute"), c["max_sizes"]
        if self.kind == "sincos":
            self.posembs = nn.Parameter(torch.zeros(1, c["dim"], *sizes), requires_grad=False)
        else:
            self.posembs = nn.Parameter(torch.zeros(len(sizes), 1, c["dim"], sizes[0]))

    def table(self, shape: list[int]) -> torch.Tensor:
        posembs = self.posembs
        if self.kind != "sincos" and len(shape) == 1:
            posembs = posembs[0]
        elif self.kind != "sincos":
            rows, cols = posembs
            posembs = rows.unsqueeze(-1) * cols.unsqueeze(-2) if self.kind == "learnable_prod" else rows.unsqueeze(-1) + cols.unsqueeze(-2)
        if self.scaling == "interpolate":
            posembs = F.interpolate(posembs, shape, mode="bilinear", align_corners=True)
        else:
            posembs = posembs[(slice(None), slice(None), *(slice(None, n) for n in shape))]
        return posembs.movedim(1, -1)  # [1, D, ...] -> [1, ..., D]

    def forward(self, d: dict) -> dict:
        x = d[self.read_key]
        d[self.write_key] = x + self.table(list(x.shape[1:-1]))
        return d


class MaskedNestedDropout(nn.Module):
    """Register slots from `keep_k` on become one learned token (the prefix the ids describe is kept)."""

    def __init__(self, c: dict):
        super().__init__()
        self.key, self.keep_key = c["read_write_key"], c.get("eval_keep_k_read_key", "eval_keep_k")
        self.dropout_mask_token = nn.Parameter(torch.zeros(c["dim"]))

    def forward(self, d: dict) -> dict:
        if self.keep_key is None or self.keep_key not in d:
            return d
        x = d[self.key]
        keep = torch.as_tensor(d[self.keep_key], device=x.device)
        dropped = torch.arange(x.shape[1], device=x.device)[None] >= keep[:, None]
        d[self.key] = torch.where(dropped.view(*dropped.shape, *([1] * (x.ndim - 2))), self.dropout_mask_token.to(x.dtype), x)
        return d


class NullCond(nn.Module):
    """The null condition of classifier-free guidance: zeros (ZeroNullCond) or a learned vector (LearnedNullCond)."""

    def __init__(self, c: dict, learned: bool):
        super().__init__()
        self.key, self.flag_key = c["read_write_key"], c.get("eval_drop_flag_read_key", "eval_dropout_mask")
        if learned:
            self.nullcond = nn.Parameter(torch.zeros(c["dim"]))

    def forward(self, d: dict) -> dict:
        if self.flag_key is None or self.flag_key not in d:
            return d
        x = d[self.key]
        null = self.nullcond.to(x.dtype) if hasattr(self, "nullcond") else x.new_zeros(())
        drop = torch.as_tensor(d[self.flag_key], device=x.device, dtype=torch.bool)
        d[self.key] = torch.where(drop.view(-1, *([1] * (x.ndim - 1))), null, x)
        return d


class PerSampleOp(nn.Module):
    def __init__(self, c: dict, to_last: bool):
        super().__init__()
        self.read_key, self.write_key, self.to_last = c["read_key"], c["write_key"], to_last

    def forward(self, d: dict) -> dict:
        x = d[self.read_key]
        d[self.write_key] = x.movedim(1, -1) if self.to_last else x.movedim(-1, 1)
        return d


class PatchEmbedder(nn.Module):
    """Channels-last [B, s1, s2, C] -> [B, n1, n2, D]: (n p) grid, patch entries ordered p1, p2, channel (fastest)."""

    def __init__(self, c: dict):
        super().__init__()
        self.read_key, self.write_key = c["input_tensor_list_read_key"], c["patches_list_write_key"]
        self.patch_sizes, self.flatten = tuple(c["patch_sizes"]), c.get("flatten_patches", True)
        in_dim = c["channels_in"] * math.prod(self.patch_sizes)
        self.patch_proj = nn.Linear(in_dim, c["dim"]) if c.get("dim") is not None else nn.Identity()

    def forward(self, d: dict) -> dict:
        x = d[self.read_key]
        batch, *spatial, channels = x.shape
        counts = [s // p for s, p in zip(spatial, self.patch_sizes)]
        split = x.reshape(batch, *(v for n, p in zip(counts, self.patch_sizes) for v in (n, p)), channels)
        rank = len(spatial)
        order = [0, *range(1, 2 * rank, 2), *range(2, 2 * rank + 1, 2), 2 * rank + 1]
        patches = split.permute(order).reshape(batch, *counts, -1)
        if self.flatten:
            patches = patches.reshape(batch, math.prod(counts), -1)
        d[self.write_key] = self.patch_proj(patches)
        return d


class BlockWiseSequencePacker(nn.Module):
    """Concatenates the named sequences of each sample (flattened) and builds the attention mask of `mask_mode`."""

    def __init__(self, c: dict):
        super().__init__()
        self.read_keys, self.write_key = list(c["input_list_read_keys"]), c["packed_seq_write_key"]
        self.mask_key, self.mode = c.get("block_mask_write_key"), c.get("mask_mode", "full")
        self.shapes_key, self.outer_key = c["inner_packed_shapes_write_key"], c.get("outer_packed_shapes_write_key")
        self.emb_fn_key, self.per_subseq = c.get("emb_packing_fn_write_key"), c.get("per_subseq_embs", False)

    def forward(self, d: dict) -> dict:
        parts = [d[key] for key in self.read_keys]
        shapes = [tuple(p.shape[1:-1]) for p in parts]
        lengths = [math.prod(s) for s in shapes]
        x = torch.cat([p.reshape(p.shape[0], n, p.shape[-1]) for p, n in zip(parts, lengths)], 1)
        total, index = x.shape[1], torch.arange(x.shape[1], device=x.device)
        if self.mode == "full":
            mask = None
        elif self.mode == "causal":
            mask = index[None] <= index[:, None]
        else:  # causal_last: everything before the last sequence is a fully visible prefix
            mask = (index[None] < total - lengths[-1]) | (index[None] <= index[:, None])
        d[self.write_key], d[self.shapes_key] = x, shapes
        if self.mask_key is not None:
            d[self.mask_key] = mask
        if self.outer_key is not None:
            d[self.outer_key] = total
        if self.emb_fn_key is not None:
            d[self.emb_fn_key] = self.expander(lengths)
        return d

    def expander(self, lengths: list[int]):
        """[B, n * E] per-sample embedding -> [B, L, E]: chunk j covers sequence j (per_subseq) or n = 1 covers all."""
        counts = torch.tensor(lengths)

        def expand(emb: torch.Tensor) -> torch.Tensor:
            if not self.per_subseq:
                return emb.unsqueeze(1).expand(-1, int(counts.sum()), -1)
            if emb.shape[1] % len(lengths):
                raise ModelLoadError(f"FlexTok decoder: adaLN embedding of width {emb.shape[1]} cannot be split over "
                                     f"{len(lengths)} packed sequences (adaLN_expansion must equal their number)")
            chunks = emb.view(emb.shape[0], len(lengths), -1)
            return chunks.repeat_interleave(counts.to(emb.device), dim=1)
        return expand


class TimestepEmbedder(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.read_key, self.write_key = c["timesteps_read_key"], c["time_embedding_write_key"]
        self.frequencies, self.max_timestep = c.get("frequency_embedding_size", 256), c.get("max_timestep", 1000.0)
        self.as_tokens = c.get("temb_as_tokens", False)
        self.mlp = nn.Sequential(nn.Linear(self.frequencies, c["dim"]), nn.SiLU(), nn.Linear(c["dim"], c["dim"]))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        # max_period 256 and the 1000 / max_timestep rescaling, as the official embedder
        freqs = 1000.0 / self.max_timestep * torch.exp(-math.log(256) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
        return F.pad(emb, (0, self.frequencies % 2))

    def forward(self, d: dict) -> dict:
        emb = self.mlp(self.sinusoid(d[self.read_key]))
        d[self.write_key] = emb.unsqueeze(1) if self.as_tokens else emb
        return d


class Attention(nn.Module):
    def __init__(self, dim: int, head_dim: int, qkv_bias: bool, proj_bias: bool, qk_norm: bool):
        super().__init__()
        self.heads, self.head_dim, self.qk_norm = dim // head_dim, head_dim, qk_norm
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim, bias=qkv_bias) for _ in range(3))
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = (f(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2) for f in (self.wq, self.wk, self.wv))
        if self.qk_norm:
            q, k = _layer_norm(q), _layer_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=8.0 / self.head_dim)  # muP scaling
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class GatedMlp(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, bias: bool):
        super().__init__()
        hidden = int(2 * int(dim * mlp_ratio) / 3)
        self.fc1, self.fc3 = nn.Linear(dim, hidden, bias=bias), nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


class Block(nn.Module):
    """FlexBlock, or FlexBlockAdaLN (adaLN-zero: gates, shifts and scales from the time embedding) when `adaln`."""

    def __init__(self, dim: int, head_dim: int, mlp_ratio: float, qkv_bias: bool, proj_bias: bool, mlp_bias: bool,
                 qk_norm: bool, adaln_expansion: int | None):
        super().__init__()
        self.attn = Attention(dim, head_dim, qkv_bias, proj_bias, qk_norm)
        self.mlp = GatedMlp(dim, mlp_ratio, mlp_bias)
        if adaln_expansion is not None:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, adaln_expansion * 6 * dim))

    def forward(self, x: torch.Tensor, mask, emb=None, expand=None) -> torch.Tensor:
        if emb is None:
            x = x + self.attn(_layer_norm(x), mask)
            return x + self.mlp(_layer_norm(x))
        gate_msa, gate_mlp, shift_msa, scale_msa, shift_mlp, scale_mlp = expand(self.adaLN_modulation(emb)).chunk(6, -1)
        x = x + gate_msa * self.attn(_modulate(_layer_norm(x), shift_msa, scale_msa), mask)
        return x + gate_mlp * self.mlp(_modulate(_layer_norm(x), shift_mlp, scale_mlp))


class FlexTransformer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.read_key, self.write_key, self.mask_key = c["input_seq_read_key"], c["output_seq_write_key"], c.get("block_mask_read_key")
        self.emb_key, self.expand_key = c.get("adaLN_emb_read_key"), c.get("adaLN_packing_fn_read_key")
        dim = c.get("dim", 768)
        expansion = c.get("adaLN_expansion", 1) if self.emb_key is not None else None
        self.blocks = nn.ModuleList(
            Block(dim, c.get("head_dim", 64), c.get("mlp_ratio", 4.0), c.get("qkv_bias", False), c.get("proj_bias", False),
                  c.get("mlp_bias", False), c.get("qk_norm", True), expansion)
            for _ in range(c.get("depth", 12)))

    def forward(self, d: dict) -> dict:
        x, mask = d[self.read_key], d.get(self.mask_key) if self.mask_key else None
        emb = d[self.emb_key] if self.emb_key else None
        expand = d[self.expand_key] if self.expand_key else None
        for block in self.blocks:
            x = block(x, mask, emb, expand)
        d[self.write_key] = x
        return d


class SequenceUnpacker(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.read_key, self.write_keys, self.shapes_key = c["packed_seq_read_key"], list(c["inner_seq_write_keys"]), c["inner_packed_shapes_read_key"]

    def forward(self, d: dict) -> dict:
        x, shapes = d[self.read_key], d[self.shapes_key]
        parts = x.split([math.prod(s) for s in shapes], 1)
        for key, part, shape in zip(self.write_keys, parts, shapes):
            d[key] = part.reshape(x.shape[0], *shape, x.shape[-1])
        return d


class LinearHead(nn.Module):
    """LayerNorm (optional), adaLN shift/scale (optional), linear; ToPatchesLinearHead also un-patchifies."""

    def __init__(self, c: dict, patch_sizes: tuple[int, ...] | None):
        super().__init__()
        self.read_key, self.write_key, self.patch_sizes = c["read_key"], c["write_key"], patch_sizes
        self.normalise = c.get("norm_layer", "default") is not None
        self.emb_key, self.expand_key = c.get("adaLN_emb_read_key"), c.get("adaLN_packing_fn_read_key")
        dim = c["dim"]
        dim_out = c["channels_out"] * math.prod(patch_sizes) if patch_sizes else c["dim_out"]
        if self.emb_key is not None:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=c.get("adaLN_bias", True)))
        self.proj = nn.Linear(dim, dim_out, bias=c.get("proj_bias", True))

    def forward(self, d: dict) -> dict:
        x = d[self.read_key]
        batch, *grid, dim = x.shape
        flat = x.reshape(batch, -1, dim)
        if self.normalise:
            flat = _layer_norm(flat)
        if self.emb_key is not None:
            modulation = self.adaLN_modulation(d[self.emb_key])
            modulation = d[self.expand_key](modulation) if self.expand_key else modulation.unsqueeze(1)
            shift, scale = modulation.chunk(2, -1)
            flat = _modulate(flat, shift, scale)
        out = self.proj(flat).reshape(batch, *grid, -1)
        if self.patch_sizes:
            out = self.unpatchify(out)
        d[self.write_key] = out
        return d

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n1, n2, (p1 p2 C)] -> [B, n1 p1, n2 p2, C]."""
        batch, *counts, _ = x.shape
        rank = len(counts)
        if rank != len(self.patch_sizes):
            raise InputError(f"FlexTok head un-patchifies {len(self.patch_sizes)}-D grids, got patches of shape {tuple(x.shape)}")
        x = x.reshape(batch, *counts, *self.patch_sizes, -1)
        order = [0, *(v for i in range(rank) for v in (1 + i, 1 + rank + i)), 1 + 2 * rank]
        return x.permute(order).reshape(batch, *(n * p for n, p in zip(counts, self.patch_sizes)), x.shape[-1])


_OPTIONS = {
    "LinearLayer": {"read_key", "write_key", "dim_in", "dim", "proj_bias"},
    "PositionalEmbeddingAdder": {"read_key", "write_key", "dim", "max_sizes", "posemb_type", "posemb_scaling"},
    "MaskedNestedDropout": {"read_write_key", "dim", "eval_keep_k_read_key"},
    "ZeroNullCond": {"read_write_key", "eval_drop_flag_read_key"},
    "LearnedNullCond": {"read_write_key", "dim", "eval_drop_flag_read_key", "replace_with_single_token"},
    "PerSampleOp": {"read_key", "write_key", "per_sample_op"},
    "PatchEmbedder": {"input_tensor_list_read_key", "patches_list_write_key", "patch_sizes", "channels_in", "dim", "flatten_patches"},
    "BlockWiseSequencePacker": {"input_list_read_keys", "packed_seq_write_key", "block_mask_write_key", "inner_packed_shapes_write_key",
                                "outer_packed_shapes_write_key", "mask_mode", "emb_packing_fn_write_key", "per_subseq_embs"},
    "TimestepEmbedder": {"timesteps_read_key", "time_embedding_write_key", "dim", "frequency_embedding_size", "max_timestep", "temb_as_tokens"},
    "FlexTransformer": {"input_seq_read_key", "output_seq_write_key", "dim", "depth", "head_dim", "mlp_ratio", "qkv_bias", "proj_bias",
                        "mlp_bias", "act_layer", "norm_layer", "gated_mlp", "qk_norm", "block_mask_read_key", "score_mod_read_key",
                        "adaLN_emb_read_key", "adaLN_packing_fn_read_key", "adaLN_expansion", "rope_forward_read_key"},
    "SequenceUnpacker": {"packed_seq_read_key", "inner_seq_write_keys", "inner_packed_shapes_read_key"},
    "LinearHead": {"read_key", "write_key", "dim", "dim_out", "use_mup_readout", "norm_layer", "adaLN_emb_read_key",
                   "adaLN_packing_fn_read_key", "adaLN_bias", "proj_bias"},
    "ToPatchesLinearHead": {"read_key", "write_key", "dim", "channels_out", "patch_sizes", "use_mup_readout", "norm_layer",
                            "adaLN_emb_read_key", "adaLN_packing_fn_read_key", "adaLN_bias", "proj_bias"},
}


def build_decoder_module(name: str, c: dict) -> nn.Module:
    """Our module for one entry of the decoder's module_dict; unknown classes and unported options raise by name."""
    kind = _class_name(c)
    if kind not in _OPTIONS:
        raise ModelLoadError(f"FlexTok decoder module {name}: class {c.get('_target_')!r} is not ported "
                             f"(known: {sorted(_OPTIONS)})")
    _check_options(name, kind, c, _OPTIONS[kind])
    if kind == "PositionalEmbeddingAdder":
        kind_ok = c.get("posemb_type", "sincos") in ("sincos", "learnable_sum", "learnable_prod")
        if not kind_ok or c.get("posemb_scaling", "absolute") not in ("absolute", "interpolate"):
            _refuse(name, kind, f"posemb_type {c.get('posemb_type')!r} / posemb_scaling {c.get('posemb_scaling')!r} not ported")
        return PositionalEmbeddingAdder(c)
    if kind in ("ZeroNullCond", "LearnedNullCond"):
        if c.get("replace_with_single_token"):
            _refuse(name, kind, "replace_with_single_token=True is not ported")
        return NullCond(c, learned=kind == "LearnedNullCond")
    if kind == "PerSampleOp":
        op = _target_name(c.get("per_sample_op"))
        if op not in ("channels_first_to_last", "channels_last_to_first"):
            _refuse(name, kind, f"per_sample_op {c.get('per_sample_op')!r} is not ported")
        return PerSampleOp(c, to_last=op == "channels_first_to_last")
    if kind == "BlockWiseSequencePacker":
        if c.get("mask_mode", "full") not in ("full", "causal", "causal_last"):
            _refuse(name, kind, f"mask_mode {c.get('mask_mode')!r} is not ported")
        if c.get("per_subseq_embs") and not c.get("emb_packing_fn_write_key"):
            _refuse(name, kind, "per_subseq_embs without emb_packing_fn_write_key")
        return BlockWiseSequencePacker(c)
    if kind == "FlexTransformer":
        if not c.get("gated_mlp", True):
            _refuse(name, kind, "gated_mlp=False is not ported")
        for option in ("score_mod_read_key", "rope_forward_read_key"):
            if c.get(option) is not None:
                _refuse(name, kind, f"{option} is not ported")
        if c.get("adaLN_emb_read_key") is not None and c.get("adaLN_packing_fn_read_key") is None:
            _refuse(name, kind, "adaLN_emb_read_key needs adaLN_packing_fn_read_key (the official block calls it unconditionally)")
        if unported_layers(c):
            _refuse(name, kind, f"{'; '.join(unported_layers(c))} not ported")
        return FlexTransformer(c)
    if kind in ("LinearHead", "ToPatchesLinearHead"):
        if c.get("use_mup_readout"):
            _refuse(name, kind, "use_mup_readout=True is not ported (its output scale depends on muP base shapes)")
        if unported_layers(c, norm_may_be_none=True):
            _refuse(name, kind, f"{'; '.join(unported_layers(c, norm_may_be_none=True))} not ported")
        return LinearHead(c, tuple(c["patch_sizes"]) if kind == "ToPatchesLinearHead" else None)
    return {"LinearLayer": LinearLayer, "MaskedNestedDropout": MaskedNestedDropout, "PatchEmbedder": PatchEmbedder,
            "TimestepEmbedder": TimestepEmbedder, "SequenceUnpacker": SequenceUnpacker}[kind](c)


def _momentum_guidance(cond, uncond, scale, running, norm_threshold=2.5):
    """APG (Sadat et al. 2024) as the official pipeline: momentum -0.5, norm clip, drop the part parallel to cond."""
    diff = cond - uncond + (-0.5) * running
    running = diff
    dims = list(range(1, cond.ndim))
    diff = diff * torch.clamp(norm_threshold / torch.linalg.vector_norm(diff, dim=dims, keepdim=True), max=1.0)
    unit = F.normalize(cond.double().flatten(1), dim=1).view_as(cond)
    parallel = (diff.double() * unit).sum(dims, keepdim=True) * unit
    return cond + (scale - 1) * (diff.double() - parallel).to(cond.dtype), running


class FlexTokFlowDecoder(nn.Module):
    """The official decoder module_dict, run in order on a dict of batched tensors; returns the velocity."""

    def __init__(self, config: dict):
        super().__init__()
        try:
            modules = config["decoder"]["module_dict"]
        except (KeyError, TypeError) as exc:
            raise ModelLoadError("FlexTok config has no decoder.module_dict") from exc
        if not isinstance(modules, dict) or not modules:
            raise ModelLoadError("FlexTok config: decoder.module_dict is empty")
        self.module_dict = nn.ModuleDict({name: build_decoder_module(name, c) for name, c in modules.items()})
        pipeline = config.get("pipeline") or {}
        if _class_name(pipeline) != "MinRFPipeline":
            raise ModelLoadError(f"FlexTok pipeline {pipeline.get('_target_')!r} is not ported (only MinRFPipeline)")
        missing = [k for k in ("timesteps_read_key", "noised_images_read_key", "reconst_write_key", "out_channels") if pipeline.get(k) is None]
        if missing:
            raise ModelLoadError(f"FlexTok pipeline config lacks {missing}")
        self.time_key, self.noised_key = pipeline["timesteps_read_key"], pipeline["noised_images_read_key"]
        self.out_key, self.out_channels = pipeline["reconst_write_key"], pipeline["out_channels"]
        self.quants_key = (config.get("regularizer") or {}).get("quants_write_key")
        dropouts = [m for m in self.module_dict.values() if isinstance(m, MaskedNestedDropout)]
        if self.quants_key is None or len(dropouts) != 1:
            raise ModelLoadError("FlexTok decoder needs the regularizer's quants_write_key and exactly one MaskedNestedDropout")
        self.keep_key = dropouts[0].keep_key
        self.has_null_condition = any(isinstance(m, NullCond) for m in self.module_dict.values())

    def velocity(self, noised: torch.Tensor, t: torch.Tensor, codes: torch.Tensor, keep_k: list[int],
                 null_condition: list[bool] | None = None) -> torch.Tensor:
        """v(x_t, t | the first keep_k codes) for latents [B, C, h, w], timesteps [B], FSQ codes [B, N, levels]."""
        d = {self.noised_key: noised, self.time_key: t, self.quants_key: codes, self.keep_key: keep_k}
        if null_condition is not None:
            d["eval_dropout_mask"] = null_condition
        for module in self.module_dict.values():
            d = module(d)
        out = d[self.out_key]
        if out.shape != noised.shape:
            raise ModelLoadError(f"FlexTok decoder wrote {self.out_key} of shape {tuple(out.shape)} for latents {tuple(noised.shape)}")
        return out


class FlexTok(FlexTokEncoder):
    """The released FlexTok: `encode(images)` -> ordered ids, `decode(ids[:, :k])` -> images (rectified flow + VAE)."""

    def __init__(self, config: dict, vae_config: dict | None = None):
        super().__init__(config, vae_config)
        self.decoder = FlexTokFlowDecoder(config)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, steps: int = 25, cfg: float = 1.0, latent_size: int | tuple[int, int] = 32,
               perform_norm_guidance: bool = False, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
        """Ids [B, k] (a prefix, 1 <= k <= registers) -> images [B, 3, 8h, 8w] in about [-1, 1].

        Euler over t = steps/steps .. 1/steps as the official MinRFPipeline; `cfg` != 1 adds the null-condition pass
        (plain CFG, or APG with `perform_norm_guidance`). `noise` [B, C, h, w] replaces the drawn initial noise.
        """
        if ids.ndim != 2 or not 1 <= ids.shape[1] <= self.registers.shape[0]:
            raise InputError(f"FlexTok decodes ids [B, k] with 1 <= k <= {self.registers.shape[0]}, got {tuple(ids.shape)}")
        batch, keep = ids.shape
        codes = self.fsq.ids_to_codes(F.pad(ids, (0, self.registers.shape[0] - keep))).to(self.registers.dtype)
        height, width = (latent_size, latent_size) if isinstance(latent_size, int) else latent_size
        device = self.registers.device
        shape = (batch, self.decoder.out_channels, height, width)
        if noise is not None and tuple(noise.shape) != shape:
            raise InputError(f"FlexTok decode: noise must have shape {shape} (ids batch, latent channels, latent_size), got {tuple(noise.shape)}")
        if noise is not None:
            x = noise.to(device)
        else:  # one draw per sample, as the official pipeline: a seed then gives the official noise, whatever the sizes
            x = torch.cat([torch.randn((1, *shape[1:]), generator=generator, device=device) for _ in range(batch)])
        guided = cfg != 1.0
        if guided and not self.decoder.has_null_condition:
            raise InputError("this FlexTok decoder has no null-condition module: decode with cfg=1.0")
        running = torch.zeros_like(x)
        for i in tqdm(range(steps, 0, -1), disable=not progress, desc="flextok decode"):
            t = torch.full((batch,), i / steps, device=device)
            if guided:  # conditional and null-condition passes as one batch of 2B
                both = self.decoder.velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([codes, codes]), [keep] * 2 * batch,
                                             [False] * batch + [True] * batch)
                cond, uncond = both.float().chunk(2)
                if perform_norm_guidance:
                    v, running = _momentum_guidance(cond, uncond, cfg, running)
                else:
                    v = uncond + cfg * (cond - uncond)
            else:
                v = self.decoder.velocity(x, t, codes, [keep] * batch).float()
            x = x - (1.0 / steps) * v  # the official step dt * v, rounded as it rounds
        return self.vae.decode(x / self.scaling_factor).sample


def flextok_decoder_key_table(model: FlexTok) -> dict[str, str]:
    """Official key -> our key for the decoder: our modules keep the official parameter names of their classes."""
    return {f"decoder.module_dict.{k}": f"decoder.module_dict.{k}" for k in model.decoder.module_dict.state_dict()}


def load_flextok(path, vae_config: dict | None = None) -> FlexTok:
    """VAE + encoder + FSQ + rectified-flow decoder of an official FlexTok `model.safetensors` (a local file or the
    folder holding it), strict over every key. `vae_config` overrides the AutoencoderKL layout (tests use tiny ones)."""
    from safetensors.torch import load_file

    from tokenomy.generation.loaders import load_official_state, local_path, read_flextok_config

    resolved = Path(path)
    path = local_path(resolved / "model.safetensors" if resolved.is_dir() else path)
    model = FlexTok(read_flextok_config(path), vae_config)
    state = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in load_file(str(path)).items()}
    return load_official_state(model, state, {**flextok_encoder_key_table(model), **flextok_decoder_key_table(model)}, path)
