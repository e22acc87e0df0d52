"""VisionZip (peers.md §1): dominant tokens by the CLS attention of the feature layer, plus contextual tokens that
gather the rest by key similarity. Before the projector.

Follows dvlab-research/VisionZip `visionzip/clip_encoder.py::CLIPVisionTower_VisionZip.forward`:
- dominant: the top-D patches by the CLS row of the feature layer's attention (computed on that layer's input, as
  `attentions[-2]` is), in raster order;
- contextual: the N - D leftovers in raster order; with head-averaged keys of the feature layer L2-normalised,
  targets are the leftovers at list positions 0, s, 2s, ... (s = max(1, (N - D) // C), the first C of them); every other
  leftover joins its most key-similar target (ties: the first); a contextual token is its target PLUS the mean of its
  members (a sum, not an average: `merge_sum`);
- order into the LLM: dominant, then contextual (not raster order), as the official code concatenates them.

Differences, by design: the official 64 = 54 + 10 counts the CLS token among the 54 dominant ones (topk(53) + CLS);
the projector here never sees CLS, so `keep` counts patches only and D = keep - C with C = round(keep * 10/64) (64 ->
54 + 10, 128 -> 108 + 20, 192 -> 162 + 30, the paper's splits). The CLS row comes from the layer's own q/k (SDPA
stays on) instead of eager attention maps. On LLaVA-NeXT the budget covers the whole image (all crops' packed patches
together), not each view. Towers without a CLS token (Qwen2-VL, SigLIP) score with the mean-query row instead (the
default `query="auto"`; FlowCut does the same for Qwen); the official code has no such path. `query="cls"` insists on
the CLS row (refused at load on such towers).
"""
import torch
import torch.nn.functional as F

from tokenomy.errors import InputError
from tokenomy.reducers.base import Reducer, Selection, Site, top_k_sorted
from tokenomy.reducers.registry import register
from tokenomy.vision.base import CLS_ATTENTION, CLS_OR_MEAN_ATTENTION, KEYS, MEAN_QUERY_ATTENTION, SignalRequest

# The attention row that scores tokens: "auto" reads the CLS row where the tower has a CLS token, else the mean query.
QUERIES = {"auto": CLS_OR_MEAN_ATTENTION, "cls": CLS_ATTENTION, "mean": MEAN_QUERY_ATTENTION}


@register("visionzip")
class VisionZip(Reducer):
    description = "dominant tokens by CLS attention + contextual tokens merged by key similarity (54+10 at 64)"
    paper = "Yang et al., VisionZip, CVPR 2025 (arXiv 2412.04467)"
    site = Site.PRE_PROJECTOR

    def __init__(self, keep=None, contextual_share: float = 10 / 64, query: str = "auto"):
        super().__init__(keep=keep)
        if isinstance(contextual_share, bool) or not isinstance(contextual_share, (int, float)) or not 0 <= contextual_share < 1:
            raise InputError(f"visionzip contextual_share must be a number in [0, 1), got {contextual_share!r}")
        if query not in QUERIES:
            raise InputError(f"visionzip query must be one of {sorted(QUERIES)}, got {query!r}")
        self.contextual_share = float(contextual_share)
        self.query = query

    def vision_request(self, num_layers, feature_layer):
        return SignalRequest.of(**{QUERIES[self.query]: (feature_layer,), KEYS: (feature_layer,)})

    def split(self, k: int) -> tuple:
        """(dominant, contextual) counts for a budget of k tokens."""
        contextual = min(int(round(k * self.contextual_share)), k - 1) if k > 1 else 0
        return k - contextual, contextual

    def select(self, image):
        n, k = image.num_tokens, self.budget(image)
        dominant_count, contextual_count = self.split(k)
        if k >= n:
            return Selection.keep_all(image)
        scores = image.signals[QUERIES[self.query]][0].float()
        dominant = top_k_sorted(scores, dominant_count)
        is_left = torch.ones(n, dtype=torch.bool, device=dominant.device)
        is_left[dominant] = False
        leftovers = torch.nonzero(is_left).squeeze(1)
        if contextual_count == 0:
            return Selection.from_indices(image, dominant)
        step = max(1, leftovers.numel() // contextual_count)
        target_slots = torch.arange(0, leftovers.numel(), step, device=leftovers.device)[:contextual_count]
        targets = leftovers[target_slots]
        keys = F.normalize(image.signals[KEYS][0].float().nan_to_num(), dim=-1, eps=1e-8)
        joins = (keys[leftovers] @ keys[targets].T).argmax(dim=1)  # first maximum on ties, as torch.argmax
        joins[target_slots] = torch.arange(targets.numel(), device=joins.device)
        kept = torch.cat([dominant, targets])
        merge_index = torch.empty(n, dtype=torch.long, device=kept.device)
        merge_index[dominant] = torch.arange(dominant.numel(), device=kept.device)
        merge_index[leftovers] = dominant.numel() + joins
        members = torch.bincount(joins, minlength=targets.numel()) - 1  # leftovers besides the target itself
        weight = torch.ones(n, device=kept.device)
        is_member = torch.ones(leftovers.numel(), dtype=torch.bool, device=kept.device)
        is_member[target_slots] = False
        weight[leftovers[is_member]] = 1.0 / members[joins[is_member]].clamp(min=1).float()
        return Selection(kept, image.positions[kept], merge_index=merge_index, merge_weight=weight, merge_sum=True)
