"""Single attention rows and rotary embeddings (reducers.md §0.2): what a reducer needs of a layer's attention,
computed from its own q/k in O(N) per row, so the layer itself keeps running under SDPA or FlashAttention."""
import torch


def attention_row(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Head-averaged softmax(query . keys^T * scale) in fp32.

    query: [B, H, D] (one query per head), keys: [B, H, T, D] -> [B, T]. Cost O(B*H*T*D): one row, never a map.
    """
    logits = torch.einsum("bhd,bhtd->bht", query.float(), keys.float()) * scale
    return logits.softmax(dim=-1).mean(dim=1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin (the half-split convention of Llama, Qwen2 and the Qwen ViTs)."""
    return x * cos + rotate_half(x) * sin
