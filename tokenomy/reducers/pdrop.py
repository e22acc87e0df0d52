"""PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247): drop visual tokens in stages at several LLM layers.

At each stage layer l, keep the visual tokens the last prompt token attends to most, in original order. As in the
official `pdrop_rank_drop`, the row is layer l's own: its input norm, q/k projections and rotary applied to the
hidden states entering it, before it runs on the fewer tokens (head-averaged softmax over the whole prefix, read at
the image's tokens, not renormalised). Stage s keeps a fraction `ratio` of what stage s-1 held: int(n * ratio) of
the n tokens it sees.

Layers: the official list (8, 16, 24) belongs to a 32-layer LLM; `layers` are given on an LLM of `reference_depth`
layers and scaled to the model's depth L as round(l * L / reference_depth), clamped to 1..L-1; stages that land on
the same layer become one (a 4-layer LLM gets 1, 2, 3; a 6-layer one 2, 3, 4; a 3-layer one 1, 2). Pass
reference_depth = your LLM's depth to use `layers` as they are. In a spec string: `pdrop:layers=2-8-16`.

Budget: without `keep`, the official ratio (0.5: 576 -> 288 -> 144 -> 72). With `keep`, the last stage keeps exactly
`keep` and the earlier ones follow the geometric ratio (keep / n0) ** (1 / stages), so `keep` means what it means for
the other in-LLM reducers (tokens after the method); the layer-averaged count is larger and is in the stats
(`visual_tokens_per_layer`).

Differences from the official code, both small: the official truncates int(n0 * ratio ** s) from the original
count, here each stage truncates from the count it sees (equal for the default ratio on 576 tokens); the official
renumbers positions after each stage, here kept tokens keep their position ids (P-keep).
"""
from tokenomy.errors import InputError
from tokenomy.reducers.base import STEP_LAYER_LAST_TEXT_ATTENTION, Reducer, Selection, Site, top_k_sorted
from tokenomy.reducers.registry import register


@register("pdrop")
class PyramidDrop(Reducer):
    description = "progressive in-LLM pruning at several layers by the last instruction token's attention"
    paper = "Xing et al., PyramidDrop, CVPR 2025, arXiv 2410.17247"
    site = Site.LLM
    stage_layers: tuple = ()  # the scaled stage layers, set by llm_layers once the model's depth is known

    def __init__(self, keep=None, layers: tuple = (8, 16, 24), ratio: float = 0.5, reference_depth: int = 32):
        super().__init__(keep=keep)
        if isinstance(layers, str):  # from a spec string: layers=2-8-16
            try:
                layers = tuple(int(part) for part in layers.replace("/", "-").split("-"))
            except ValueError:
                raise InputError(f"pdrop layers must be integers separated by '-' (layers=2-8-16), got {layers!r}") from None
        layers = (layers,) if isinstance(layers, int) and not isinstance(layers, bool) else layers
        if (not isinstance(layers, (tuple, list)) or not layers
                or any(isinstance(l, bool) or not isinstance(l, int) or l < 1 for l in layers)
                or list(layers) != sorted(set(layers))):
            raise InputError(f"pdrop layers must be increasing integers >= 1, got {layers!r}")
        if isinstance(reference_depth, bool) or not isinstance(reference_depth, int) or reference_depth <= max(layers):
            raise InputError(f"pdrop reference_depth must be an integer above every layer in {tuple(layers)}, got {reference_depth!r}")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise InputError(f"pdrop ratio must be in (0, 1], got {ratio!r}")
        self.layers, self.ratio, self.reference_depth = tuple(layers), float(ratio), reference_depth

    def llm_layers(self, num_layers):
        if num_layers < 2:
            raise InputError(f"pdrop needs an LLM of at least 2 layers (a stage acts before layer 1 or later), got {num_layers}")
        scaled = {min(max(round(layer * num_layers / self.reference_depth), 1), num_layers - 1) for layer in self.layers}
        # the stage of a step is its layer's rank here; the model's depth is fixed once a pipeline loads
        self.stage_layers = tuple(sorted(scaled))
        return self.stage_layers

    def llm_request(self, layer):
        return (STEP_LAYER_LAST_TEXT_ATTENTION,)

    def stage_count(self, tokens: int, stage: int, stages: int) -> int:
        """Tokens stage `stage` (1-based) of `stages` keeps of the `tokens` it sees."""
        if self.keep is None:
            return int(tokens * self.ratio)
        target = min(self.keep, tokens)
        if stage == stages:
            return target
        # stage s of S keeps n0 * r ** s with r = (keep / n0) ** (1 / S): from the tokens it sees (n0 * r ** (s - 1))
        # that is a geometric step towards keep over the stages left.
        step = (target / tokens) ** (1 / (stages - stage + 1))
        return max(int(tokens * step), target)

    def select(self, image):
        layers = self.stage_layers
        if image.layer not in layers:
            raise InputError(f"pdrop was asked to select before LLM layer {image.layer}, not one of its stage layers {layers}")
        stage = layers.index(image.layer) + 1
        count = self.stage_count(image.num_tokens, stage, len(layers))
        return Selection.from_indices(image, top_k_sorted(image.signals[STEP_LAYER_LAST_TEXT_ATTENTION], count))
