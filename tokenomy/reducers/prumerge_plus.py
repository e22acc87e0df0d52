"""PruMerge+ (peers.md §2): CLS-attention outliers plus spatially spread samples; every pruned token is added onto a
kept token it is key-similar to. Before the projector.

Follows 42Shawn/LLaVA-PruMerge `llava/model/multimodal_encoder/clip_encoder.py`
(`outlier_dectection`, `CLIPVisionTower.token_prune_merge_advanced_plus`):
- a: the CLS row of attention read with the q/k of the layer AFTER the feature layer on the feature layer's output
  (official: layer 23 hooks on `hidden_states[-2]`); the feature layer itself when it is the last layer;
- outliers: a_j > Q3 + 1.5 IQR (linear quartiles, as `np.percentile`); their count, capped at `keep`, is how many
  tokens are taken by attention, largest first;
- spatial samples fill the rest of the budget: the other tokens, in raster order, at evenly spaced list positions;
- merge: with L2-normalised keys of that layer, every kept token's `neighbours` (32) most similar other tokens are its
  cluster; kept token i becomes x_i + sum_j a_j x_j over the pruned tokens j of its cluster (unnormalised, `merge_sum`);
- order into the LLM: the attention picks (descending attention), then the spatial samples (raster), as official.

Differences, by design: the official budget is adaptive (about 4x the outlier count, ~25%); here `keep` is exact and
the spatial samples fill what the outliers leave (the official stride is int(int(1/ratio)/3) over raster indices
0..574). The official code adds a pruned token into every cluster it belongs to, kept tokens into each other, and
appends one extra token (the attention-weighted sum of all pruned tokens); a token here joins one slot (the most
key-similar kept token among the clusters holding it; in none: dropped), and there is no extra token, so exactly
`keep` tokens enter the LLM. The official attention treats the 1024-d q/k as a single head and its keys are the full
1024-d projections; here the CLS row is head-averaged and the keys head-averaged (the signals every reducer reads,
SDPA-safe). Towers without a CLS token (Qwen2-VL) score with the mean-query row (the default `query="auto"`; `cls`
insists on the CLS row); the official code is LLaVA-1.5 only.
"""
import torch
import torch.nn.functional as F

from tokenomy.errors import InputError
from tokenomy.reducers.base import Reducer, Selection, Site
from tokenomy.reducers.registry import register
from tokenomy.reducers.visionzip import QUERIES
from tokenomy.vision.base import KEYS, SignalRequest


def iqr_outliers(scores: torch.Tensor) -> int:
    """How many scores lie above Q3 + 1.5 IQR (linear-interpolated quartiles)."""
    q1, q3 = torch.quantile(scores.double(), torch.tensor([0.25, 0.75], dtype=torch.float64, device=scores.device))
    return int((scores.double() > q3 + 1.5 * (q3 - q1)).sum())


@register("prumerge+")
class PruMergePlus(Reducer):
    description = "CLS-attention IQR outliers + spatial samples; pruned tokens added onto key-similar kept ones"
    paper = "Shang et al., LLaVA-PruMerge, arXiv 2403.15388"
    site = Site.PRE_PROJECTOR

    def __init__(self, keep=None, neighbours: int = 32, query: str = "auto"):
        super().__init__(keep=keep)
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1:
            raise InputError(f"prumerge+ neighbours must be an integer >= 1, got {neighbours!r}")
        if query not in QUERIES:
            raise InputError(f"prumerge+ query must be one of {sorted(QUERIES)}, got {query!r}")
        self.neighbours = neighbours
        self.query = query

    def score_layer(self, num_layers: int, feature_layer: int) -> int:
        last = feature_layer + num_layers if feature_layer < 0 else feature_layer
        return last + 1 if last + 1 < num_layers else last

    def vision_request(self, num_layers, feature_layer):
        layer = self.score_layer(num_layers, feature_layer)
        return SignalRequest.of(**{QUERIES[self.query]: (layer,), KEYS: (layer,)})

    def select(self, image):
        n, k = image.num_tokens, self.budget(image)
        if k >= n:
            return Selection.keep_all(image)
        attention = image.signals[QUERIES[self.query]][0].float().nan_to_num(nan=0.0)
        device = attention.device
        by_attention = torch.sort(attention, descending=True, stable=True).indices[: min(iqr_outliers(attention), k)]
        is_rest = torch.ones(n, dtype=torch.bool, device=device)
        is_rest[by_attention] = False
        rest = torch.nonzero(is_rest).squeeze(1)
        samples = k - by_attention.numel()
        spread = rest[(torch.arange(samples, device=device) * rest.numel()) // samples] if samples else rest[:0]
        kept = torch.cat([by_attention, spread])
        keys = F.normalize(image.signals[KEYS][0].float().nan_to_num(), dim=-1, eps=1e-8)
        similarity = keys[kept] @ keys.T  # [K, N]
        similarity[torch.arange(k, device=device), kept] = float("-inf")  # a token is not its own neighbour
        cluster = torch.topk(similarity, min(self.neighbours, n - 1), dim=1).indices
        in_cluster = torch.zeros(k, n, dtype=torch.bool, device=device)
        in_cluster.scatter_(1, cluster, True)
        candidate = similarity.masked_fill(~in_cluster, float("-inf"))
        best = candidate.argmax(dim=0)  # first maximum on ties
        merge_index = torch.where(in_cluster.any(dim=0), best, torch.full_like(best, -1))
        merge_index[kept] = torch.arange(k, device=device)
        weight = attention.clone()
        weight[kept] = 1.0
        return Selection(kept, image.positions[kept], merge_index=merge_index, merge_weight=weight, merge_sum=True)
