"""Token sampling: temperature, top-k, top-p, classifier-free guidance and its schedules."""
from __future__ import annotations

import math

import torch

from tokenomy.errors import UnknownNameError


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[..., -1] = False  # the most likely token always survives
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [..., V] -> ids [...]; temperature 0 means greedy. One multinomial draw per row, in row order."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def guidance_scale(schedule: str, scale: float, decoded: int, total: int, power: float = 1.0) -> float:
    """CFG weight when `decoded` of `total` tokens are known. `linear` ramps 1 -> scale over the decoded fraction
    (RandAR/ARPG); `power-cosine` follows RAR with the decoded fraction as its progress (one token per step)."""
    if schedule == "constant":
        return scale
    if schedule == "linear":
        return 1.0 + (scale - 1.0) * decoded / total
    if schedule == "power-cosine":
        return (scale - 1.0) * (1 - math.cos(math.pi * (decoded / total) ** power)) / 2 + 1.0
    raise UnknownNameError("cfg schedule", schedule, ["constant", "linear", "power-cosine"])


def apply_cfg(logits: torch.Tensor, weight: float) -> torch.Tensor:
    """logits stacked [cond ; uncond] on dim 0 -> u + w (c - u)."""
    cond, uncond = logits.chunk(2)
    return uncond + weight * (cond - uncond)
