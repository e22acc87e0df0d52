"""Rectified flow in the minRF convention: x_t = t*eps + (1-t)*x0, the network predicts v = eps - x0."""
from __future__ import annotations

from typing import Callable

import torch


def logit_normal_timesteps(batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.sigmoid(torch.randn(batch, device=device, generator=generator))


def flow_matching_loss(velocity_fn: Callable, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    t = logit_normal_timesteps(x0.shape[0], x0.device, generator)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    t_b = t.view(-1, *[1] * (x0.ndim - 1))
    x_t = t_b * eps + (1 - t_b) * x0
    return (velocity_fn(x_t, t) - (eps - x0)).pow(2).mean()


@torch.no_grad()
def euler_sample(velocity_fn: Callable, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Integrate from t = 1 (noise) to t = 0 with `steps` uniform Euler steps, updating in fp32."""
    x = noise.float()
    for i in range(steps, 0, -1):
        t = torch.full((x.shape[0],), i / steps, device=x.device)
        x = x - velocity_fn(x, t).float() / steps
    return x
