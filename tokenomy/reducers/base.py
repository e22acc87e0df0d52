"""The reducer contract: model-agnostic tensors in, a `Selection` out.

A reducer never sees a model. The adapter (tokenomy.vlm) computes exactly the signals the reducer declares, calls
`select` once per image, and applies the result. Reducers work per image so that a sample's result never depends on
what else is in the batch.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

import torch

from tokenomy.errors import InputError
from tokenomy.vision.base import SignalRequest


class Stage(str, Enum):
    PRE_LLM = "pre_llm"  # after the vision encoder, before the projector (vision-dim features)
    POST_PROJECTOR = "post_projector"  # after the projector (LLM-dim features)
    IN_LLM = "in_llm"  # inside the LLM during prefill, after decoder layer `llm_layer - 1`


class PositionPolicy(str, Enum):
    CONTIGUOUS = "contiguous"  # renumber the shortened sequence 0..L'-1 (LLaVA default)
    KEEP = "keep"  # kept tokens keep their original position ids, gaps stay (FastV, M-RoPE models)
    MULTI = "multi"  # a merged token carries several positions (PPE)


# Signals computed inside the LLM for in-LLM reducers.
LAST_TEXT_ATTENTION = "last_text_attention"  # [N] head-averaged softmax row of the last prompt token, visual part


@dataclass
class ImageTokens:
    """One image's visual tokens as a reducer sees them.

    features: [N, D] (vision-dim before the projector, LLM-dim after it or inside the LLM); positions: [N, 3] (t, h, w)
    in the image's grid; signals: name -> tensor whose first dim indexes layers ([n_layers, N] for attention rows, in
    the order the reducer asked for them) or [N] for LLM signals.
    """

    features: torch.Tensor
    positions: torch.Tensor
    signals: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]


@dataclass
class Selection:
    """What survives of one image.

    kept: [K] indices into the image's tokens, in the order they enter the LLM. merge_index (optional): [N], for every
    original token the slot in `kept` it is merged into, or -1 if it is dropped; merge_weight: [N] its weight in that
    slot's weighted mean. positions: [K, 3] (or [K, m, 3] under the multi policy) of the kept tokens.
    """

    kept: torch.Tensor
    positions: torch.Tensor
    merge_index: Optional[torch.Tensor] = None
    merge_weight: Optional[torch.Tensor] = None

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

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        """Gather (and merge, when a merge assignment is present) `features` [N, D] into [K, D]."""
        if self.merge_index is None:
            return features[self.kept.to(features.device)]
        index = self.merge_index.to(features.device)
        weight = (self.merge_weight if self.merge_weight is not None else torch.ones_like(index, dtype=torch.float32))
        weight = weight.to(features.device, torch.float32) * (index >= 0)
        slots = index.clamp(min=0)
        total = torch.zeros(self.num_kept, device=features.device).index_add_(0, slots, weight)
        summed = torch.zeros(self.num_kept, features.shape[1], device=features.device).index_add_(
            0, slots, features.float() * weight[:, None]
        )
        return (summed / total.clamp(min=1e-12)[:, None]).to(features.dtype)


class Reducer(ABC):
    """Base class. Subclasses set `name`, `stage`, `position_policy` and implement `select`."""

    name: str = "?"
    stage: Stage = Stage.PRE_LLM
    position_policy: Optional[PositionPolicy] = None  # None: the model family's default (contiguous LLaVA, keep Qwen)
    llm_layer: Optional[int] = None  # in-LLM reducers: first decoder layer that sees the reduced sequence

    def __init__(self, keep: Optional[int] = None):
        if keep is not None:
            if isinstance(keep, bool) or not isinstance(keep, int):
                raise InputError(f"keep must be a positive integer number of visual tokens, got {keep!r}")
            if keep <= 0:
                raise InputError(f"keep must be > 0 visual tokens, got {keep}")
        self.keep = keep

    def vision_request(self, num_layers: int, feature_layer: int) -> SignalRequest:
        """Signals this reducer needs from the vision encoder (layer indices are encoder layers)."""
        return SignalRequest()

    def llm_signals(self) -> tuple:
        """Signals this in-LLM reducer needs at layer `llm_layer - 1`."""
        return ()

    def budget(self, image: ImageTokens) -> int:
        """Tokens to keep for this image: `keep`, or all of them when keep is None or not smaller."""
        return image.num_tokens if self.keep is None else min(self.keep, image.num_tokens)

    @abstractmethod
    def select(self, image: ImageTokens) -> Selection:
        """What to keep of one image, within `self.budget(image)` tokens."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(keep={self.keep})"


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, returned in ascending (raster) order. Ties break toward the lower index."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
    return torch.sort(order).values
