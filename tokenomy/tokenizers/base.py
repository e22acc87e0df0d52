"""Common interface of the image tokenizers and their on-disk format (config.json + model.safetensors)."""
from __future__ import annotations

import torch
from torch import nn

from tokenomy.checkpoint import load_checkpoint, save_checkpoint
from tokenomy.errors import InputError

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
        save_checkpoint(directory, self.kind, self.config, self)


def load_tokenizer(directory) -> ImageTokenizer:
    """Build a tokenizer from a local folder written by `ImageTokenizer.save`."""
    def build(cls, config):  # JSON turns the config's tuples into lists
        return cls(cls.config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}))

    return load_checkpoint(directory, "tokenizer", TOKENIZERS, build)
