"""k x k average pooling of the patch grid, before the projector: the simplest merge baseline.

Tokens are grouped by their TRUE grid cell (t, h // k, w // k) (on Qwen the merged grid, one token per 2x2 unit; on
LLaVA-NeXT per crop) and each group is averaged into one token that takes the position of the group's top-left
token (its first in raster order), so positions stay true grid positions of a real patch. Only the tokens present are
pooled, so after an earlier stage or LLaVA-NeXT's unpadding a border cell averages fewer tokens. k is `kernel`, or,
with a budget, the smallest k whose non-empty cells fit in `keep` (k = 2 on a 16x16 grid at keep 64, 4 at keep 28 or
16): a uniform grid cannot hit every budget, so pool keeps at most `keep` tokens, not exactly `keep`.
"""
import torch

from tokenomy.errors import InputError
from tokenomy.reducers.base import Reducer, Selection, Site
from tokenomy.reducers.registry import register


def pool_cells(positions: torch.Tensor, kernel: int) -> torch.Tensor:
    """Cell id of each token [N] (ids are 0..M-1 in raster order of the cells)."""
    cells = torch.stack([positions[:, 0], positions[:, 1] // kernel, positions[:, 2] // kernel], dim=1)
    return torch.unique(cells, dim=0, return_inverse=True)[1]


@register("pool")
class Pool(Reducer):
    description = "k x k average pooling of the patch grid (k from keep, or given); top-left position per cell"
    paper = "baseline (average pooling of visual tokens, e.g. LLaVA-NeXT/LLaVA-OneVision bilinear/2x2 pooling)"
    site = Site.PRE_PROJECTOR

    def __init__(self, keep=None, kernel=None):
        super().__init__(keep=keep)
        if kernel is not None and (isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1):
            raise InputError(f"pool kernel must be an integer >= 1, got {kernel!r}")
        self.kernel = kernel

    def kernel_for(self, image) -> int:
        if self.kernel is not None:
            return self.kernel
        if self.keep is None:
            return 2
        positions = image.positions.reshape(image.num_tokens, -1, 3)[:, 0]
        kernel = 1
        while int(pool_cells(positions, kernel).max()) + 1 > self.keep:
            kernel += 1
        return kernel

    def select(self, image):
        positions = image.positions.reshape(image.num_tokens, -1, 3)[:, 0]  # a token's first position under multi
        cell = pool_cells(positions, self.kernel_for(image))
        cells = int(cell.max()) + 1
        token = torch.arange(image.num_tokens, device=cell.device)
        first = torch.full((cells,), image.num_tokens, dtype=torch.long, device=cell.device).scatter_reduce(0, cell, token, "amin")
        return Selection(first, image.positions[first], merge_index=cell)
