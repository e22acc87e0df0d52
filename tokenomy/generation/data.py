"""Offline image data: procedural Shapes-32 (16 classes = 4 shapes x 4 colours) and scikit-learn Digits-32."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tokenomy.errors import UnknownNameError

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1)}
NUM_SHAPE_CLASSES = len(SHAPES) * len(COLOURS)


def shape_class_name(label: int) -> str:
    return f"{list(COLOURS)[label % len(COLOURS)]} {SHAPES[label // len(COLOURS)]}"


def _signed_inside(shape: int, x: torch.Tensor, y: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Positive inside the shape, negative outside, roughly in pixel units once scaled by the caller."""
    if shape == 0:
        return size - torch.sqrt(x * x + y * y)
    if shape == 1:
        return 0.85 * size - torch.maximum(x.abs(), y.abs())
    if shape == 2:
        return torch.minimum(y + 0.5 * size, (size - math.sqrt(3) * x.abs() - y) / 2)
    arm = size / 3
    horizontal = torch.minimum(arm - y.abs(), size - x.abs())
    vertical = torch.minimum(arm - x.abs(), size - y.abs())
    return torch.maximum(horizontal, vertical)


def make_shapes(labels: torch.Tensor, image_size: int = 32, generator: torch.Generator | None = None) -> torch.Tensor:
    """Render one image per label in [-1, 1]: random centre, scale, rotation, colour jitter and gradient background."""
    n = labels.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=generator)
    coords = (torch.arange(image_size) + 0.5) / image_size * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    centre = (rand(n, 2) - 0.5) * 0.8
    size = 0.35 + 0.3 * rand(n)
    angle = rand(n) * 2 * math.pi
    dx, dy = xx[None] - centre[:, 0, None, None], yy[None] - centre[:, 1, None, None]
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    rx, ry = cos * dx + sin * dy, -sin * dx + cos * dy
    images = torch.empty(n, 3, image_size, image_size)
    base = 0.15 + 0.35 * rand(n, 1, 1, 1)
    tint = 0.1 * (rand(n, 3, 1, 1) - 0.5)
    direction = rand(n) * 2 * math.pi
    ramp = (direction.cos()[:, None, None] * xx + direction.sin()[:, None, None] * yy)[:, None] * 0.12
    background = (base + tint + ramp).clamp(0, 1)
    colours = torch.tensor(list(COLOURS.values()))
    for i in range(n):
        label = int(labels[i])
        inside = _signed_inside(label // len(COLOURS), rx[i], ry[i], size[i])
        alpha = (inside * image_size / 2 + 0.5).clamp(0, 1)[None]
        colour = (colours[label % len(COLOURS)] + 0.08 * (rand(3) - 0.5)).clamp(0, 1)[:, None, None]
        images[i] = alpha * colour + (1 - alpha) * background[i]
    return images * 2 - 1


def shapes_batch(batch: int, image_size: int = 32, generator: torch.Generator | None = None):
    labels = torch.randint(NUM_SHAPE_CLASSES, (batch,), generator=generator)
    return make_shapes(labels, image_size, generator), labels


def load_digits32(split: str = "train"):
    """scikit-learn's bundled 8x8 digits, upsampled x4 to 32x32, 3 channels, in [-1, 1]; 1500 train / 297 test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False).clamp(0, 1)
    images = images.expand(-1, 3, -1, -1) * 2 - 1
    labels = torch.tensor(digits.target, dtype=torch.long)
    if split == "train":
        return images[:1500].contiguous(), labels[:1500]
    if split == "test":
        return images[1500:].contiguous(), labels[1500:]
    raise UnknownNameError("split", split, ["train", "test"])


DATASETS = {"shapes": NUM_SHAPE_CLASSES, "digits": 10}


def sample_batch(dataset: str, batch: int, generator: torch.Generator, image_size: int = 32, split: str = "train"):
    """A training batch of (images, labels) from `dataset`; shapes are generated fresh, digits are drawn with flips off."""
    if dataset == "shapes":
        return shapes_batch(batch, image_size, generator)
    if dataset == "digits":
        images, labels = load_digits32(split)
        picks = torch.randint(images.shape[0], (batch,), generator=generator)
        return images[picks], labels[picks]
    raise UnknownNameError("dataset", dataset, DATASETS)


def image_pool(dataset: str, size: int, seed: int = 1, image_size: int = 32, cache=None):
    """A fixed set of (images, labels), optionally cached on disk as uint8 so several trainings share it."""
    from pathlib import Path

    if cache is not None and Path(cache).is_file():
        stored = torch.load(cache, weights_only=True)
        if stored["images"].shape[0] >= size:
            return stored["images"][:size].float() / 127.5 - 1, stored["labels"][:size]
    generator = torch.Generator().manual_seed(seed)
    chunks = [sample_batch(dataset, min(500, size - start), generator, image_size) for start in range(0, size, 500)]
    images, labels = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
    if cache is not None:
        torch.save({"images": ((images + 1) * 127.5).round().to(torch.uint8), "labels": labels}, cache)
    return ((images + 1) * 127.5).round() / 127.5 - 1, labels
