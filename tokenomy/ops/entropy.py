"""Normalised entropy of attention distributions (FlowCut's adaptive prune count)."""
import math

import torch


def normalized_entropy(p: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """-sum p log p / log n over the last dim, in fp32; eps keeps 0 log 0 at 0 (reducers.md §1.9)."""
    p = p.float()
    n = p.shape[-1]
    if n <= 1:
        return torch.zeros(p.shape[:-1], device=p.device)
    return -(p * (p + eps).log()).sum(dim=-1) / math.log(n)
