"""Zeroth-order sensitivity pruning (ZOO-Prune, reducers.md §3), before the projector.

A RECONSTRUCTION from the paper's abstract-level description: the official repository (AIM-SKKU/ZOO-Prune) holds
only a README, so the estimator, its constants and the way sensitivity and diversity combine are ours (spec §3.2):

1. Sensitivity of the projector f (LLaVA: the MLP per token; Qwen: the 2x2 merger per merge unit, perturbing the
   unit's 4 concatenated patches) to isotropic Gaussian perturbations of its input, with forward passes only:
       z_i = (1/S) sum_s ||f(x_i + mu u_is) - f(x_i)||_2 / mu,    u_is ~ N(0, I),    mu = mu_scale * RMS(x)
   (in expectation a Jacobian-norm proxy). f is token-wise, so all S perturbations of all N tokens go through the
   projector in one call. The noise comes from a generator seeded with `seed` for every image, so a sample's result
   never depends on its batch.
2. Weighted greedy max-min diversity (spec §0.3, `tokenomy.ops.max_min_diversity`) on the cosine distances of the
   projected tokens f(x), with candidate weights w_j = (z_j / max z)^gamma; `keep` tokens, in original order.

Parameters and defaults (spec §3.2): samples S = 8, mu_scale = 1e-2, gamma = 1. The optional spatial regulariser the
spec mentions is not implemented. Scores are computed in fp32; the perturbed inputs are cast to the projector's
dtype (in bf16 a perturbation of 1% of the RMS is at the edge of the format's resolution).
"""
from __future__ import annotations

import math

import torch

from tokenomy.errors import InputError
from tokenomy.ops.diversity import cosine_distance, max_min_diversity
from tokenomy.reducers.base import Reducer, Selection, Site
from tokenomy.reducers.registry import register


def _positive(value, name, kind=float) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or (kind is int and not isinstance(value, int)) or not math.isfinite(value) or value <= 0:
        raise InputError(f"zeroth-order {name} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")


def sensitivity(project, features: torch.Tensor, samples: int, mu_scale: float, seed: int):
    """(z [N], f(x) [N, d]): the mean finite-difference gain of `project` along `samples` Gaussian directions."""
    x = features.float()
    n = x.shape[0]
    mu = mu_scale * x.pow(2).mean().sqrt().clamp(min=1e-12)
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(samples, *x.shape, generator=generator).to(x.device)
    perturbed = (x[None] + mu * directions).reshape(samples * n, *x.shape[1:])
    outputs = project(torch.cat([x, perturbed]).to(features.dtype)).float()
    base, moved = outputs[:n], outputs[n:].reshape(samples, n, -1)
    z = (moved - base[None]).norm(dim=-1).mean(dim=0) / mu
    return torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0), base


@register("zeroth-order")
class ZerothOrder(Reducer):
    description = ("projector sensitivity to Gaussian perturbations (forward passes only) x max-min diversity; "
                   "a reconstruction, the official code is not public")
    paper = "Training-Free Token Pruning via Zeroth-Order Gradient Estimation in VLMs (ZOO-Prune), CVPR 2026, arXiv 2509.24837"
    site = Site.PRE_PROJECTOR

    def __init__(self, keep=None, samples: int = 8, mu: float = 1e-2, gamma: float = 1.0, seed: int = 0):
        super().__init__(keep=keep)
        _positive(samples, "samples", int)
        _positive(mu, "mu (perturbation size, a fraction of the features' RMS)")
        _positive(gamma, "gamma")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError(f"zeroth-order seed must be an integer, got {seed!r}")
        self.samples, self.mu, self.gamma, self.seed = samples, mu, gamma, seed

    def select(self, image):
        if image.project is None:
            raise InputError("zeroth-order needs the projector at the pre-projector site (ImageTokens.project)")
        k = self.budget(image)
        if k >= image.num_tokens:
            return Selection.keep_all(image)
        with torch.no_grad():
            z, projected = sensitivity(image.project, image.features, self.samples, self.mu, self.seed)
        top = z.max()
        weights = (z / top).pow(self.gamma) if top > 0 else torch.ones_like(z)
        distance = torch.nan_to_num(cosine_distance(projected), nan=0.0)
        return Selection.from_indices(image, max_min_diversity(distance, k, weights))

    def __repr__(self):
        return f"ZerothOrder(keep={self.keep}, samples={self.samples}, mu={self.mu}, gamma={self.gamma}, seed={self.seed})"
