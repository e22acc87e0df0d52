"""Common interface of the image tokenizers and their on-disk format (config.json + model.safetensors)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tokenomy.errors import InputError, ModelLoadError, UnknownNameError

TOKENIZERS: dict[str, type["ImageTokenizer"]] = {}


def register(name: str):
    def wrap(cls):
        cls.kind = name
        TOKENIZERS[name] = cls
        return cls

    return wrap


class ImageTokenizer(nn.Module):
    """Images in [-1, 1], NCHW  <->  int64 token ids [B, L]."""

    kind = "abstract"
    config_class: type = object

    def __init__(self, config):
        super().__init__()
        self.config = config

    @property
    def num_tokens(self) -> int:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def check_images(self, images: torch.Tensor) -> None:
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (size, size):
            raise InputError(f"{self.kind} tokenizer expects images [B, 3, {size}, {size}], got {tuple(images.shape)}")

    def save(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"kind": self.kind, **dataclasses.asdict(self.config)}
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / "model.safetensors"))


def load_tokenizer(directory) -> ImageTokenizer:
    """Build a tokenizer from a local folder written by `ImageTokenizer.save`."""
    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise ModelLoadError(f"{directory} lacks config.json or model.safetensors (a local tokenizer folder is required)")
    config = json.loads(config_path.read_text())
    kind = config.pop("kind", None)
    if kind not in TOKENIZERS:
        raise UnknownNameError("tokenizer", str(kind), TOKENIZERS)
    cls = TOKENIZERS[kind]
    model = cls(cls.config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}))
    model.load_state_dict(load_file(str(weights_path)), strict=True)
    return model.eval()
