"""Pictures of what a reducer kept and merged: `draw_selection(generation)`.

Drawn over the image as the vision encoder saw it (`Generation.views`): a token the last LLM layer read is shown
unchanged, a dropped one dimmed toward black by DIM, and each merged group (two or more original tokens living on in
one kept token) outlined in a colour of its own, as ToMe's visualiser outlines its merged regions.
"""
from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image

from tokenomy.errors import InputError
from tokenomy.io import load_image

DIM = 0.3  # a dropped token's pixels are multiplied by this (rounded)
GOLDEN_RATIO = 0.618033988749895  # hue step between successive group colours: neighbours stay far apart on the wheel


def group_colour(rank: int) -> tuple:
    """RGB of the rank-th merged group (groups ranked by their kept token's index)."""
    red, green, blue = colorsys.hsv_to_rgb((rank * GOLDEN_RATIO) % 1.0, 1.0, 1.0)
    return round(red * 255), round(green * 255), round(blue * 255)


def draw_selection(generation, image=None, index: int = 0, dim: float = DIM) -> Image.Image:
    """The picture of image `index` of one `Generation` (from `Pipeline.generate`).

    image: optional, the prompt's original image (anything tokenomy.io.load_image reads); the picture is then scaled up
    (nearest neighbour, so every cell stays sharp) to the largest whole multiple that fits inside it, for showing the
    two side by side. The picture itself is always drawn over the processed image the Generation carries.
    """
    views = getattr(generation, "views", None)
    if not views:
        raise InputError("this Generation carries no image views (it answered a prompt without images, or does not come "
                         "from tokenomy's Pipeline.generate)")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(views):
        raise InputError(f"index={index!r} names no image of this prompt; it has {len(views)} (0..{len(views) - 1})")
    view = views[index]
    if view is None:
        raise InputError(f"item {index} of this prompt is a video or an audio; draw_selection draws images")
    if not 0.0 <= dim <= 1.0:
        raise InputError(f"dim must be in [0, 1], got {dim!r}")
    picture = Image.fromarray(_drawn(view, dim))
    if image is not None:
        width, height = load_image(image).size
        scale = max(1, min(width // picture.width, height // picture.height))
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return picture


def _drawn(view, dim: float) -> np.ndarray:
    pixels = view.pixels.numpy()
    out = np.rint(pixels * dim).astype(np.uint8)  # float64, the rounding a reader reproduces with numpy
    boxes, owner = view.boxes.tolist(), view.owner
    for token in torch.nonzero(owner >= 0).squeeze(1).tolist():
        x0, y0, x1, y1 = boxes[token]
        out[y0:y1, x0:x1] = pixels[y0:y1, x0:x1]
    label = np.full(pixels.shape[:2], -1, dtype=np.int64)
    sizes = torch.bincount(owner[owner >= 0], minlength=len(owner))
    merged = torch.nonzero(sizes > 1).squeeze(1).tolist()
    for token in torch.nonzero(owner >= 0).squeeze(1).tolist():
        if sizes[owner[token]] > 1:
            x0, y0, x1, y1 = boxes[token]
            label[y0:y1, x0:x1] = int(owner[token])
    edge = _boundary(label)
    for rank, kept in enumerate(merged):
        out[edge & (label == kept)] = group_colour(rank)
    return out


def _boundary(label: np.ndarray) -> np.ndarray:
    """Pixels of a labelled region with a 4-neighbour outside it (or on the picture's border)."""
    padded = np.pad(label, 1, constant_values=-1)
    centre = padded[1:-1, 1:-1]
    differs = np.zeros_like(centre, dtype=bool)
    for shifted in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
        differs |= shifted != centre
    return differs & (centre >= 0)
