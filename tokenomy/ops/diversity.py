"""Greedy weighted max-min diversity (reducers.md §0.3), used by DivPrune, SEATS Stage I and zeroth-order pruning."""
from typing import Optional

import torch


def cosine_distance(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 - cos(x_i, x_j) in fp32, [..., n, n]; eps keeps zero vectors finite."""
    unit = features.float() / features.float().norm(dim=-1, keepdim=True).clamp(min=eps)
    return 1.0 - unit @ unit.transpose(-1, -2)


def max_min_diversity(distance: torch.Tensor, k: int, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pick k of n items greedily so that each new pick is farthest from those already picked.

    distance: [..., n, n] (symmetric, e.g. `cosine_distance`); weights: [..., n] >= 0 multiply the candidate (column)
    side, D~_ij = D_ij * w_j. First pick: argmax_j min_{i != j} D~_ij; then repeatedly the candidate whose minimum
    weighted distance to the picked set is largest. Returns [..., k] indices in ascending order. Ties go to the lower
    index. Batch equal-sized windows as a leading dim.
    """
    n = distance.shape[-1]
    k = min(int(k), n)
    weighted = distance.float() if weights is None else distance.float() * weights.float().unsqueeze(-2)
    lead = weighted.shape[:-2]
    flat = weighted.reshape(-1, n, n)
    eye = torch.eye(n, dtype=torch.bool, device=flat.device)
    nearest = flat.masked_fill(eye, float("inf")).amin(dim=-2) if n > 1 else torch.zeros(flat.shape[0], 1, device=flat.device)
    rows = torch.arange(flat.shape[0], device=flat.device)
    picked = torch.empty(flat.shape[0], k, dtype=torch.long, device=flat.device)
    if k == 0:
        return picked.reshape(*lead, 0)
    first = torch.argmax(nearest, dim=-1)
    picked[:, 0] = first
    closest = flat[rows, first]  # [R, n] min weighted distance of each candidate to the picked set
    chosen = torch.zeros(flat.shape[0], n, dtype=torch.bool, device=flat.device)
    chosen[rows, first] = True
    for step in range(1, k):
        candidate = torch.argmax(closest.masked_fill(chosen, -1.0), dim=-1)
        picked[:, step] = candidate
        chosen[rows, candidate] = True
        closest = torch.minimum(closest, flat[rows, candidate])
    return picked.sort(dim=-1).values.reshape(*lead, k)
