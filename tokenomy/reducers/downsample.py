"""Downsample: feed the model a smaller image, so its processor makes fewer visual tokens (the VTC-Bench baseline).

Before the processor, the image is resized (bicubic, aspect ratio kept) to the pixel area that `keep` LLM tokens
cover: keep * t^2 pixels, with t the side in pixels of one LLM token (Qwen2-VL: patch_size * merge_size; LLaVA: the
patch size). What that does depends on the processor, and the stats report the tokens actually made:
- Qwen2-VL / Qwen2.5-VL keep the image's size within [min_pixels, max_pixels]: the smaller image makes fewer tokens,
  at most `keep` (each side is a whole number of tokens, rounded down) unless the processor's min_pixels needs more:
  then the grid grows, aspect kept, to the fewest tokens min_pixels allows (a processor with min_pixels =
  max_pixels, like ref-qwen's, always makes its fixed count, and an image already at that size is left as it is:
  there downsample changes nothing);
- LLaVA-1.5 / composed models (CLIP processors) resize every image to a fixed size (336 px), so the image is scaled
  back up: it reduces the information in the image, NOT the number of tokens; LLaVA-NeXT picks fewer or smaller
  tiles only as its grid pinpoints allow. Use it there as a detail-reduction baseline, not as a token budget.
No selection happens at any site: every token the processor made enters the LLM.
"""
import math

from tokenomy.reducers.base import Reducer, Selection, Site
from tokenomy.reducers.registry import register


def token_pixels(processor) -> int:
    """Side in pixels of one LLM token for this processor."""
    image_processor = getattr(processor, "image_processor", processor)
    patch = getattr(image_processor, "patch_size", None) or getattr(processor, "patch_size", None) or 14
    if isinstance(patch, dict):
        patch = patch.get("height", 14)
    return int(patch) * int(getattr(image_processor, "merge_size", 1) or 1)


def min_pixels(processor) -> int:
    """The fewest pixels a size-keeping (Qwen2-VL style) processor scales an image up to; 0 for the others."""
    image_processor = getattr(processor, "image_processor", processor)
    if not getattr(image_processor, "merge_size", None):
        return 0
    size = getattr(image_processor, "size", None) or {}
    return int(getattr(image_processor, "min_pixels", None) or size.get("shortest_edge", 0) or 0)


@register("downsample")
class Downsample(Reducer):
    description = "feed a smaller image (area of keep tokens); fewer tokens only where the processor keeps sizes (Qwen)"
    paper = "baseline (image downsampling; Liao et al., VTC-Bench, arXiv 2510.07143)"
    site = Site.PRE_PROJECTOR

    def prepare_image(self, image, processor):
        if self.keep is None:
            return image
        side = token_pixels(processor)
        width, height = image.size
        scale = math.sqrt(self.keep * side * side / (width * height))
        if scale >= 1:
            return image
        # Whole tokens per side, rounded down, so the processor's own rounding cannot exceed the budget; then grown,
        # keeping the aspect ratio, up to the processor's minimum, which it would otherwise enforce by rounding up.
        ideal_columns, ideal_rows = width * scale / side, height * scale / side
        columns = max(1, min(int(ideal_columns), self.keep))
        rows = max(1, min(int(ideal_rows), self.keep // columns))
        while rows * columns * side * side < min_pixels(processor):
            if columns / ideal_columns <= rows / ideal_rows:
                columns += 1
            else:
                rows += 1
        from PIL import Image

        return image.resize((columns * side, rows * side), Image.BICUBIC)

    def select(self, image):
        return Selection.keep_all(image)
