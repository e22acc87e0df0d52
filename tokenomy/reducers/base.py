"""The reducer contract: model-agnostic tensors in, a `Selection` out, at one of four sites.

A reducer never sees a model. It declares where it acts (`site`, and for the encoder and LLM sites the layers) and
which signals it needs there; the adapter (tokenomy.vlm) computes exactly those signals from the layers' own q/k/v,
calls `select` once per image, and applies the result. Reducers work per image so that a sample's result never depends
on what else is in the batch. docs/reducers.md shows one small reducer per site.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Optional

import torch

from tokenomy.errors import InputError
from tokenomy.vision.base import SignalRequest


class Site(str, Enum):
    """Where a reducer acts, in the order a request passes them (a plan runs its stages in this order)."""

    ENCODER = "encoder"  # between vision-encoder layers (vision-dim tokens, CLS excluded)
    PRE_PROJECTOR = "pre_projector"  # the encoder's feature-layer tokens, before the projector (Qwen: before the merger)
    POST_PROJECTOR = "post_projector"  # LLM-dim tokens after the projector (Qwen: after the 2x2 merger)
    LLM = "llm"  # inside the LLM during prefill, before decoder layer `layer` (it sees layer-1's output)


SITE_ORDER = {site: rank for rank, site in enumerate(Site)}


class PositionPolicy(str, Enum):
    CONTIGUOUS = "contiguous"  # renumber the shortened sequence 0..L'-1 (LLaVA default)
    KEEP = "keep"  # kept tokens keep their original position ids, gaps stay (FastV, M-RoPE models)
    MULTI = "multi"  # a merged token carries several positions (PPE); a stage supplies the rotary that reads them


# Signals computed inside the LLM, at decoder layer `layer - 1` for a step acting before `layer`. Each is per visual
# token of one image ([N] or [N, head_dim]).
LAST_TEXT_ATTENTION = "last_text_attention"  # head-averaged softmax row of the last prompt token over the whole prefix
MEAN_TEXT_ATTENTION = "mean_text_attention"  # the same row averaged over the prompt tokens after the sample's last image
LAST_TEXT_VALUE_SIMILARITY = "last_text_value_similarity"  # head-averaged softmax_visual(v_last . v_j / sqrt(d))
LLM_VALUES = "llm_values"  # head-averaged value vectors (after repeat_kv), [N, head_dim]
LLM_KEYS = "llm_keys"  # post-rotary keys (after repeat_kv), heads concatenated, [N, heads * head_dim]
# The same keys of the sample's prompt tokens after its last image, [T, heads * head_dim]; not per visual token.
TEXT_LLM_KEYS = "text_llm_keys"
# LAST_TEXT_ATTENTION computed instead with the step layer's own input norm and q/k, on the hidden states entering it
# before the step (PyramidDrop scores a stage with the layer it is about to prune for); [N].
STEP_LAYER_LAST_TEXT_ATTENTION = "step_layer_last_text_attention"
# The last prompt token's row again, but from layer-1's OUTPUT through layer-1's own input norm and q/k: the relevance
# SEATS' Stage II computes (reducers.md §5.3 step 1; reusing that layer's weights on its output is the official code's).
LAST_TEXT_ATTENTION_AFTER = "last_text_attention_after"
LLM_SIGNALS = (LAST_TEXT_ATTENTION, MEAN_TEXT_ATTENTION, LAST_TEXT_VALUE_SIMILARITY, LLM_VALUES, LLM_KEYS, TEXT_LLM_KEYS,
               STEP_LAYER_LAST_TEXT_ATTENTION, LAST_TEXT_ATTENTION_AFTER)

# ImageTokens.context keys. Post-projector site: the LLM input embeddings of the sample's own prompt text (the
# user's words, no chat template, no image tokens), [n_text, D]. LLM site: the current hidden states of the sample's
# prompt tokens after its last image (rows aligned with TEXT_LLM_KEYS), [T, D], and the LLM's final norm module.
INSTRUCTION_EMBEDDINGS = "instruction_embeddings"
TEXT_FEATURES = "text_features"
FINAL_NORM = "final_norm"


@dataclass
class ImageTokens:
    """One image's current tokens as a reducer sees them at its site.

    features: [N, D] (vision-dim at the encoder and pre-projector sites, LLM-dim after the projector and inside the
    LLM; on Qwen's pre-projector site one token is a 2x2 merge unit, its 4 patches concatenated). positions: [N, 3]
    TRUE (t, h, w) of each token in the image's grid (Qwen: the merged grid), or [N, m, 3] once a multi-position merge
    gave tokens several. signals: name -> tensor whose first dim indexes the requested layers in ascending order
    ([n_layers, N] for rows, [n_layers, N, d] for values) at the vision sites, [N] or [N, d] inside the LLM.
    sources: [N, N0] how much of each original token a current token holds (a merged token has several). layer: the
    encoder layer that just ran (encoder site) or the LLM layer about to run (LLM site). project: at the pre-projector
    site, the projector as a function of features (for reducers that probe it). context: what a site knows beyond
    the image (the instruction's embeddings after the projector, the text's hidden states in the LLM; keys above).
    """

    features: torch.Tensor
    positions: torch.Tensor
    signals: dict = field(default_factory=dict)
    sources: Optional[torch.Tensor] = None
    layer: Optional[int] = None
    project: Optional[Callable] = None
    context: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]

    def source_matrix(self) -> torch.Tensor:
        if self.sources is None:
            return torch.eye(self.num_tokens, device=self.features.device)
        return self.sources


@dataclass
class Selection:
    """What survives of one image.

    kept: [K] indices into the image's tokens, in the order they enter the next step; a merged token takes the slot of
    its kept index. merge_index (optional): [N], for every token the slot in `kept` it is merged into, or -1 if it is
    dropped; merge_weight: [N] its weight in that slot's weighted mean (default 1). merge_sum: a slot is the weighted
    sum of its members instead of their mean (VisionZip and PruMerge+ add neighbours onto a kept token unnormalised).
    positions: [K, 3], or [K, m, 3] under the multi policy, of the kept tokens.
    """

    kept: torch.Tensor
    positions: torch.Tensor
    merge_index: Optional[torch.Tensor] = None
    merge_weight: Optional[torch.Tensor] = None
    merge_sum: bool = False

    @property
    def num_kept(self) -> int:
        return int(self.kept.numel())

    @staticmethod
    def keep_all(image: ImageTokens) -> "Selection":
        index = torch.arange(image.num_tokens, device=image.features.device)
        return Selection(kept=index, positions=image.positions)

    @staticmethod
    def from_indices(image: ImageTokens, kept: torch.Tensor) -> "Selection":
        kept = kept.to(image.positions.device)
        return Selection(kept=kept, positions=image.positions[kept])

    def check(self, image: ImageTokens, reducer_name: str) -> "Selection":
        """Refuse a malformed selection with the reducer's name, before it corrupts a sequence."""
        n = image.num_tokens
        kept = self.kept
        if kept.dim() != 1 or kept.dtype not in (torch.int64, torch.int32):
            raise InputError(f"reducer {reducer_name!r} returned kept indices of shape {tuple(kept.shape)} / {kept.dtype}; want [K] integers")
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= n or kept.unique().numel() != kept.numel()):
            raise InputError(f"reducer {reducer_name!r} returned kept indices outside 0..{n - 1} or repeated")
        if self.positions.shape[0] != kept.numel():
            raise InputError(f"reducer {reducer_name!r} returned {self.positions.shape[0]} positions for {kept.numel()} kept tokens")
        if self.merge_index is not None:
            if self.merge_index.shape != (n,):
                raise InputError(f"reducer {reducer_name!r}: merge_index must have one entry per token ({n})")
            slots = self.merge_index[self.merge_index >= 0]
            if slots.numel() and int(slots.max()) >= kept.numel():
                raise InputError(f"reducer {reducer_name!r}: merge_index points past its {kept.numel()} kept slots")
        return self

    def weights(self, device) -> torch.Tensor:
        """[K, N] matrix whose row k averages (or, with merge_sum, adds) the tokens merged into slot k (needs a merge
        assignment)."""
        index = self.merge_index.to(device)
        n = index.shape[0]
        weight = self.merge_weight if self.merge_weight is not None else torch.ones(n)
        weight = weight.to(device, torch.float32) * (index >= 0)
        matrix = torch.zeros(self.num_kept, n, device=device)
        matrix[index.clamp(min=0), torch.arange(n, device=device)] = weight
        if self.merge_sum:
            return matrix
        return matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1e-12)

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        """Gather (and merge, when a merge assignment is present) `features` [N, ...] into [K, ...]."""
        if self.merge_index is None:
            return features[self.kept.to(features.device)]
        matrix = self.weights(features.device)
        flat = features.reshape(features.shape[0], -1).float()
        return (matrix @ flat).reshape(self.num_kept, *features.shape[1:]).to(features.dtype)

    def apply_sources(self, sources: torch.Tensor) -> torch.Tensor:
        """Sources [N, N0] of the current tokens -> [K, N0] of what survives (merged tokens add their members')."""
        if self.merge_index is None:
            return sources[self.kept.to(sources.device)]
        index = self.merge_index.to(sources.device)
        out = torch.zeros(self.num_kept, sources.shape[1], device=sources.device, dtype=sources.dtype)
        keep = index >= 0
        return out.index_add_(0, index[keep], sources[keep])


class Reducer(ABC):
    """Base class. Subclasses set `site` and implement `select`; see docs/reducers.md for one example per site.

    Encoder site: `encoder_layers` says after which encoder layers `select` runs; `vision_request` which signals it
    needs at which layers. Pre-projector site: `vision_request` as well. LLM site: `llm_layers` says before which
    decoder layers `select` runs (each layer >= 1; it sees layer-1's output), `llm_request` which LLM signals it needs
    there, `cuts_caches` whether the layers before also forget the dropped tokens when decoding.
    """

    name: str = "?"
    description: str = ""  # one line, for `tokenomy eval --reducers list`
    paper: str = ""  # short citation / arXiv id
    site: Site = Site.PRE_PROJECTOR
    position_policy: Optional[PositionPolicy] = None  # a policy this reducer needs (multi for PPE); None: any
    cuts_caches: bool = False
    positions_per_token: int = 1  # m, under the multi policy
    # False for reducers defined only over video/audio windows with their own budgets (seats): `make run` and other
    # image benchmarks cross every reducer with `keep` budgets on images, and leave these out.
    reduces_images: bool = True
    # True for encoder-site reducers whose selections merge tokens, so a model that cannot take merges between its
    # vision layers refuses them at load rather than on the first image.
    merges_in_encoder: bool = False

    def __init__(self, keep: Optional[int] = None):
        if keep is not None:
            if isinstance(keep, bool) or not isinstance(keep, int):
                raise InputError(f"keep must be a positive integer number of visual tokens, got {keep!r}")
            if keep <= 0:
                raise InputError(f"keep must be > 0 visual tokens, got {keep}")
        self.keep = keep

    @property
    def applies_budget(self) -> bool:
        """False for reducers that ignore `keep` (the identity), so stats never claim a budget that was not applied."""
        return True

    # ---- what the reducer asks for -------------------------------------------------------------------------------
    def vision_request(self, num_layers: int, feature_layer: int) -> SignalRequest:
        """Signals needed from the vision encoder, by encoder layer (computed on that layer's input)."""
        return SignalRequest()

    def encoder_layers(self, num_layers: int, feature_layer: int) -> tuple:
        """Encoder site: the encoder layers after which `select` runs (0-based, < the feature layer's count)."""
        return ()

    def llm_layers(self, num_layers: int) -> tuple:
        """LLM site: the decoder layers before which `select` runs (each in 1..num_layers-1)."""
        return ()

    def llm_request(self, layer: int) -> tuple:
        """LLM site: the signals (LLM_SIGNALS) needed for the step before `layer`, computed at layer-1."""
        return ()

    def multi_rotary(self, text_config):
        """Under the multi policy: a callable (rotary_emb, hidden, position_ids [..., L, m]) -> (cos, sin)."""
        return None

    def expand(self, family: str) -> list:
        """The stages this reducer runs as on a model family ("llava", "llava-next", "qwen2-vl", "composed").

        Called once when a Pipeline loads. A method that acts at several sites (FlowCut: inside the vision encoder,
        then again inside the LLM on LLaVA-NeXT and Qwen) returns one reducer per site, in site order.
        """
        return [self]

    def prepare_image(self, image, processor):
        """The image the processor is given (a PIL image in, one out); `processor` is the model's. Identity unless a
        reducer acts on pixels (downsample)."""
        return image

    # ---- the decision --------------------------------------------------------------------------------------------
    def budget(self, image: ImageTokens) -> int:
        """Tokens to keep for this image: `keep`, or all of them when keep is None or not smaller."""
        return image.num_tokens if self.keep is None else min(self.keep, image.num_tokens)

    @abstractmethod
    def select(self, image: ImageTokens) -> Selection:
        """What to keep of one image, within `self.budget(image)` tokens."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(keep={self.keep})"


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in ascending (raster) order. Ties break toward the lower index; NaN ranks last."""
    scores = scores.float().nan_to_num(nan=float("-inf"))
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(order).values
