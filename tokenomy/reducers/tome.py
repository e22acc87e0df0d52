"""ToMe at the encoder site (reducers.md §6): bipartite soft matching between vision-encoder layers, down to `keep`.

After every encoder layer up to the feature layer, the patches are split alternately into sets A and B; each A token is
linked to its most key-similar B token (cosine of the layer's head-averaged keys, ToMe's metric) and the r best links
merge, size-weighted (a token's size is how many original patches it holds: its `sources` row sum). The matching is
`tokenomy.kernels.tome.bipartite_soft_matching` (Triton on CUDA, the PyTorch reference elsewhere), the plan of
facebookresearch/ToMe `tome/merge.py::bipartite_soft_matching`. r is re-derived at each layer so the remaining
reduction spreads evenly over the remaining layers (ToMe's constant schedule, aimed at `keep`); when one layer must
remove more than half its tokens (ToMe's limit per matching), it matches again on the merged tokens (keys merged
size-weighted) until the layer's target is met, so exactly `keep` tokens leave the feature layer.

How this differs from ToMe proper (`tome/patch/timm.py`): ToMe merges inside each block, between attention and the
MLP, and then runs attention with log(size) added to every key (proportional attention). Here the merge follows the
whole layer (the encoder site sits between layers, so the host model's blocks stay untouched and SDPA runs as is) and
attention is not size-aware; the CLS token is outside the reducible tokens, so A/B alternate from the first patch
(ToMe's alternation starts at CLS). `tokenomy.kernels.tome.patch` remains the exact ToMe for a bare vision model
(timm, open_clip, transformers CLIP) outside a VLM pipeline, e.g. classification throughput; it is not a reducer.

Families: CLIP/SigLIP towers (LLaVA, composed models; on LLaVA-NeXT the encoder site runs per crop, so `keep` is
each crop's budget). Qwen's encoder keeps 2x2 merge units
whole between blocks, so merging there is refused by the encoder with an InputError naming it.
"""
import torch

from tokenomy.kernels.tome import bipartite_soft_matching, merge
from tokenomy.reducers.base import Reducer, Selection, Site
from tokenomy.reducers.registry import register
from tokenomy.vision.base import KEYS, SignalRequest


def merge_down(metric: torch.Tensor, size: torch.Tensor, target: int):
    """Bipartite soft matching rounds on metric [N, C] with sizes [N] until `target` tokens remain.

    Returns (representative [M]: the token whose slot each merged token takes, group [N]: the merged token each input
    token ended in, in 0..M-1)."""
    n = metric.shape[0]
    representative = torch.arange(n, device=metric.device)
    group = torch.arange(n, device=metric.device)
    current, sizes = metric.float()[None].contiguous(), size.float()[None].contiguous()
    while current.shape[1] > target:
        plan = bipartite_soft_matching(current, current.shape[1] - target)
        out_row = plan.out_row[0]
        is_source = torch.zeros(current.shape[1], dtype=torch.bool, device=metric.device)
        is_source[plan.a_idx[plan.src_idx[0]]] = True
        survivors = torch.nonzero(~is_source).squeeze(1)
        order = torch.empty(plan.n_out, dtype=torch.long, device=metric.device)
        order[out_row[survivors]] = survivors
        representative, group = representative[order], out_row[group]
        current, sizes = merge(current, plan, sizes)
    return representative, group


@register("tome")
class ToMe(Reducer):
    description = "bipartite soft matching between vision-encoder layers (size-weighted merges of key-similar tokens)"
    paper = "Bolya et al., Token Merging: Your ViT but Faster, ICLR 2023 (arXiv 2210.09461)"
    site = Site.ENCODER
    merges_in_encoder = True

    def encoder_layers(self, num_layers, feature_layer):
        self.last_layer = feature_layer
        return tuple(range(feature_layer + 1))

    def vision_request(self, num_layers, feature_layer):
        return SignalRequest.of(**{KEYS: tuple(range(feature_layer + 1))})

    def select(self, image):
        n, k = image.num_tokens, self.budget(image)
        layers_left = self.last_layer - image.layer + 1
        target = max(k, n - -(-(n - k) // layers_left))
        if target >= n:
            return Selection.keep_all(image)
        size = image.source_matrix().float().sum(dim=1)
        representative, group = merge_down(image.signals[KEYS][0].nan_to_num(), size, target)
        kept, order = torch.sort(representative)
        slot = torch.empty_like(order)
        slot[order] = torch.arange(order.numel(), device=order.device)
        return Selection(kept, image.positions[kept], merge_index=slot[group], merge_weight=size)
