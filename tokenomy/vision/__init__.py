"""Vision encoders behind one interface: `wrap_encoder(model)` picks the wrapper for a library module."""
from __future__ import annotations

from tokenomy.errors import ModelLoadError
from tokenomy.vision.base import (
    CLS_ATTENTION,
    CLS_OR_MEAN_ATTENTION,
    CLS_VALUE_SIMILARITY,
    KEYS,
    MEAN_QUERY_ATTENTION,
    SIGNAL_NAMES,
    VALUES,
    EncoderState,
    SignalRequest,
    VisionEncoder,
    VisionOutput,
    attention_row,
)
from tokenomy.vision.hf import HFViTEncoder, is_hf_vit
from tokenomy.vision.qwen_vit import QwenViTEncoder, is_qwen_vit
from tokenomy.vision.open_clip_vit import OpenClipViTEncoder, is_open_clip_vit
from tokenomy.vision.timm_vit import TimmViTEncoder, is_timm_vit
from tokenomy.vision.reference import BUILTIN_ENCODERS, load

# (recognises the module, wraps it), tried in order; Qwen ViTs first, since they are transformers modules too.
_WRAPPERS = (
    (is_qwen_vit, QwenViTEncoder),
    (is_timm_vit, TimmViTEncoder),
    (is_open_clip_vit, OpenClipViTEncoder),
    (is_hf_vit, HFViTEncoder),
)


def _unwrap_library_container(model):
    """A whole open_clip CLIP model -> its `.visual`; open_clip's timm adapter -> its timm trunk."""
    if type(model).__module__.startswith("open_clip."):
        from open_clip.timm_model import TimmModel

        if hasattr(model, "visual") and hasattr(model, "encode_image"):
            model = model.visual
        if isinstance(model, TimmModel):
            model = model.trunk
    return model


def wrap_encoder(model) -> VisionEncoder:
    """The `VisionEncoder` for a timm, open_clip or transformers (CLIP/SigLIP) vision model."""
    if isinstance(model, VisionEncoder):
        return model
    model = _unwrap_library_container(model)
    for recognises, wrapper in _WRAPPERS:
        if recognises(model):
            return wrapper(model)
    raise ModelLoadError(
        f"no vision encoder wrapper for {type(model).__module__}.{type(model).__name__}; supported: timm "
        "VisionTransformer, open_clip VisionTransformer, transformers CLIP/SigLIP and Qwen2/2.5-VL vision models"
    )


__all__ = [
    "CLS_ATTENTION",
    "CLS_OR_MEAN_ATTENTION",
    "CLS_VALUE_SIMILARITY",
    "KEYS",
    "MEAN_QUERY_ATTENTION",
    "SIGNAL_NAMES",
    "VALUES",
    "EncoderState",
    "HFViTEncoder",
    "OpenClipViTEncoder",
    "SignalRequest",
    "TimmViTEncoder",
    "VisionEncoder",
    "VisionOutput",
    "attention_row",
    "BUILTIN_ENCODERS",
    "load",
    "wrap_encoder",
]
