"""transformers CLIP and SigLIP vision towers behind `VisionEncoder`."""
from __future__ import annotations

from tokenomy.errors import ModelLoadError
from tokenomy.vision.base import VisionEncoder


class HFViTEncoder(VisionEncoder):
    """CLIPVisionModel / SiglipVisionModel (or their inner vision transformer).

    CLIP: embeddings -> pre_layrnorm -> layers (CLS at 0). SigLIP: embeddings -> layers, no CLS. The output is the
    raw layer output, as `hidden_states[i]` of the transformers model (post_layernorm is not applied), which is what
    LLaVA-style models read.
    """

    def __init__(self, model):
        inner = getattr(model, "vision_model", model)
        for attr in ("embeddings", "encoder"):
            if not hasattr(inner, attr):
                raise ModelLoadError(f"{type(model).__name__} is not a transformers CLIP/SigLIP vision model (no .{attr})")
        self.model = inner
        self.config = inner.config
        self.has_cls = hasattr(inner, "pre_layrnorm")  # CLIP has a CLS token and a pre-norm; SigLIP has neither
        self.patch_size = self.config.patch_size

    def _layers(self):
        return self.model.encoder.layers

    def _embed(self, pixel_values):
        dtype = self.model.embeddings.patch_embedding.weight.dtype
        hidden = self.model.embeddings(pixel_values.to(dtype))
        if self.has_cls:
            hidden = self.model.pre_layrnorm(hidden)
        return hidden

    def _patch_grid(self, pixel_values):
        return 1, pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size

    def _qkv(self, layer_index, hidden):
        layer = self._layers()[layer_index]
        attn = layer.self_attn
        normed = layer.layer_norm1(hidden)
        shape = (*normed.shape[:-1], -1, attn.head_dim)
        q, k, v = (proj(normed).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        return q, k, v, attn.scale

    def _run_layer(self, layer_index, hidden):
        return self._layers()[layer_index](hidden, None)

    def _run_layer_capturing(self, layer_index, hidden):
        # The signals read the q/k/v the layer's own attention computes (the same LayerNorm and projections on the
        # same input as `_qkv`), so asking for signals costs no second projection of every token.
        attn = self._layers()[layer_index].self_attn
        captured = {}
        handles = [getattr(attn, f"{name}_proj").register_forward_hook(
            lambda module, args, output, name=name: captured.__setitem__(name, output)) for name in "qkv"]
        try:
            output = self._run_layer(layer_index, hidden)
        finally:
            for handle in handles:
                handle.remove()
        shape = (*hidden.shape[:-1], -1, attn.head_dim)
        q, k, v = (captured[name].view(shape).transpose(1, 2) for name in "qkv")
        return output, (q, k, v, attn.scale)


def is_hf_vit(model) -> bool:
    inner = getattr(model, "vision_model", model)
    return hasattr(inner, "embeddings") and hasattr(inner, "encoder") and hasattr(getattr(inner, "encoder"), "layers")
