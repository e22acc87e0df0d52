"""Seeded uniform random pruning: the baseline every reducer must beat."""
import torch

from tokenomy.reducers.base import Reducer, Selection
from tokenomy.reducers.registry import register


@register("random")
class RandomReduction(Reducer):
    description = "seeded uniform random pruning, the baseline every reducer must beat"
    paper = "-"
    def __init__(self, keep=None, seed: int = 0):
        super().__init__(keep=keep)
        self.seed = seed

    def select(self, image):
        k = self.budget(image)
        # The draw depends only on the seed and the image's token count, never on the batch it came in.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + image.num_tokens)
        kept = torch.randperm(image.num_tokens, generator=generator)[:k].sort().values
        return Selection.from_indices(image, kept)
