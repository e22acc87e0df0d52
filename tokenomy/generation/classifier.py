"""Small CNN classifier trained on the offline data: its 128-d penultimate features feed local FID/KID, and its
class log-probabilities serve as the small local verifier for test-time search."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from tokenomy.errors import ModelLoadError


class SmallClassifier(nn.Module):
    def __init__(self, num_classes: int = 16, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.num_classes, self.width, self.feature_dim = num_classes, width, feature_dim

        def stage(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.body = nn.Sequential(stage(3, width), stage(width, 2 * width), stage(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.features_head = nn.Sequential(nn.Linear(4 * width, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_head(self.body(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def save(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps({"num_classes": self.num_classes, "width": self.width, "feature_dim": self.feature_dim}))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / "model.safetensors"))

    @classmethod
    def load(cls, directory) -> "SmallClassifier":
        directory = Path(directory)
        if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
            raise ModelLoadError(f"{directory} lacks config.json or model.safetensors (a local classifier folder is required)")
        model = cls(**json.loads((directory / "config.json").read_text()))
        model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
        return model.eval()


def classifier_loss(model: SmallClassifier, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(images), labels)
