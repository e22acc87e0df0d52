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
        # nucleus as LlamaGen / RandAR / ARPG (HF's filter): a token goes once the tokens strictly more likely than it
        # already hold more than top_p, so the most likely token always stays and a tie at top_p keeps one more
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = torch.zeros_like(cumulative, dtype=torch.bool)
        drop[..., 1:] = cumulative[..., :-1] > top_p
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


def sample_columns(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, k, V] -> ids [B, k], one batch-wide draw per query column in column order, as RandAR's loop
    draws: the same distribution as `sample_logits`, and the official sample for the same seed."""
    return torch.stack([sample_logits(logits[:, i], temperature, top_k, top_p, generator) for i in range(logits.shape[1])], 1)


def guidance_scale(schedule: str, scale: float, decoded: int, total: int, power: float = 1.0, start: float = 1.0) -> float:
    """CFG weight when `decoded` of `total` tokens are known. `linear` ramps start -> scale over the decoded fraction
    (RandAR's cfg_scales = (start, scale); ARPG's start is 1); `power-cosine` follows RAR with the decoded fraction
    as its progress (one token per step)."""
    if schedule == "constant":
        return scale
    if schedule == "linear":
        return start + (scale - start) * decoded / total
    if schedule == "power-cosine":
        return (scale - 1.0) * (1 - math.cos(math.pi * (decoded / total) ** power)) / 2 + 1.0
    raise UnknownNameError("cfg schedule", schedule, ["constant", "linear", "power-cosine"])


def apply_cfg(logits: torch.Tensor, weight: float) -> torch.Tensor:
    """logits stacked [cond ; uncond] on dim 0 -> u + w (c - u)."""
    cond, uncond = logits.chunk(2)
    return uncond + weight * (cond - uncond)
