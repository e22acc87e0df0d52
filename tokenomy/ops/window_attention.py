"""Attention received inside windows (SEATS Stage I's encoder statistic, reducers.md §5.2): a full softmax map per
window, never across windows, so memory is one window's [H, w, w] at a time."""
import torch


def window_attention_received(query: torch.Tensor, keys: torch.Tensor, bounds: list, scale: float) -> torch.Tensor:
    """a_j = sum_i mean_h softmax(q_i . k^T * scale)_j with i, j inside the same [start, end) window of `bounds`.

    query, keys: [H, N, d] (rotary applied). Returns [N] in fp32; each window's values sum to its size.
    """
    received = torch.zeros(query.shape[1], dtype=torch.float32, device=query.device)
    for start, end in bounds:
        logits = torch.einsum("hqd,hkd->hqk", query[:, start:end].float(), keys[:, start:end].float()) * scale
        received[start:end] = logits.softmax(dim=-1).mean(dim=0).sum(dim=0)
    return received
