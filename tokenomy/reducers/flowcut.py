"""FlowCut (reducers.md §1): multi-step pruning inside the vision encoder, plus a second step inside the LLM on
LLaVA-NeXT and Qwen2-VL / Qwen2.5-VL.

Encoder stage, after each encoder layer l while more than the target remain (signals of layer l, on its input):
  S_l(j) = (a_j / sum a + s_j / sum s) * ||v_j||_1     a: CLS attention row, s: CLS value-similarity row,
                                                        v: head-averaged value vector
  C <- S_l at the first such layer, then C <- 0.5 C + 0.5 S_l (kept tokens only).
With R_l = P - l (P the last pruning layer), the layers with even R_l prune: N' = max(N - r, T) with
  r = round((N - T) / sqrt(R_l) * (1 - e^2)),   e = normalised entropy of a / sum a over the current N tokens,
and at R_l = 0 the count is forced to T. The top-N' of C survive, in their original order; the CLS token stays.

Per family (`expand`), following the official code (TungChintao/FlowCut):
- LLaVA-1.5 and composed towers: T = keep, P = feature layer - 1, so the feature layer itself runs on T tokens and
  layers after it never run (the adapter stops at the feature layer).
- LLaVA-NeXT: the same on every crop with T = keep // 2, then an LLM stage before decoder layer 2 keeps `keep` of the
  image's visual tokens by (rho + s) * ||v||_1 from the last prompt token at layer 1 (`FlowCutLLM`).
- Qwen2-VL / Qwen2.5-VL: no CLS token, so the query is the mean of all queries and S_l = a_j * ||v_j||_1 (no semantic
  term); P = the feature (last) layer; T = 2 * keep merge units (8 * keep patches); then the LLM stage keeps `keep`.
  The encoder site works on 2x2 merge units: signals are unit averages, a unit is kept or dropped whole, so the
  merger only joins true neighbours and kept tokens carry their TRUE (t, h, w); Qwen2.5-VL's windows are recomputed
  by the adapter. `official_positions=True` reproduces the official code's positions instead: the kept tokens take
  the first n positions of the grid in raster order (spec §1.5). The official per-patch pruning, whose merger joins
  four consecutive survivors that need not be neighbours, is not reproduced (a unit is the smallest thing pruned).

Per image, not per batch: the official LLaVA code takes r as the maximum over the batch (over all crops on
LLaVA-NeXT), so every image of a batch keeps the same count at every layer. That maximum needs every image's entropy
at layer l before any image can be pruned at layer l, i.e. the images must run through the encoder in lock-step.
tokenomy runs encoder-site stages one image at a time so that a sample's result never depends on its batch, and a
stage only ever sees one image; the batch maximum cannot be formed there (short of re-encoding every image once per
pruning layer), so it is not offered. Each image uses its own r, which is what the official code does at batch 1
(its evaluation setting).

Known differences from the official code, all forced by tokenomy's single-row signals:
- LLM stage: rho is the last prompt token's head-averaged attention over the whole prefix, renormalised over the
  image's visual tokens; the official code averages per-head softmaxes taken over the visual tokens only. They agree
  when every head gives the visual span the same share. Kept tokens keep their position ids (tokenomy's LLM site);
  the official LLaVA-NeXT code renumbers the sequence after layer 1.
- On Qwen, a merge unit's attention and value vector are the averages over its 4 patches, and r counts units.
- LLaVA-NeXT: tiles keep their newline tokens (the adapter's layout); the official FlowCut path drops them.
"""
from __future__ import annotations

import copy

import torch

from tokenomy.errors import InputError
from tokenomy.ops.entropy import normalized_entropy
from tokenomy.reducers.base import (
    LAST_TEXT_ATTENTION,
    LAST_TEXT_VALUE_SIMILARITY,
    LLM_VALUES,
    Reducer,
    Selection,
    Site,
    top_k_sorted,
)
from tokenomy.reducers.registry import register
from tokenomy.vision.base import CLS_ATTENTION, CLS_VALUE_SIMILARITY, MEAN_QUERY_ATTENTION, VALUES, SignalRequest

QUERIES = ("auto", "cls", "mean")
LLM_LAYER = 2  # the LLM stage runs before decoder layer 2, on layer 1's output (official: after layer index 1)
EMA = 0.5


def share(row: torch.Tensor) -> torch.Tensor:
    """row / sum(row) in fp32; NaN, infinities and negatives count as 0, and an all-zero row becomes uniform."""
    row = torch.nan_to_num(row.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0)
    total = row.sum()
    return row / total if total > 0 else torch.full_like(row, 1.0 / max(row.numel(), 1))


def l1_norm(values: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(values.float(), nan=0.0, posinf=0.0, neginf=0.0).abs().sum(dim=-1)


def prune_count(attention: torch.Tensor, remaining: int, target: int) -> int:
    """r = round((N - T) / sqrt(R) * (1 - e^2)) for one image; e is the normalised entropy of the attention share."""
    n = attention.numel()
    entropy = normalized_entropy(share(attention))
    r = (n - target) / remaining ** 0.5 * (1 - entropy ** 2)
    return int(torch.round(r))


@register("flowcut")
class FlowCut(Reducer):
    description = ("pruning inside the vision encoder by information flow (CLS attention + value similarity, x value "
                   "norm), entropy-adaptive; a second step in the LLM on LLaVA-NeXT and Qwen")
    paper = "Tong et al., FlowCut: Rethinking Redundancy via Information Flow for Efficient VLMs, NeurIPS 2025, arXiv 2505.19536"
    """The encoder stage of FlowCut (the LLM stage is `FlowCutLLM`; `expand` picks both per family)."""

    site = Site.ENCODER

    def __init__(self, keep=None, query: str = "auto", official_positions: bool = False):
        super().__init__(keep=keep)
        if query not in QUERIES:
            raise InputError(f"flowcut query must be one of {list(QUERIES)} (auto: the CLS token, or the mean query on "
                             f"towers without one), got {query!r}")
        if not isinstance(official_positions, bool):
            raise InputError(f"flowcut official_positions must be true or false, got {official_positions!r}")
        self.query = "cls" if query == "auto" else query
        self.requested_query = query
        self.official_positions = official_positions
        self.crop_target = keep  # tokens each encoder pass ends with (per crop on LLaVA-NeXT, 2x2 units on Qwen)
        self.prunes_feature_layer = False  # Qwen: the last pruning step follows the feature layer itself
        self.last_prune_layer = None  # set by encoder_layers from the encoder the pipeline loaded
        self._cumulative = None
        self._grid = None

    # ---- per family -----------------------------------------------------------------------------------------------
    def expand(self, family):
        if self.official_positions and family != "qwen2-vl":
            raise InputError(f"flowcut official_positions reproduces the official Qwen2-VL positions; this is a {family} model")
        stage = copy.copy(self)
        stage._cumulative = stage._grid = None
        if family == "qwen2-vl":
            if self.requested_query == "auto":
                stage.query = "mean"
            stage.prunes_feature_layer = True
            stage.crop_target = None if self.keep is None else 2 * self.keep
        elif family == "llava-next":
            stage.crop_target = None if self.keep is None else max(1, self.keep // 2)
        if family in ("qwen2-vl", "llava-next") and self.keep is not None:
            return [stage, FlowCutLLM(keep=self.keep)]
        return [stage]

    # ---- what it asks for -----------------------------------------------------------------------------------------
    def encoder_layers(self, num_layers, feature_layer):
        self.last_prune_layer = feature_layer if self.prunes_feature_layer else max(feature_layer - 1, 0)
        return tuple(range(self.last_prune_layer + 1))

    def vision_request(self, num_layers, feature_layer):
        layers = self.encoder_layers(num_layers, feature_layer)
        if self.query == "mean":
            return SignalRequest.of(**{MEAN_QUERY_ATTENTION: layers, VALUES: layers})
        return SignalRequest.of(**{CLS_ATTENTION: layers, CLS_VALUE_SIMILARITY: layers, VALUES: layers})

    # ---- the decision ---------------------------------------------------------------------------------------------
    def attention(self, signals) -> torch.Tensor:
        """The layer's query -> token attention row (CLS or mean query) of the layer that just ran."""
        return signals[MEAN_QUERY_ATTENTION if self.query == "mean" else CLS_ATTENTION][0].float()

    def layer_scores(self, signals) -> torch.Tensor:
        values = l1_norm(signals[VALUES][0])
        if self.query == "mean":
            return torch.nan_to_num(self.attention(signals), nan=0.0).clamp(min=0) * values
        return (share(self.attention(signals)) + share(signals[CLS_VALUE_SIMILARITY][0])) * values

    def select(self, image):
        if self.last_prune_layer is None:
            raise InputError("flowcut: call encoder_layers(num_layers, feature_layer) before select (a Pipeline does)")
        if image.layer == 0:
            self._cumulative = None
            self._grid = _raster_sorted(image.positions) if self.official_positions else None
        n = image.num_tokens
        target = n if self.crop_target is None else min(self.crop_target, n)
        remaining = self.last_prune_layer - image.layer
        if n <= target or remaining < 0:
            return Selection.keep_all(image)
        scores = self.layer_scores(image.signals)
        if self._cumulative is None:
            self._cumulative = scores
        elif self._cumulative.numel() != n:
            raise InputError(f"flowcut's cumulative scores cover {self._cumulative.numel()} tokens but encoder layer "
                             f"{image.layer} has {n}: another encoder-site stage changed them; run flowcut alone there")
        else:
            self._cumulative = EMA * self._cumulative + (1 - EMA) * scores
        if remaining % 2:
            return Selection.keep_all(image)
        count = target if remaining == 0 else min(n, max(n - prune_count(self.attention(image.signals), remaining, target), target))
        kept = top_k_sorted(self._cumulative, count)
        self._cumulative = self._cumulative[kept]
        positions = image.positions[kept]
        if self.official_positions:
            positions = self._grid[_raster_rank(positions)].to(positions)
        return Selection(kept=kept, positions=positions)

    def __repr__(self):
        return f"FlowCut(keep={self.keep}, query={self.query!r}, crop_target={self.crop_target})"


class FlowCutLLM(Reducer):
    """FlowCut's LLM stage (LLaVA-NeXT, Qwen): before decoder layer 2, keep `keep` of an image's visual tokens by
    (rho_j + s_j) * ||v_j||_1, all from layer 1's q/k/v of the last prompt token: rho its attention share over the
    image's tokens, s its softmax value similarity, v the head-averaged value vector."""

    name = "flowcut"
    site = Site.LLM

    def llm_layers(self, num_layers):
        if LLM_LAYER >= num_layers:
            raise InputError(f"flowcut's LLM stage acts before decoder layer {LLM_LAYER}; this LLM has only {num_layers} layers")
        return (LLM_LAYER,)

    def llm_request(self, layer):
        return (LAST_TEXT_ATTENTION, LAST_TEXT_VALUE_SIMILARITY, LLM_VALUES)

    def select(self, image):
        signals = image.signals
        scores = (share(signals[LAST_TEXT_ATTENTION]) + share(signals[LAST_TEXT_VALUE_SIMILARITY])) * l1_norm(signals[LLM_VALUES])
        return Selection.from_indices(image, top_k_sorted(scores, self.budget(image)))


def _raster_key(positions: torch.Tensor) -> torch.Tensor:
    base = int(positions.max()) + 1 if positions.numel() else 1
    positions = positions.long()
    return (positions[:, 0] * base + positions[:, 1]) * base + positions[:, 2]


def _raster_sorted(positions: torch.Tensor) -> torch.Tensor:
    return positions[torch.argsort(_raster_key(positions))]


def _raster_rank(positions: torch.Tensor) -> torch.Tensor:
    """For each position, its rank among `positions` in raster (t, h, w) order."""
    rank = torch.empty(len(positions), dtype=torch.long, device=positions.device)
    rank[torch.argsort(_raster_key(positions))] = torch.arange(len(positions), device=positions.device)
    return rank
