"""Shared pieces of the class-conditional AR image generators: config, class/null embedding, save/load."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tokenomy.checkpoint import load_checkpoint, save_checkpoint
from tokenomy.errors import InputError, UnknownNameError
from tokenomy.generation.rope2d import CONDITION_ROPE, condition_rotation, grid_angles, rotations
from tokenomy.generation.transformer import TransformerConfig, Trunk

GENERATORS: dict[str, type["ARGenerator"]] = {}


def register(name: str):
    def wrap(cls):
        cls.kind = name
        GENERATORS[name] = cls
        return cls

    return wrap


@dataclass
class ARConfig:
    vocab_size: int = 256
    num_classes: int = 16
    grid_rows: int = 8
    grid_cols: int = 8
    width: int = 128
    depth: int = 4
    heads: int = 4
    class_dropout: float = 0.1
    dropout: float = 0.0
    ffn_multiple_of: int = 64
    # class-token RoPE row: "zero" as LlamaGen / RandAR (cos = sin = 0); "identity" (angle 0) is what the models
    # tokenomy trained before that fix learned with, kept so their checkpoints compute what they were trained on
    condition_rope: str = "zero"


class ARGenerator(nn.Module):
    """Token ids [B, N] over a rows x cols grid (a 1D sequence is a 1 x N grid), conditioned on a class label."""

    kind = "abstract"

    def __init__(self, config: ARConfig):
        super().__init__()
        self.config = config
        self.token_embed = nn.Embedding(config.vocab_size, config.width)
        self.class_embed = nn.Embedding(config.num_classes + 1, config.width)  # last row = null class for CFG
        self.trunk = Trunk(TransformerConfig(config.width, config.depth, config.heads, config.ffn_multiple_of, config.dropout), config.vocab_size)
        if config.condition_rope not in CONDITION_ROPE:
            raise UnknownNameError("condition rope", config.condition_rope, CONDITION_ROPE)
        cells = rotations(grid_angles(config.grid_rows, config.grid_cols, self.trunk.head_dim))
        self.register_buffer("cell_rotations", cells, persistent=False)
        self.forward_passes = 0

    @property
    def num_tokens(self) -> int:
        return self.config.grid_rows * self.config.grid_cols

    def condition_rotation(self, batch: int) -> torch.Tensor:
        return condition_rotation(self.config.condition_rope, batch, self.trunk.head_dim, self.cell_rotations.device)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def check_labels(self, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.ndim != 1 or (labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.null_class)):
            raise InputError(f"labels must be a 1D tensor of class ids in [0, {self.config.num_classes}], got {labels.tolist()}")
        return labels

    def drop_labels(self, labels: torch.Tensor, generator=None) -> torch.Tensor:
        drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.config.class_dropout
        return torch.where(drop, torch.full_like(labels, self.null_class), labels)

    def cfg_labels(self, labels: torch.Tensor, guided: bool) -> torch.Tensor:
        return torch.cat([labels, torch.full_like(labels, self.null_class)]) if guided else labels

    def check_tokens(self, tokens: torch.Tensor, name: str = "tokens") -> None:
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise InputError(f"{name} must lie in [0, {self.config.vocab_size}), got range [{int(tokens.min())}, {int(tokens.max())}]")

    def save(self, directory) -> None:
        save_checkpoint(directory, self.kind, self.config, self)


def load_generator(directory) -> ARGenerator:
    """Build a generator from a local folder written by `ARGenerator.save`.

    A config without `condition_rope` was saved before the field existed, by a model trained with angle 0.
    """
    return load_checkpoint(directory, "generator", GENERATORS,
                           lambda cls, config: cls(ARConfig(**{"condition_rope": "identity", **config})))
