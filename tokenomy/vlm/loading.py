"""Loading a model folder from disk, refusing anything that would load wrong: every problem is a ModelLoadError or
InputError naming the folder, file, tensor or option, and nothing is ever downloaded."""
from __future__ import annotations

import json
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from tokenomy.errors import InputError, ModelLoadError

DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def resolve_dtype(dtype):
    """None, "auto" (the checkpoint's own dtype), a torch.dtype, or a name such as "bfloat16" / "torch.float16"."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.lower().removeprefix("torch.")]
    raise InputError(f"dtype {dtype!r} is not supported; use one of {', '.join(sorted(set(DTYPES)))}, 'auto' or a torch.dtype")


def missing_folder_error(model: str) -> ModelLoadError:
    if HUB_ID.match(model):
        local = model.split("/")[1]
        return ModelLoadError(
            f"no folder {model} here. If it is a Hugging Face Hub id: tokenomy never downloads, so fetch it yourself "
            f"(e.g. `hf download {model} --local-dir ./{local}`) and pass that folder, e.g. tokenomy.load('./{local}')")
    return ModelLoadError(f"model folder {model} does not exist or is not a folder")


def read_config(path: Path, supported: list[str]) -> dict:
    from transformers import CONFIG_MAPPING, __version__

    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{path} has no config.json: not a model folder in Hugging Face format")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{config_path} is not valid JSON: {exc}") from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        raise ModelLoadError(f"{config_path} has no model_type field; supported models: {', '.join(supported)}")
    if model_type not in CONFIG_MAPPING:
        raise ModelLoadError(f"{config_path} has model_type {model_type!r}, which transformers {__version__} does not "
                             f"know; supported models: {', '.join(supported)}")
    return config


def weight_files(path: Path) -> list[Path]:
    return sorted(p for pattern in WEIGHT_PATTERNS for p in path.glob(pattern))


def check_safetensors_headers(files: list[Path]) -> None:
    """Read each header (cheap): a truncated or corrupted file fails here, named, instead of deep in transformers."""
    from safetensors import safe_open

    for file in files:
        if file.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception as exc:  # safetensors raises its own SafetensorError, and OSError for unreadable files
            raise ModelLoadError(f"corrupted or truncated weights file {file}: {exc}") from exc


@contextmanager
def _quiet_transformers():
    """transformers logs its own load report; ours replaces it, so the user reads one message, not two."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def check_loading_info(path: Path, files: list[Path], info: dict) -> None:
    where = ", ".join(str(f) for f in files) or str(path)
    if info["missing_keys"]:
        names = sorted(info["missing_keys"])
        raise ModelLoadError(f"{where} lacks {len(names)} tensor(s) the model needs (they would be random): "
                             f"{', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")
    if info["mismatched_keys"]:
        shapes = sorted(f"{name} is {tuple(found)} in the file but {tuple(expected)} in the model"
                        for name, found, expected in info["mismatched_keys"])
        raise ModelLoadError(f"{where} does not fit the model of its config.json: {'; '.join(shapes[:10])}")
    if info["error_msgs"]:
        raise ModelLoadError(f"{where}: {'; '.join(info['error_msgs'])}")
    if info["unexpected_keys"]:
        names = sorted(info["unexpected_keys"])
        warnings.warn(f"{where} holds {len(names)} tensor(s) the model does not use (ignored): "
                      f"{', '.join(names[:10])}{' ...' if len(names) > 10 else ''}", stacklevel=3)


def load_local(path: Path, dtype, supported: list[str]):
    """(model, processor) from a local Hugging Face folder; `supported` are the architectures tokenomy adapts."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    config = read_config(path, supported)
    architectures = config.get("architectures") or []
    if not any(name in supported for name in architectures):
        raise ModelLoadError(f"{path} holds a {architectures or config['model_type']} model; supported: {', '.join(supported)}")
    files = weight_files(path)
    if not files and not (path / "model.safetensors.index.json").is_file():
        raise ModelLoadError(f"{path} has no weights (expected model.safetensors, sharded *.safetensors or pytorch_model.bin)")
    check_safetensors_headers(files)
    try:
        with _quiet_transformers():
            # Shape mismatches come back in the loading info, so that our error names them; nothing is kept re-initialised.
            model, info = AutoModelForImageTextToText.from_pretrained(
                path, local_files_only=True, dtype=dtype or "auto", output_loading_info=True, ignore_mismatched_sizes=True)
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"{path}: {type(exc).__name__}: {exc}") from exc
    check_loading_info(path, files, info)
    return model, processor
