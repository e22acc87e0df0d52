"""Triton twin of :mod:`tokenomy.kernels.dpc_knn`: same function, same signature, same clusters.

Five launches, float32 inside whatever the storage dtype:
- ``_distance_kernel``: [B, N, N] distances from the differences, tiled over (rows, columns, channels).
- ``_density_kernel``: one program per token holds its distance row in SRAM and takes the k smallest by k rounds
  of min-extraction, in ascending order as the reference's sorted top-k sums them.
- ``_parent_kernel``: one program per token: nearest denser token (index tie-break as in the reference), delta,
  score.
- ``_assign_kernel``: per block of tokens, running argmin over the centres (strict, so the earlier centre wins).
- ``_merge_kernel``: one program per (cluster, channel block) sums its members through a CSR list in index order.
Choosing the centres (a sort of N scores per sample) and building the CSR lists stay in PyTorch. Rows live in SRAM:
N up to MAX_TOKENS; larger raises ShapeError. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenomy.errors import ShapeError
from tokenomy.kernels.dpc_knn import DPCResult, check_inputs, distance_scale, pick_centres

MAX_TOKENS = 16384


@triton.jit(do_not_specialize=["n"])
def _distance_kernel(x, dist, n, c, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    batch = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < n, cols < n
    base = x + batch * n * c
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for c0 in range(0, c, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        ch_ok = ch < c
        a = tl.load(base + rows[:, None] * c + ch[None, :], mask=row_ok[:, None] & ch_ok[None, :], other=0.0).to(tl.float32)
        b = tl.load(base + cols[:, None] * c + ch[None, :], mask=col_ok[:, None] & ch_ok[None, :], other=0.0).to(tl.float32)
        diff = a[:, None, :] - b[None, :, :]
        acc += tl.sum(diff * diff, axis=2)
    out = tl.sqrt_rn(acc) * scale
    tl.store(dist + batch * n * n + rows[:, None] * n + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["n", "k"])
def _density_kernel(dist, density, n, k, BLOCK_N: tl.constexpr):
    batch = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1)
    cols = tl.arange(0, BLOCK_N)
    values = tl.load(dist + batch * n * n + row * n + cols, mask=cols < n, other=float("inf"))
    total = 0.0
    for _ in range(0, k):
        smallest, at = tl.min(values, axis=0, return_indices=True, return_indices_tie_break_left=True)
        total += smallest * smallest
        values = tl.where(cols == at, float("inf"), values)
    tl.store(density + batch * n + row, tl.exp(-(total / k)))


@triton.jit(do_not_specialize=["n"])
def _parent_kernel(dist, density, dist_max, delta, parent, score, n, BLOCK_N: tl.constexpr):
    batch = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n
    rho = tl.load(density + batch * n + cols, mask=col_ok, other=float("-inf"))
    own = tl.load(density + batch * n + row)
    denser = col_ok & ((rho > own) | ((rho == own) & (cols < row)))
    values = tl.load(dist + batch * n * n + row * n + cols, mask=col_ok, other=float("inf"))
    values = tl.where(denser, values, float("inf"))
    nearest, at = tl.min(values, axis=0, return_indices=True, return_indices_tie_break_left=True)
    has_parent = tl.sum(denser.to(tl.int32), axis=0) > 0
    farthest = tl.load(dist_max + batch)
    nearest = tl.where(has_parent, nearest, farthest)
    tl.store(delta + batch * n + row, nearest)
    tl.store(parent + batch * n + row, tl.where(has_parent, at, -1).to(tl.int64))
    tl.store(score + batch * n + row, nearest * own)


@triton.jit(do_not_specialize=["n", "m"])
def _assign_kernel(dist, centres, centre_slot, assign, n, m, BLOCK_N: tl.constexpr):
    batch = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_slot = tl.zeros([BLOCK_N], tl.int64)
    for slot in range(0, m):
        centre = tl.load(centres + batch * m + slot)
        values = tl.load(dist + batch * n * n + centre * n + cols, mask=col_ok, other=float("inf"))
        closer = values < best
        best = tl.where(closer, values, best)
        best_slot = tl.where(closer, slot, best_slot)
    own = tl.load(centre_slot + batch * n + cols, mask=col_ok, other=-1)
    tl.store(assign + batch * n + cols, tl.where(own >= 0, own, best_slot), mask=col_ok)


@triton.jit(do_not_specialize=["n", "m"])
def _merge_kernel(x, members, start, count, merged, n, m, c, BLOCK_C: tl.constexpr):
    batch = tl.program_id(0).to(tl.int64)
    slot = tl.program_id(1)
    ch = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_ok = ch < c
    first = tl.load(start + batch * m + slot)
    size = tl.load(count + batch * m + slot)
    acc = tl.zeros([BLOCK_C], tl.float32)
    for i in range(0, size):
        token = tl.load(members + batch * n + first + i)
        acc += tl.load(x + (batch * n + token) * c + ch, mask=ch_ok, other=0.0).to(tl.float32)
    mean = acc / size.to(tl.float32)
    tl.store(merged + (batch * m + slot) * c + ch, mean.to(merged.dtype.element_ty), mask=ch_ok)


def dpc_knn(x: torch.Tensor, clusters: int, k: int = 5) -> DPCResult:
    check_inputs(x, clusters, k)
    if x.shape[1] > MAX_TOKENS:
        raise ShapeError(f"the Triton DPC-KNN holds a distance row in SRAM: N={x.shape[1]} > {MAX_TOKENS}; use backend='torch'")
    x = x.contiguous()
    batch, n, channels = x.shape
    device = x.device
    dist = torch.empty(batch, n, n, device=device, dtype=torch.float32)
    tile = 16
    _distance_kernel[(batch, triton.cdiv(n, tile), triton.cdiv(n, tile))](
        x, dist, n, channels, distance_scale(channels), BLOCK_M=tile, BLOCK_N=tile, BLOCK_C=16)
    row_block = triton.next_power_of_2(n)
    density = torch.empty(batch, n, device=device, dtype=torch.float32)
    _density_kernel[(batch, n)](dist, density, n, k, BLOCK_N=row_block)
    delta, score = torch.empty_like(density), torch.empty_like(density)
    parent = torch.empty(batch, n, device=device, dtype=torch.long)
    _parent_kernel[(batch, n)](dist, density, dist.flatten(1).amax(1), delta, parent, score, n, BLOCK_N=row_block)

    centres = pick_centres(score, clusters).contiguous()
    centre_slot = torch.full((batch, n), -1, device=device, dtype=torch.long)
    centre_slot.scatter_(1, centres, torch.arange(clusters, device=device).expand(batch, -1).contiguous())
    assign = torch.empty(batch, n, device=device, dtype=torch.long)
    block = 64
    _assign_kernel[(batch, triton.cdiv(n, block))](dist, centres, centre_slot, assign, n, clusters, BLOCK_N=block)

    members = torch.sort(assign, dim=1, stable=True).indices.contiguous()
    count = torch.zeros(batch, clusters, device=device, dtype=torch.long).scatter_add_(1, assign, torch.ones_like(assign))
    start = (count.cumsum(1) - count).contiguous()
    merged = torch.empty(batch, clusters, channels, device=device, dtype=x.dtype)
    channel_block = min(128, triton.next_power_of_2(channels))
    _merge_kernel[(batch, clusters, triton.cdiv(channels, channel_block))](
        x, members, start, count, merged, n, clusters, channels, BLOCK_C=channel_block)
    return DPCResult(centres, assign, merged, density, score, parent)
