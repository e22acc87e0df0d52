"""DART (Wen et al., 2025, arXiv 2502.11494): keep the visual tokens least duplicated with a few pivot tokens.

Before LLM layer `layer` (official: 2), from layer `layer`-1:
- pivots: the `pivot_image_tokens` visual tokens and the `pivot_text_tokens` prompt tokens after the image with the
  largest L1 norm of their post-rotary keys (heads concatenated), as in the official `get_retained_image_token`;
- duplication: cosine similarity of the hidden states entering `layer` after the LLM's final norm (the official code
  applies `model.norm` to that intermediate state too);
- each pivot in turn (ascending sequence index, image pivots first; the official iterates a Python set, which is
  nearly that order) takes the candidates least similar to it and removes them from the pool; the image pivots are
  kept, the text pivots are not.
Budget: the official keeps 4 + 8 * floor(M / 8) tokens (132 for M=128). Here exactly `keep`: the image pivots plus
keep - pivots candidates, spread over the pivots as evenly as possible (the first pivots take one more).
Attention-free (FlashAttention/SDPA stay on); kept tokens keep their position ids (P-keep), as in the official code.
"""
import torch

from tokenomy.errors import InputError
from tokenomy.reducers.base import FINAL_NORM, LLM_KEYS, TEXT_FEATURES, TEXT_LLM_KEYS, Reducer, Selection, Site
from tokenomy.reducers.registry import register


def _check_count(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"dart {name} must be an integer >= {minimum}, got {value!r}")


def _largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, ties toward the lower index, NaN last (in rank order)."""
    order = torch.sort(scores.float().nan_to_num(nan=float("-inf")), descending=True, stable=True).indices
    return order[:k]


@register("dart")
class DART(Reducer):
    description = "duplication-aware pruning in the LLM: key-norm pivots, then the tokens least similar to them"
    paper = "Wen et al., Stop Looking for Important Tokens (DART), EMNLP 2025, arXiv 2502.11494"
    site = Site.LLM

    def __init__(self, keep=None, layer: int = 2, pivot_image_tokens: int = 4, pivot_text_tokens: int = 4):
        super().__init__(keep=keep)
        _check_count("layer", layer, 1)
        _check_count("pivot_image_tokens", pivot_image_tokens, 1)
        _check_count("pivot_text_tokens", pivot_text_tokens, 0)
        self.layer, self.pivot_image_tokens, self.pivot_text_tokens = layer, pivot_image_tokens, pivot_text_tokens

    def llm_layers(self, num_layers):
        if self.layer >= num_layers:
            raise InputError(f"dart layer {self.layer} must be in 1..{num_layers - 1} for this {num_layers}-layer LLM")
        return (self.layer,)

    def llm_request(self, layer):
        return (LLM_KEYS, TEXT_LLM_KEYS) if self.pivot_text_tokens else (LLM_KEYS,)

    def select(self, image):
        budget = self.budget(image)
        keys = image.signals[LLM_KEYS].float()
        image_pivots = _largest(keys.abs().sum(-1), min(self.pivot_image_tokens, budget))
        norm = image.context.get(FINAL_NORM)
        hidden = norm(image.features) if norm is not None else image.features
        pivot_rows = [hidden[i] for i in sorted(image_pivots.tolist())]
        if self.pivot_text_tokens:
            text_keys, text_hidden = image.signals[TEXT_LLM_KEYS].float(), image.context[TEXT_FEATURES]
            text_pivots = _largest(text_keys.abs().sum(-1), min(self.pivot_text_tokens, text_keys.shape[0]))
            if norm is not None and len(text_pivots):
                text_hidden = norm(text_hidden)
            pivot_rows += [text_hidden[i] for i in sorted(text_pivots.tolist())]
        hidden = hidden.float()
        candidates = torch.ones(image.num_tokens, dtype=torch.bool, device=hidden.device)
        candidates[image_pivots.to(hidden.device)] = False
        kept = [image_pivots.to(hidden.device)]
        extra = budget - len(image_pivots)
        share, remainder = divmod(extra, len(pivot_rows))
        for number, pivot in enumerate(pivot_rows):
            count = min(share + (number < remainder), int(candidates.sum()))
            if count == 0:
                continue
            pool = torch.nonzero(candidates).squeeze(1)
            similarity = torch.nn.functional.cosine_similarity(pivot.float()[None], hidden[pool], dim=-1)
            chosen = pool[_largest(-similarity, count)]
            candidates[chosen] = False
            kept.append(chosen)
        return Selection.from_indices(image, torch.cat(kept).sort().values)
