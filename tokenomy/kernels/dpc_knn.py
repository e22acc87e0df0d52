"""DPC-KNN clustering and mean merging (Chat-UniVi's CTM, as PPE uses it): the PyTorch reference.

One signature for both twins (the Triton one is ``tokenomy.kernels.dpc_knn_triton``; ``tokenomy.kernels.dispatch``
picks between them)::

    result = dpc_knn(x, clusters, k=5)     # x [B, N, C]; every sample is clustered on its own

The algorithm (specs/reducers.md §4.2, read in Chat-UniVi/PPE ``cluster_dpc_knn``):
1. ``dist = cdist(x, x) / sqrt(C)`` in float32, from the differences (so ``dist[i, i] == 0`` exactly).
2. Density ``rho_i = exp(-mean of the k smallest dist[i, :]**2)``, the token itself included.
3. ``delta_i`` = distance to the nearest token of higher density (its ``parent``); the densest token gets the
   largest distance of its sample and parent -1. Score = ``delta * rho``.
4. The ``clusters`` best scores are the centres, in descending score order; every token joins its nearest centre,
   a centre joins itself. Merged token = uniform mean of the members.
Ties are broken by index instead of the official code's 1e-6 random density noise [O], so results never depend on
a random draw: of two tokens with equal density the lower index counts as denser; equal scores and equal distances
to two centres go to the lower index / earlier centre.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenomy.errors import ShapeError


@dataclass
class DPCResult:
    """centres [B, M] token indices, descending score; assign [B, N] centre slot (0..M-1) of every token;
    merged [B, M, C] (x's dtype) mean of each slot's members; density, score [B, N] float32; parent [B, N] the
    nearest denser token (-1 for the densest)."""

    centres: torch.Tensor
    assign: torch.Tensor
    merged: torch.Tensor
    density: torch.Tensor
    score: torch.Tensor
    parent: torch.Tensor


def check_inputs(x: torch.Tensor, clusters: int, k: int) -> None:
    if x.dim() != 3 or not x.is_floating_point():
        raise ShapeError(f"x must be a floating-point [B, N, C] tensor, got shape {tuple(x.shape)} / {x.dtype}")
    if x.shape[1] == 0:
        raise ShapeError("x holds no tokens (N = 0)")
    if isinstance(clusters, bool) or not isinstance(clusters, int) or not 1 <= clusters <= x.shape[1]:
        raise ShapeError(f"clusters must be an integer in 1..N={x.shape[1]}, got {clusters!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= x.shape[1]:
        raise ShapeError(f"k (neighbours for the density) must be an integer in 1..N={x.shape[1]}, got {k!r}")


def distance_scale(channels: int) -> float:
    """1/sqrt(C) rounded to float32 once, so both twins multiply by the very same number."""
    return float(torch.tensor(channels ** -0.5, dtype=torch.float32))


def pick_centres(score: torch.Tensor, clusters: int) -> torch.Tensor:
    """The `clusters` highest scores, descending; equal scores keep the lower index first."""
    return torch.sort(score, dim=1, descending=True, stable=True).indices[:, :clusters]


def dpc_knn(x: torch.Tensor, clusters: int, k: int = 5) -> DPCResult:
    check_inputs(x, clusters, k)
    batch, n, channels = x.shape
    xf = x.float()
    dist = torch.cdist(xf, xf, compute_mode="donot_use_mm_for_euclid_dist") * distance_scale(channels)
    nearest = torch.topk(dist, k, dim=-1, largest=False, sorted=True).values
    density = torch.exp(-(nearest * nearest).sum(-1) / k)

    index = torch.arange(n, device=x.device)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (index[None, :] < index[:, None]))
    masked = dist.masked_fill(~denser, float("inf"))
    delta, parent = masked.min(dim=-1)
    densest = ~denser.any(dim=-1)
    delta = torch.where(densest, dist.flatten(1).amax(1)[:, None], delta)
    parent = parent.masked_fill(densest, -1)
    score = delta * density

    centres = pick_centres(score, clusters)
    assign = torch.gather(dist, 1, centres[:, :, None].expand(-1, -1, n)).argmin(dim=1)
    slots = torch.arange(clusters, device=x.device).expand(batch, -1)
    assign = assign.scatter(1, centres, slots)

    counts = torch.zeros(batch, clusters, device=x.device).scatter_add_(1, assign, torch.ones(batch, n, device=x.device))
    sums = torch.zeros(batch, clusters, channels, device=x.device).scatter_add_(1, assign[..., None].expand(-1, -1, channels), xf)
    merged = (sums / counts[..., None]).to(x.dtype)
    return DPCResult(centres, assign, merged, density, score, parent)
