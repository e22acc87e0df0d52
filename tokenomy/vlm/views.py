"""What one image's visual tokens became, in pixels: the data `tokenomy.vis` draws (`Generation.views`).

The adapters know how a family lays an image out (LLaVA's square crop, LLaVA-NeXT's base view and tiles, Qwen's 2x2
merge units); here that layout meets the pipeline's record of which tokens the last LLM layer read and which original
tokens each of them holds.
"""
from __future__ import annotations

from typing import Callable

import torch


class TokenView:
    """One image of a prompt, worked out on first use (a Generation carries one per image; most are never drawn).

    pixels: uint8 [H, W, 3], the image as the vision encoder saw it (resized and cropped by the processor; LLaVA-NeXT:
    its base view, then its tiles in their grid). boxes: [N0, 4] (x0, y0, x1, y1) pixel box of each reducible token of
    the unreduced image, by index (the indices of `stats["kept_indices"]`). kept: [K] the tokens the last LLM layer
    read. owner: [N0] for each token the index of the kept token it lives on in (itself when kept, the kept token it
    was merged into), -1 when dropped. groups_known: False when a merge happened whose members cannot be traced back
    (an encoder-site prune before an encoder-site merge, or a merge inside the LLM); owner then covers kept tokens only.
    """

    def __init__(self, build: Callable[[], dict]):
        self._build, self._fields = build, None

    def _field(self, name: str):
        if self._fields is None:
            self._fields, self._build = self._build(), None
        return self._fields[name]

    def __getstate__(self):  # pickled (multiprocessing, a UI's session state) as plain tensors, not the closure
        self._field("pixels")
        return {"_build": None, "_fields": self._fields}

    pixels = property(lambda self: self._field("pixels"))
    boxes = property(lambda self: self._field("boxes"))
    kept = property(lambda self: self._field("kept"))
    owner = property(lambda self: self._field("owner"))
    groups_known = property(lambda self: self._field("groups_known"))


def unnormalised(pixels: torch.Tensor, image_processor) -> torch.Tensor:
    """uint8 [H, W, 3] of a processor's normalised float image [3, H, W] (its own mean, std and rescale factor)."""
    image = pixels.detach().float().cpu()
    if getattr(image_processor, "do_normalize", True):
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(image_processor.image_std, dtype=torch.float32)[:, None, None]
        image = image * std + mean
    if getattr(image_processor, "do_rescale", True):
        image = image / image_processor.rescale_factor
    return image.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()


def cell_boxes(rows: int, columns: int, cell_height: int, cell_width: int) -> torch.Tensor:
    """[rows * columns, 4] (x0, y0, x1, y1) of a raster grid of cells starting at the top-left corner."""
    y0 = torch.arange(rows).repeat_interleave(columns) * cell_height
    x0 = torch.arange(columns).repeat(rows) * cell_width
    return torch.stack([x0, y0, x0 + cell_width, y0 + cell_height], dim=1)


def owners(num_tokens: int, survivors: torch.Tensor, final_index: torch.Tensor, sources, column_index) -> tuple:
    """(owner [num_tokens], groups_known) as TokenView defines them.

    survivors: [K] reducible indices the last LLM layer read. final_index: [F] reducible index of each token leaving the
    vision sites (survivors are among them). sources: [F, C] what each of those holds, or None when nothing merged.
    column_index: [C] reducible index of each source column (-1: none), or None when the columns cannot be traced.
    """
    owner = torch.full((num_tokens,), -1, dtype=torch.long)
    survivors = survivors.long().cpu()
    owner[survivors] = survivors
    if sources is None:
        return owner, True
    if column_index is None:
        return owner, False
    row_of = torch.full((num_tokens,), -1, dtype=torch.long)
    row_of[final_index.long().cpu()] = torch.arange(len(final_index))
    rows = row_of[survivors]
    if bool((rows < 0).any()):  # a survivor the vision sites did not give: it moved inside the LLM
        return owner, False
    holds = sources.detach().float().cpu()[rows] > 0  # [K, C]
    member, column = torch.nonzero(holds, as_tuple=True)
    original = column_index.long().cpu()[column]
    traced = original >= 0
    owner[original[traced]] = survivors[member[traced]]
    owner[survivors] = survivors
    return owner, True
