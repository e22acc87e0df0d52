"""Oracle diagnostics for synthvqa: selectors that know each sample's scene, run by `tokenomy eval` only.

They are not reducers a user picks (a real request has no scene description), so they are not in the reducer
registry; they bound what a selector could keep. `oracle-question` keeps the patches of the objects the question is
about (and of the word, for the text question), topped up to the budget with the most foreground patches;
`oracle-foreground` keeps the most foreground patches: those whose pixels differ most from the background. If a
model answers well from the question's patches alone, a good selector can exist; if the foreground oracle falls below
random, the model keeps what it knows in background tokens.

Both act after the projector, on the grid of tokens entering the LLM (ref-llava's 16x16 patches, ref-qwen's 8x8
merged cells), and read two pixel maps the task hands over per sample (`SynthVQA.reducer_context`).
"""
from __future__ import annotations

import torch

from tokenomy.errors import InputError
from tokenomy.reducers.base import Reducer, Selection, Site, top_k_sorted
from tokenomy.reducers.plan import Plan, parse_spec

# ImageTokens.context keys, each an [H, W] map over the image's pixels.
QUESTION_PIXELS = "oracle_question_pixels"  # bool: the pixels of what the question is about
FOREGROUND_PIXELS = "oracle_foreground_pixels"  # float in [0, 1]: how far each pixel is from the background colour


def cell_means(pixel_map: torch.Tensor, positions: torch.Tensor, name: str) -> torch.Tensor:
    """[N] mean of `pixel_map` over each token's cell. The grid is read from the positions, so the stage must see
    every token of the image (an oracle runs alone)."""
    if positions.dim() != 2:
        raise InputError(f"{name} needs one (t, h, w) position per token, got positions of shape {tuple(positions.shape)}")
    rows, cols = int(positions[:, 1].max()) + 1, int(positions[:, 2].max()) + 1
    height, width = pixel_map.shape
    if height % rows or width % cols:
        raise InputError(f"{name}: a {height}x{width} pixel map does not split into the {rows}x{cols} token grid")
    cells = pixel_map.float().reshape(rows, height // rows, cols, width // cols).mean(dim=(1, 3))
    return cells.to(positions.device)[positions[:, 1].long(), positions[:, 2].long()]


class Oracle(Reducer):
    site = Site.POST_PROJECTOR
    paper = "- (diagnostic)"
    needs = (FOREGROUND_PIXELS,)

    def maps(self, image) -> dict:
        missing = [key for key in self.needs if key not in image.context]
        if missing:
            raise InputError(f"{self.name} is a synthvqa diagnostic: it needs each sample's scene, which only "
                             f"`tokenomy eval --tasks synthvqa --reducers {self.name}` hands over (missing {missing[0]})")
        return {key: cell_means(image.context[key], image.positions, self.name) for key in self.needs}


class ForegroundOracle(Oracle):
    name = "oracle-foreground"
    description = "diagnostic: keeps the patches whose pixels differ most from the background (synthvqa only)"

    def select(self, image):
        foreground = self.maps(image)[FOREGROUND_PIXELS]
        return Selection.from_indices(image, top_k_sorted(foreground, self.budget(image)))


class QuestionOracle(Oracle):
    name = "oracle-question"
    description = ("diagnostic: keeps the patches of what the question is about, topped up with the most foreground "
                   "patches (synthvqa only)")
    needs = (QUESTION_PIXELS, FOREGROUND_PIXELS)

    def select(self, image):
        maps = self.maps(image)
        foreground = maps[FOREGROUND_PIXELS].nan_to_num(nan=0.0)
        # Two stable sorts: the question's patches first, each group by foreground, ties toward the lower index.
        order = torch.sort(foreground, descending=True, stable=True).indices
        order = order[torch.sort((maps[QUESTION_PIXELS][order] > 0).float(), descending=True, stable=True).indices]
        return Selection.from_indices(image, order[: self.budget(image)].sort().values)


DIAGNOSTICS = {cls.name: cls for cls in (QuestionOracle, ForegroundOracle)}


def is_diagnostic(spec: str) -> bool:
    """Whether a spec names an oracle (alone or in a stack, which `plan` then refuses)."""
    return any(name in DIAGNOSTICS for name, _ in parse_spec(spec))


def plan(spec: str, keep=None, **options) -> Plan:
    """The one-stage plan of an oracle spec. Options meant for other reducers of a sweep (`fastv.layer=3`) are ignored,
    any other option is refused."""
    stages = parse_spec(spec)
    if len(stages) != 1:
        raise InputError(f"reducer spec {spec!r}: the oracle diagnostics run alone, not stacked with other stages")
    (name, stage_options), = stages
    plain = {k: v for k, v in options.items() if "." not in k}
    mine = {k.split(".", 1)[1]: v for k, v in options.items() if k.split(".", 1)[0] == name}
    extra = sorted({**plain, **mine, **stage_options})
    if extra:
        raise InputError(f"{name} takes no option but keep, got {extra[0]!r}")
    return Plan([DIAGNOSTICS[name](keep=keep)], spec.strip())
