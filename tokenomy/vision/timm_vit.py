"""timm VisionTransformer behind `VisionEncoder`.

The embedding step mirrors `VisionTransformer.forward_features` (patch_embed -> _pos_embed -> patch_drop -> norm_pre),
the layers are `model.blocks`, and q/k/v are recomputed from the block's own `norm1` and `attn.qkv` (+ `q_norm`/`k_norm`),
so the attention itself keeps running through SDPA.

Prefix tokens. timm orders the sequence [CLS?, distillation/register tokens..., patches]. The CLS token (when
`model.cls_token` is set) stays at index 0 of the hidden state that hooks and `VisionOutput` see. The other prefix tokens
(register tokens, DeiT's distillation token) are not patches and have no place in the patch grid, so this wrapper
carries them *beside* the hidden state: every block still runs on the full timm sequence, in timm's order, and the extra
prefix tokens are split off again after it. Hooks therefore see [CLS?, patches] and can drop or merge patches without
knowing about registers; the registers keep attending and being attended to exactly as in timm. Attention rows are
normalised over the full sequence (registers included) and then restricted to the patches; the mean query of
`mean_query_attention` averages the queries of every token, registers included.
"""
from __future__ import annotations

import torch

from tokenomy.errors import InputError, ModelLoadError
from tokenomy.vision.base import VisionEncoder


def is_timm_vit(model) -> bool:
    if not type(model).__module__.startswith("timm."):
        return False
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


class TimmViTEncoder(VisionEncoder):
    """timm `VisionTransformer` (with or without CLS, with register tokens) made of `Block` or `ResPostBlock` layers.

    Output of a layer is that block's raw output, as a forward hook on `model.blocks[i]` sees it. `model.norm` is
    applied only when the feature layer is the last block, so `encode(x, feature_layer=-1).tokens` equals the patch part
    of `model.forward_features(x)`; intermediate layers are returned un-normalised, as LLaVA-style models read them.
    The wrapper keeps per-call state (the extra prefix tokens), so one instance must not run two `encode` calls at once.
    """

    def __init__(self, model):
        from timm.layers import Attention
        from timm.models.vision_transformer import Block, ResPostBlock

        if not is_timm_vit(model):
            raise ModelLoadError(f"{type(model).__name__} is not a timm VisionTransformer")
        for index, block in enumerate(model.blocks):
            attn = getattr(block, "attn", None)
            if type(block) not in (Block, ResPostBlock) or not isinstance(attn, Attention):
                raise ModelLoadError(
                    f"timm block {index} is {type(block).__name__} with {type(attn).__name__}; "
                    "TimmViTEncoder supports Block/ResPostBlock with timm.layers.Attention"
                )
        self.model = model
        self.has_cls = model.cls_token is not None
        self.num_cls = 1 if self.has_cls else 0
        self.num_extra_prefix = model.num_prefix_tokens - self.num_cls
        self._extra_prefix = None

    def _layers(self):
        return self.model.blocks

    def _patch_grid(self, pixel_values):
        h, w = self.model.patch_embed.dynamic_feat_size(tuple(pixel_values.shape[-2:]))
        return 1, h, w

    def _embed(self, pixel_values):
        model = self.model
        x = model.patch_embed(pixel_values.to(model.patch_embed.proj.weight.dtype))
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        x = model.norm_pre(x)
        _, h, w = self._patch_grid(pixel_values)
        if x.shape[1] != model.num_prefix_tokens + h * w:
            raise InputError(
                f"timm patch dropout kept {x.shape[1] - model.num_prefix_tokens} of {h * w} patches; "
                "call model.eval() before encoding"
            )
        self._extra_prefix = x[:, self.num_cls : model.num_prefix_tokens]
        return torch.cat([x[:, : self.num_cls], x[:, model.num_prefix_tokens :]], dim=1)

    def _full_sequence(self, hidden):
        """[CLS?, patches] -> timm's [CLS?, extra prefix, patches]."""
        if not self.num_extra_prefix:
            return hidden
        return torch.cat([hidden[:, : self.num_cls], self._extra_prefix, hidden[:, self.num_cls :]], dim=1)

    def _run_layer(self, layer_index, hidden):
        out = self._layers()[layer_index](self._full_sequence(hidden))
        if not self.num_extra_prefix:
            return out
        split = self.num_cls + self.num_extra_prefix
        self._extra_prefix = out[:, self.num_cls : split]
        return torch.cat([out[:, : self.num_cls], out[:, split:]], dim=1)

    def _qkv(self, layer_index, hidden):
        """q, k, v over [CLS?, patches, extra prefix]: the attention's own tokens, extra prefix moved last."""
        from timm.models.vision_transformer import ResPostBlock

        block = self._layers()[layer_index]
        attn = block.attn
        tokens = hidden if not self.num_extra_prefix else torch.cat([hidden, self._extra_prefix], dim=1)
        attn_input = tokens if isinstance(block, ResPostBlock) else block.norm1(tokens)
        batch, length, _ = attn_input.shape
        q, k, v = attn.qkv(attn_input).reshape(batch, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        return attn.q_norm(q), attn.k_norm(k), v, attn.scale

    def _signals(self, layer_index, hidden, wanted):
        out = super()._signals(layer_index, hidden, wanted)
        if not self.num_extra_prefix:
            return out
        num_patches = hidden.shape[1] - self.num_cls
        # every signal is indexed by token on dim 1, with the extra prefix tokens last (see `_qkv`)
        return {name: value[:, :num_patches] for name, value in out.items()}

    def _finish(self, hidden, feature_layer):
        if feature_layer == self.num_layers - 1:
            return self.model.norm(hidden)
        return hidden
