"""DivPrune (peers.md §3, reducers.md §0.3): keep the most diverse visual tokens, after the projector.

Greedy max-min diversity on cosine distance between the LLM-dim visual tokens (`tokenomy.ops.max_min_diversity`,
unweighted): the first pick has the largest distance to its nearest neighbour, each next pick the largest distance to
the picked set; kept in raster order. Follows vbdi/divprune `LLaVA/llava/model/llava_arch.py` (the pruning function
called from `prepare_inputs_labels_for_multimodal`); attention-free.

Differences, by design: the official code finds the image at the fixed offset 35 of sample 0 and applies that row's
choice to the whole batch; here every image of every sample is pruned on its own tokens (batch > 1, several images).
Without `keep`, `ratio` of the tokens are kept (the official SUBSET_RATIO default, 0.098), rounded as the official
`int(round(ratio * n))`. On LLaVA-NeXT the candidates are the packed patches without the newline tokens (the official
code lets newlines compete).
"""
from tokenomy.errors import InputError
from tokenomy.ops import cosine_distance, max_min_diversity
from tokenomy.reducers.base import Reducer, Selection, Site
from tokenomy.reducers.registry import register


@register("divprune")
class DivPrune(Reducer):
    description = "max-min diversity of the projected visual tokens (cosine distance), attention-free"
    paper = "Alvar et al., DivPrune, CVPR 2025 (arXiv 2503.02175)"
    site = Site.POST_PROJECTOR

    def __init__(self, keep=None, ratio: float = 0.098):
        super().__init__(keep=keep)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise InputError(f"divprune ratio must be a number in (0, 1], got {ratio!r}")
        self.ratio = float(ratio)

    def budget(self, image):
        if self.keep is None:
            return max(1, int(round(self.ratio * image.num_tokens)))
        return super().budget(image)

    def select(self, image):
        distance = cosine_distance(image.features.float().nan_to_num())
        return Selection.from_indices(image, max_min_diversity(distance, self.budget(image)))
