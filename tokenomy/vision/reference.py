"""Vision encoders from a local folder or a built-in name, wrapped in tokenomy's encoder interface.

The built-in `ref-clip` is the project's contrastively trained CLIP (`tokenomy train-clip`, shipped in
tokenomy/assets/ref-clip as a transformers CLIPModel folder); the reference VLMs read its tower the way LLaVA reads
OpenAI's CLIP.
"""
from __future__ import annotations

import os
from pathlib import Path

from tokenomy.errors import InputError, ModelLoadError, UnknownNameError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_ENCODERS = ("ref-clip",)


def _folder(model) -> Path:
    if isinstance(model, str) and model in BUILTIN_ENCODERS:
        folder = ASSETS / model
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{model}: the shipped checkpoint {folder} is missing; retrain it with `tokenomy train-clip`")
        return folder
    if not isinstance(model, (str, os.PathLike)):
        raise InputError(f"vision encoder must be a built-in name or a local folder, got {type(model).__name__}")
    folder = Path(model)
    if folder.is_dir():
        return folder
    if folder.exists():
        raise ModelLoadError(f"vision encoder {model}: a file, not a model folder")
    if os.sep in str(model):
        raise ModelLoadError(f"vision encoder folder {model} does not exist")
    raise UnknownNameError("vision encoder", str(model), BUILTIN_ENCODERS)


def load(model, device=None, dtype=None):
    """The vision tower of a transformers CLIP / SigLIP folder (a whole CLIPModel or a CLIPVisionModel) or of the
    built-in `ref-clip`, as a `VisionEncoder` in eval mode; its image processor is `encoder.image_processor`."""
    from transformers import AutoImageProcessor, AutoModel

    from tokenomy.vision import wrap_encoder

    folder = _folder(model)
    try:
        hf_model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=dtype)
        image_processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"vision encoder folder {folder}: {str(error).splitlines()[0]}") from error
    tower = getattr(hf_model, "vision_model", hf_model)
    if device is not None:
        tower = tower.to(device)
    encoder = wrap_encoder(tower.eval())
    encoder.image_processor = image_processor
    encoder.name = model if isinstance(model, str) and model in BUILTIN_ENCODERS else folder.name
    return encoder
