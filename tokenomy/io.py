"""Images in: a file path, encoded bytes or a PIL image -> the RGB picture a processor expects, or an InputError
naming the image.

What is done to every image, so that none is silently wrong:
- EXIF orientation is applied (a phone photo taken upright is upright);
- 16-bit and 32-bit greyscale (modes I;16*, I) are scaled from 0..65535 to 0..255 instead of clipped at 255, and
  float greyscale (mode F) is read as 0..1 when its maximum is at most 1, else as 0..255;
- transparency is composited onto white, as transformers' own `convert_to_rgb` does;
- images wider or taller than 200:1 are refused: Qwen2-VL processors refuse them, and the others would stretch
  the short side into a resize of hundreds of thousands of pixels;
- files over PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, 2 x 89.5 megapixels) are refused.
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tokenomy.errors import InputError

MAX_ASPECT_RATIO = 200
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def load_image(image, name: str | None = None) -> Image.Image:
    """An RGB PIL image from a path, bytes or a PIL image; `name` labels bytes and PIL images in error messages."""
    if isinstance(image, Image.Image):
        return to_rgb(image, name or f"<PIL image {image.width}x{image.height}, mode {image.mode}>")
    if isinstance(image, (str, os.PathLike)):
        return _open(image, name or str(image))
    if isinstance(image, (bytes, bytearray)):
        return _open(io.BytesIO(bytes(image)), name or "<image bytes>")
    raise InputError(f"an image must be a PIL image, a file path or encoded bytes, got {type(image).__name__}")


def _open(source, name: str) -> Image.Image:
    try:
        with Image.open(source) as opened:
            opened.load()  # decode now, so a truncated file fails here and not deep inside the processor
            return to_rgb(opened, name)
    except InputError:
        raise
    except FileNotFoundError as exc:
        raise InputError(f"image file not found: {name}") from exc
    except Image.DecompressionBombError as exc:
        raise InputError(f"image {name} is too large to decode safely ({exc}); if you trust the file, raise "
                         "PIL.Image.MAX_IMAGE_PIXELS before loading it") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"cannot read image {name}: {exc}") from exc


def to_rgb(image: Image.Image, name: str) -> Image.Image:
    width, height = image.size
    if width == 0 or height == 0:
        raise InputError(f"image {name} is empty ({width}x{height} pixels)")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InputError(f"image {name} is {width}x{height} pixels, an aspect ratio over {MAX_ASPECT_RATIO}:1, which "
                         "vision processors cannot resize sensibly (Qwen2-VL refuses it); crop or pad it first")
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        image = Image.fromarray(_wide_grey_to_8bit(image), mode="L")
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    try:
        return image.convert("RGB")
    except ValueError as exc:  # modes PIL cannot convert to RGB (e.g. LAB, HSV)
        raise InputError(f"cannot convert image {name} from mode {image.mode} to RGB: {exc}") from exc


def _wide_grey_to_8bit(image: Image.Image) -> np.ndarray:
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
