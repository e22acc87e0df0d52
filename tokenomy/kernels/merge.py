"""Bipartite soft matching (ToMe) token merging: the PyTorch reference.

Every caller (the ToMe ViT patch, the merging reducers, the generation branch) goes through one signature,
dispatched by :mod:`tokenomy.kernels.dispatch` to this file or to its Triton twin ``merge_triton.py``::

    plan   = match(metric, r, protected=None, mode="alternate", hw=None, stride=(2, 2), k=2, generator=None)
    y, s_y = merge(x, plan, size=None)          # size-weighted mean; s_y.sum(-1) == size.sum(-1)
    x_full = unmerge(y, plan)                   # every original position gets the row it was merged into
    x_out  = unmerge_add(y, plan, residual)     # residual + unmerge(y), one pass in the Triton twin
    bias   = log_size_bias(s_y)                 # add to attention logits per key: proportional attention
    out    = attention(q, k, v, key_log_size=bias)     # q, k, v [B, H, N, D_h]; Triton twin: flash + bias

Shapes: ``metric`` [B, N, C_m] (ToMe: keys averaged over heads), ``x`` [B, N, D], ``size`` [B, N] float32
(missing = every token has size 1), ``r`` = tokens removed, ``y`` [B, N - r, D]. Inputs must be contiguous
and on one device; half-precision inputs are fine, scores and the weighted sums are computed in float32.

The algorithm (specs/generation.md §10.1):
1. Partition positions into A (sources) and B (destinations); it is shared by the whole batch.
   ``alternate``: A = even, B = odd positions. ``kth``: every k-th position (k-1, 2k-1, ...) goes to B.
   ``random2d`` (ToMe-SD): one position of each full sy×sx cell of the h×w grid goes to B (top-left without
   a generator, uniformly random with one). Protected positions (CLS, registers) are forced into A and put
   first in A's order; their rows score -inf, so they are never merged and never receive a merge.
2. Cosine similarity of every A row to every B row, in float32: ``(m_a @ m_b.T) / (|m_a| |m_b|)`` with
   norms clamped to 1e-12. Each A row keeps its best B match; exact ties go to the lowest B position.
3. The r A rows with the highest best score are merged ("src"); ties go to the lowest A position.
4. Each B row becomes the size-weighted mean of itself and the src rows that chose it; sizes add up.
5. Output order is canonical: the kept A rows in A order (protected first, then ascending position),
   then every B row in B order. It differs from the ToMe repository, which keeps unmerged rows in
   descending-score order; compare with it through ``unmerge`` or ``out_row``, never row by row.

r larger than the number of mergeable A rows raises :class:`tokenomy.errors.ShapeError` here; the ToMe
patch clamps r per layer instead (documented there), as the ToMe repository does.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from tokenomy.errors import ShapeError, UnknownNameError

MODES = ("alternate", "kth", "random2d")
NORM_EPS = 1e-12


@dataclass
class MergePlan:
    """Everything merge/unmerge need, computed once per layer by ``match``. Index tensors are int64.

    a_idx [N_a], b_idx [N_b]: the partition (original positions), shared by the batch; protected first in A.
    n_protected: how many leading A rows are protected.
    node_max [B, N_a] float32: best similarity of each A row (-inf for protected rows).
    node_idx [B, N_a]: its best B row (index into b_idx; 0 for protected rows).
    unm_idx [B, N_a - r]: A rows kept, in A order; output row i holds A row unm_idx[:, i].
    src_idx [B, r]: A rows merged away, grouped by destination (ascending B row, then ascending A row).
    dst_start, dst_count [B, N_b]: CSR slice of src_idx that merges into each B row.
    out_row [B, N]: the output row every original position ends up in (the unmerge map).
    """

    n: int
    r: int
    a_idx: torch.Tensor
    b_idx: torch.Tensor
    n_protected: int
    node_max: torch.Tensor
    node_idx: torch.Tensor
    unm_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_start: torch.Tensor
    dst_count: torch.Tensor
    out_row: torch.Tensor

    @property
    def batch(self) -> int:
        return self.out_row.shape[0]

    @property
    def n_out(self) -> int:
        return self.n - self.r


def partition(n: int, protected: Optional[Sequence[int]] = (), mode: str = "alternate", hw=None, stride=(2, 2),
              k: int = 2, generator: Optional[torch.Generator] = None, device=None):
    """Split positions 0..n-1 into (a_idx, b_idx, n_protected); see the module docstring for the modes.

    Partitions without a generator are cached per device, so a layer does not pay host-to-device copies.
    """
    protected = () if protected is None else tuple(sorted(set(int(p) for p in protected)))
    hw = None if hw is None else tuple(hw)
    if generator is not None:
        a_idx, b_idx, n_protected = _partition(n, protected, mode, hw, tuple(stride), k, generator)
        return a_idx.to(device), b_idx.to(device), n_protected
    return _cached_partition(n, protected, mode, hw, tuple(stride), k, torch.device(device or "cpu"))


@lru_cache(maxsize=256)
def _cached_partition(n, protected, mode, hw, stride, k, device):
    a_idx, b_idx, n_protected = _partition(n, protected, mode, hw, stride, k, None)
    return a_idx.to(device), b_idx.to(device), n_protected


def _partition(n, protected, mode, hw, stride, k, generator):
    if protected and (protected[0] < 0 or protected[-1] >= n):
        raise ShapeError(f"protected positions {protected} fall outside 0..{n - 1}")
    if mode == "alternate" or mode == "kth":
        step = 2 if mode == "alternate" else int(k)
        if step < 2:
            raise ShapeError(f"kth partition needs k >= 2, got k={k}")
        positions = torch.arange(n)
        is_dst = positions % step == step - 1
    elif mode == "random2d":
        if hw is None or hw[0] * hw[1] != n:
            raise ShapeError(f"random2d partition needs hw=(h, w) with h*w == N={n}, got hw={hw}")
        h, w = hw
        sy, sx = stride
        cells_y, cells_x = h // sy, w // sx
        if generator is None:
            offset = torch.zeros(cells_y, cells_x, dtype=torch.long)
        else:
            offset = torch.randint(sy * sx, (cells_y, cells_x), generator=generator, device=generator.device).cpu()
        rows = torch.arange(cells_y)[:, None] * sy + offset // sx
        cols = torch.arange(cells_x)[None, :] * sx + offset % sx
        is_dst = torch.zeros(n, dtype=torch.bool)
        is_dst[(rows * w + cols).flatten()] = True
    else:
        raise UnknownNameError("partition mode", mode, MODES)
    is_protected = torch.zeros(n, dtype=torch.bool)
    is_protected[list(protected)] = True
    is_dst &= ~is_protected
    free_src = torch.nonzero(~is_dst & ~is_protected).flatten()
    a_idx = torch.cat([torch.tensor(protected, dtype=torch.long), free_src])
    return a_idx, torch.nonzero(is_dst).flatten(), len(protected)


def check_metric(metric: torch.Tensor, r: int, n_a: int, n_b: int, n_protected: int) -> None:
    if metric.dim() != 3:
        raise ShapeError(f"metric must be [B, N, C], got shape {tuple(metric.shape)}")
    if not metric.is_floating_point():
        raise ShapeError(f"metric must be a floating-point tensor, got {metric.dtype}")
    if not metric.is_contiguous():
        raise ShapeError("metric is not contiguous; pass metric.contiguous()")
    mergeable = n_a - n_protected if n_b > 0 else 0
    if not 0 <= r <= mergeable:
        raise ShapeError(f"r={r} is outside 0..{mergeable}: only {mergeable} of N={metric.shape[1]} tokens can be "
                         f"merged ({n_a} in set A, {n_protected} of them protected, {n_b} in set B)")


def check_merge_inputs(x: torch.Tensor, plan: MergePlan, size: Optional[torch.Tensor]) -> None:
    if x.dim() != 3 or x.shape[0] != plan.batch or x.shape[1] != plan.n:
        raise ShapeError(f"x must be [B={plan.batch}, N={plan.n}, D] to match the plan, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ShapeError(f"x must be a floating-point tensor, got {x.dtype}")
    if not x.is_contiguous():
        raise ShapeError("x is not contiguous; pass x.contiguous()")
    if x.device != plan.out_row.device:
        raise ShapeError(f"x is on {x.device} but the plan is on {plan.out_row.device}")
    if size is not None:
        if tuple(size.shape) != (plan.batch, plan.n):
            raise ShapeError(f"size must be [B={plan.batch}, N={plan.n}], got {tuple(size.shape)}")
        if size.dtype != torch.float32:
            raise ShapeError(f"size must be float32, got {size.dtype}")
        if not size.is_contiguous() or size.device != x.device:
            raise ShapeError(f"size must be contiguous and on {x.device}")


def check_unmerge_inputs(y: torch.Tensor, plan: MergePlan, residual: Optional[torch.Tensor]) -> None:
    if y.dim() != 3 or y.shape[0] != plan.batch or y.shape[1] != plan.n_out:
        raise ShapeError(f"y must be [B={plan.batch}, N-r={plan.n_out}, D] to match the plan, got {tuple(y.shape)}")
    if not y.is_contiguous():
        raise ShapeError("y is not contiguous; pass y.contiguous()")
    if y.device != plan.out_row.device:
        raise ShapeError(f"y is on {y.device} but the plan is on {plan.out_row.device}")
    if residual is not None:
        if tuple(residual.shape) != (plan.batch, plan.n, y.shape[2]):
            raise ShapeError(f"residual must be [B={plan.batch}, N={plan.n}, D={y.shape[2]}], "
                             f"got {tuple(residual.shape)}")
        if residual.dtype != y.dtype:
            raise ShapeError(f"residual is {residual.dtype} but y is {y.dtype}")
        if not residual.is_contiguous() or residual.device != y.device:
            raise ShapeError(f"residual must be contiguous and on {y.device}")


def similarity(m_a: torch.Tensor, m_b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity in float32, written the way the fused kernel computes it (dot, then both norms)."""
    m_a, m_b = m_a.float(), m_b.float()
    inv_a = 1.0 / m_a.norm(dim=-1).clamp_min(NORM_EPS)
    inv_b = 1.0 / m_b.norm(dim=-1).clamp_min(NORM_EPS)
    return (m_a @ m_b.transpose(-1, -2)) * inv_a[..., :, None] * inv_b[..., None, :]


def plan_from_scores(n: int, r: int, a_idx, b_idx, n_protected: int, node_max, node_idx) -> MergePlan:
    """Steps 3-5: pick the r best A rows and build the merge/unmerge maps from each row's best match."""
    batch, n_a = node_max.shape
    n_b = b_idx.numel()
    device = node_max.device
    order = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
    is_src = torch.zeros_like(node_max, dtype=torch.bool).scatter_(1, order[:, :r], True)
    unm_idx = torch.sort(order[:, r:], dim=-1).values
    a_pos = torch.arange(n_a, device=device).expand(batch, n_a)
    # group src rows by destination, ascending A position inside a group: the merge's deterministic order
    group_key = torch.where(is_src, node_idx * n_a + a_pos, n_b * n_a + a_pos)
    src_idx = torch.sort(group_key, dim=-1).values[:, :r] % n_a
    dst_count = torch.zeros(batch, n_b, dtype=torch.long, device=device)
    dst_count.scatter_add_(1, node_idx.gather(1, src_idx), torch.ones_like(src_idx))
    dst_start = dst_count.cumsum(-1) - dst_count
    n_unm = n_a - r
    a_row = torch.where(is_src, n_unm + node_idx, (~is_src).long().cumsum(-1) - 1)
    out_row = torch.empty(batch, n, dtype=torch.long, device=device)
    out_row[:, a_idx] = a_row
    out_row[:, b_idx] = n_unm + torch.arange(n_b, device=device)
    return MergePlan(n, r, a_idx, b_idx, n_protected, node_max, node_idx, unm_idx, src_idx, dst_start, dst_count,
                     out_row)


def match(metric: torch.Tensor, r: int, protected: Optional[Sequence[int]] = (), mode: str = "alternate", hw=None,
          stride=(2, 2), k: int = 2, generator: Optional[torch.Generator] = None) -> MergePlan:
    """Bipartite soft matching: which r tokens merge into which. See the module docstring."""
    batch, n = metric.shape[:2] if metric.dim() == 3 else (0, 0)
    a_idx, b_idx, n_protected = partition(n, protected, mode, hw, stride, k, generator, metric.device)
    check_metric(metric, r, a_idx.numel(), b_idx.numel(), n_protected)
    if b_idx.numel() == 0:
        node_max = torch.full((batch, a_idx.numel()), float("-inf"), device=metric.device)
        node_idx = torch.zeros(batch, a_idx.numel(), dtype=torch.long, device=metric.device)
    else:
        scores = similarity(metric[:, a_idx], metric[:, b_idx])
        scores[:, :n_protected] = float("-inf")
        node_idx = scores.argmax(dim=-1)  # first maximum on ties, so 0 for protected rows
        node_max = scores.gather(-1, node_idx[..., None])[..., 0]
    return plan_from_scores(n, r, a_idx, b_idx, n_protected, node_max, node_idx)


def merge(x: torch.Tensor, plan: MergePlan, size: Optional[torch.Tensor] = None):
    """Size-weighted merge: returns (y [B, N-r, D] in x's dtype, size_y [B, N-r] float32)."""
    check_merge_inputs(x, plan, size)
    batch, _, dim = x.shape
    weight = torch.ones(batch, plan.n, device=x.device) if size is None else size
    size_y = torch.zeros(batch, plan.n_out, device=x.device).scatter_add_(1, plan.out_row, weight)
    total = torch.zeros(batch, plan.n_out, dim, device=x.device)
    total.scatter_add_(1, plan.out_row[..., None].expand(-1, -1, dim), x.float() * weight[..., None])
    return (total / size_y[..., None]).to(x.dtype), size_y


def unmerge(y: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Scatter merged rows back to every original position: [B, N-r, D] -> [B, N, D]."""
    check_unmerge_inputs(y, plan, None)
    return y.gather(1, plan.out_row[..., None].expand(-1, -1, y.shape[2]))


def unmerge_add(y: torch.Tensor, plan: MergePlan, residual: torch.Tensor) -> torch.Tensor:
    """residual + unmerge(y), summed in float32 and rounded once to residual's dtype."""
    check_unmerge_inputs(y, plan, residual)
    full = y.gather(1, plan.out_row[..., None].expand(-1, -1, y.shape[2]))
    return (residual.float() + full.float()).to(residual.dtype)


def log_size_bias(size: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Proportional attention: log(size) added to every query's logit for each key ([B, N] float32)."""
    return None if size is None else size.float().log()


def check_attention_inputs(q, k, v, key_log_size) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ShapeError(f"q, k, v must be [B, H, N, D_h], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise ShapeError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not fit together")
    if not (q.dtype == k.dtype == v.dtype):
        raise ShapeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if key_log_size is not None and tuple(key_log_size.shape) != (k.shape[0], k.shape[2]):
        raise ShapeError(f"key_log_size must be [B={k.shape[0]}, N_kv={k.shape[2]}], got {tuple(key_log_size.shape)}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_log_size: Optional[torch.Tensor] = None,
              causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """Softmax attention over [B, H, N, D_h] with an optional per-key log-size bias [B, N_kv].

    A float mask stops PyTorch from using its FlashAttention backend (and is rounded to q's dtype); the
    Triton twin adds the float32 bias inside a flash-attention loop instead.
    """
    check_attention_inputs(q, k, v, key_log_size)
    mask = None
    if key_log_size is not None:
        mask = key_log_size.to(q.dtype)[:, None, None, :]
        if causal:
            keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
            mask = mask.masked_fill(~keep, float("-inf"))
            causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p)
