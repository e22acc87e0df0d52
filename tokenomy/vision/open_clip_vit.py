"""open_clip VisionTransformer (`clip_model.visual`) behind `VisionEncoder`.

Embedding mirrors `VisionTransformer._embeds` (conv1 -> CLS + positional embedding -> patch_dropout -> ln_pre); the
layers are `transformer.resblocks`; q/k/v are recomputed from the block's `ln_1` and the attention's packed
`in_proj_weight`/`in_proj_bias` (nn.MultiheadAttention or open_clip's own `Attention` with optional q/k LayerNorm), so
the blocks keep their SDPA / fused path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenomy.errors import InputError, ModelLoadError
from tokenomy.vision.base import VisionEncoder


def is_open_clip_vit(model) -> bool:
    if not type(model).__module__.startswith("open_clip."):
        return False
    from open_clip.transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


class OpenClipViTEncoder(VisionEncoder):
    """open_clip `VisionTransformer` with `ResidualAttentionBlock` or `CustomResidualAttentionBlock` layers.

    A layer's output is that resblock's raw output (batch first), as a forward hook on `transformer.resblocks[i]` sees
    it. `ln_post` is applied only when the feature layer is the last block *and* open_clip itself applies it to every
    token (no attentional pooler, `final_ln_after_pool=False`), so `encode(x, feature_layer=-1).tokens` equals the
    patch tokens open_clip returns with `output_tokens=True`; intermediate layers are un-normalised.
    """

    has_cls = True  # open_clip ViTs always prepend `class_embedding`

    def __init__(self, model):
        from open_clip.transformer import Attention, CustomResidualAttentionBlock, ResidualAttentionBlock

        if not is_open_clip_vit(model):
            raise ModelLoadError(f"{type(model).__name__} is not an open_clip VisionTransformer")
        for index, block in enumerate(model.transformer.resblocks):
            supported = (type(block) is ResidualAttentionBlock and isinstance(block.attn, torch.nn.MultiheadAttention)
                         and block.attn._qkv_same_embed_dim) or (
                type(block) is CustomResidualAttentionBlock and isinstance(block.attn, Attention)
                and block.attn.logit_scale is None
            )
            if not supported:
                raise ModelLoadError(
                    f"open_clip resblock {index} is {type(block).__name__} with {type(block.attn).__name__}; "
                    "OpenClipViTEncoder supports self-attention blocks without scaled-cosine attention"
                )
        self.model = model
        self.batch_first = model.transformer.batch_first
        self.applies_ln_post_to_tokens = model.attn_pool is None and not model.final_ln_after_pool

    def _layers(self):
        return self.model.transformer.resblocks

    def _patch_grid(self, pixel_values):
        patch_h, patch_w = self.model.patch_size
        return 1, pixel_values.shape[-2] // patch_h, pixel_values.shape[-1] // patch_w

    def _embed(self, pixel_values):
        model = self.model
        x = model.conv1(pixel_values.to(model.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = model.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + model.positional_embedding.to(x.dtype)
        x = model.patch_dropout(x)
        _, h, w = self._patch_grid(pixel_values)
        if x.shape[1] != 1 + h * w:
            raise InputError(f"open_clip patch dropout kept {x.shape[1] - 1} of {h * w} patches; call model.eval() first")
        return model.ln_pre(x)

    def _run_layer(self, layer_index, hidden):
        block = self._layers()[layer_index]
        if self.batch_first:
            return block(hidden)
        return block(hidden.transpose(0, 1)).transpose(0, 1)

    def _qkv(self, layer_index, hidden):
        block = self._layers()[layer_index]
        attn = block.attn
        batch, length, width = hidden.shape
        q, k, v = F.linear(block.ln_1(hidden), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        heads = attn.num_heads
        q, k, v = (x.reshape(batch, length, heads, width // heads).transpose(1, 2) for x in (q, k, v))
        if isinstance(attn, torch.nn.MultiheadAttention):
            return q, k, v, (width // heads) ** -0.5
        return attn.ln_q(q), attn.ln_k(k), v, attn.scale

    def _finish(self, hidden, feature_layer):
        if feature_layer == self.num_layers - 1 and self.applies_ln_post_to_tokens:
            return self.model.ln_post(hidden)
        return hidden
