"""CDPruner (Zhang et al., NeurIPS 2025, arXiv 2506.10967): conditional diversity by a DPP over the visual tokens.

After the projector, per image (official `encode_images` in llava/model/llava_arch.py):
- similarity S_ij = cos(E_i, E_j) of the projector outputs E;
- relevance rho_j = mean over instruction tokens t of cos(E_j, t), min-max normalised over the image's tokens:
  r = (rho - min rho + 1e-6) / (max rho - min rho);
- kernel L_ij = r_i S_ij r_j, and `keep` tokens by the fast greedy MAP of the DPP (Chen et al. 2018): pick the
  largest remaining d_j^2 (initially L_jj), e = (L[j] - sum_t c_t[j] c_t) / d_j, d^2 -= e^2; kept in original order.

Ours: the official relevance compares CLIP image embeddings with CLIP text embeddings of the question. No model
here has a CLIP text tower (Qwen has none at all), so the LLM's instruction embedding replaces CLIP's text encoder:
the LLM input embeddings of the sample's own prompt words against the projector outputs, both in LLM space. The
official negates the CLIP similarity (the authors saw that effect only in CLIP); in LLM space we use it as is, and
`negate_relevance=True` restores the official sign. Without instruction text every token is equally relevant and
the DPP is pure diversity. A relevance of zero range (all equal) is treated the same way instead of dividing by 0.
"""
import torch

from tokenomy.errors import InputError
from tokenomy.ops.diversity import cosine_distance
from tokenomy.reducers.base import INSTRUCTION_EMBEDDINGS, Reducer, Selection, Site
from tokenomy.reducers.registry import register


def relevance_scores(features: torch.Tensor, instruction: torch.Tensor, negate: bool) -> torch.Tensor:
    """[N] min-max normalised mean cosine of each token with the instruction tokens (ones without instruction)."""
    if instruction is None or instruction.shape[0] == 0:
        return torch.ones(features.shape[0], device=features.device)
    unit = features.float() / features.float().norm(dim=-1, keepdim=True).clamp(min=1e-8)
    text = instruction.float().to(features.device)
    text = text / text.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    rho = (unit @ text.T).mean(dim=-1)
    rho = -rho if negate else rho
    low, span = rho.min(), rho.max() - rho.min()
    if not bool(torch.isfinite(span)) or float(span) <= 0:
        return torch.ones_like(rho)
    return (rho - low + 1e-6) / span


def dpp_greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP of a DPP with kernel [N, N]: k indices in the order picked (Cholesky-style incremental update)."""
    n = kernel.shape[0]
    kernel = kernel.float().nan_to_num(0.0)
    gains = kernel.diagonal().clone()
    vectors = torch.zeros(k, n, device=kernel.device)
    chosen = torch.zeros(n, dtype=torch.bool, device=kernel.device)
    picked = []
    for step in range(k):
        # NaN or -inf gains rank below every real one but above the tokens already picked
        score = torch.where(chosen, float("-inf"), gains.nan_to_num(nan=-3e38, neginf=-3e38))
        j = int(torch.argmax(score))
        picked.append(j)
        chosen[j] = True
        update = (kernel[j] - vectors[:step, j] @ vectors[:step]) / gains[j].clamp(min=1e-12).sqrt()
        vectors[step] = update
        gains = gains - update.square()
    return torch.tensor(picked, dtype=torch.long, device=kernel.device)


@register("cdpruner")
class CDPruner(Reducer):
    description = "conditional DPP after the projector: diverse tokens weighted by relevance to the instruction"
    paper = "Zhang et al., Beyond Attention or Similarity (CDPruner), NeurIPS 2025, arXiv 2506.10967"
    site = Site.POST_PROJECTOR

    def __init__(self, keep=None, negate_relevance: bool = False):
        super().__init__(keep=keep)
        if not isinstance(negate_relevance, bool):
            raise InputError(f"cdpruner negate_relevance must be true or false, got {negate_relevance!r}")
        self.negate_relevance = negate_relevance

    def select(self, image):
        features = image.features.detach()  # a selection, never a gradient path
        relevance = relevance_scores(features, image.context.get(INSTRUCTION_EMBEDDINGS), self.negate_relevance)
        similarity = 1.0 - cosine_distance(features)
        kernel = relevance[:, None] * similarity * relevance[None, :]
        kept = dpp_greedy_map(kernel, self.budget(image)).sort().values
        return Selection.from_indices(image, kept)
