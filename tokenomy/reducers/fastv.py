"""FastV (reducers.md §6): after LLM layer K, drop the visual tokens the last prompt token attended to least.

Scores come from layer K-1: the head-averaged softmax row of the last prompt token over the whole prefix, read at the
image's visual positions. Layers 0..K-1 see every token; layers >= K see `keep` visual tokens per image, which keep
their original position ids (P-keep), as in FastV's KV-cache implementation.
"""
from tokenomy.errors import InputError
from tokenomy.reducers.base import LAST_TEXT_ATTENTION, Reducer, Selection, Site, top_k_sorted
from tokenomy.reducers.registry import register


@register("fastv")
class FastV(Reducer):
    description = "after LLM layer K, drop the visual tokens the last prompt token attended to least"
    paper = "Chen et al., An Image is Worth 1/2 Tokens After Layer 2 (FastV), ECCV 2024, arXiv 2403.06764"
    site = Site.LLM

    def __init__(self, keep=None, layer: int = 2):
        super().__init__(keep=keep)
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise InputError(f"fastv layer must be an integer >= 1 (layers before it see every token), got {layer!r}")
        self.layer = layer

    def llm_layers(self, num_layers):
        if self.layer >= num_layers:
            raise InputError(f"fastv layer {self.layer} must be in 1..{num_layers - 1} for this {num_layers}-layer LLM")
        return (self.layer,)

    def llm_request(self, layer):
        return (LAST_TEXT_ATTENTION,)

    def select(self, image):
        scores = image.signals[LAST_TEXT_ATTENTION]
        return Selection.from_indices(image, top_k_sorted(scores, self.budget(image)))
