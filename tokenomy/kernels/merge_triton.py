"""Fused Triton twin of :mod:`tokenomy.kernels.merge`: same functions, same signatures, same results.

A merge is four launches (specs/generation.md §10.3):
- K1 ``_match_kernel``: cosine similarity + per-row max/argmax, tiled over B rows and channels, so the
  N_a×N_b score matrix never reaches memory; ties keep the first (lowest) B row, as ``argmax`` does.
  The inverse norms come from ``_inv_norm_kernel`` (one read of the metric into a [B, N] float32 buffer).
- K2 ``_select_kernel``: one program per sample sorts 64-bit keys (score, A position) in SRAM, takes the
  r best rows, and writes every map of the plan (kept rows, src rows grouped by destination, CSR offsets,
  the unmerge map) with prefix sums; no argsort/gather/scatter chain.
- K3 ``_merge_kernel``: one program per output row walks its CSR list in a fixed order, so the
  size-weighted mean is deterministic; each input row is read once, each output row written once.
Unmerge is K5 ``_unmerge_kernel``: a gather through the unmerge map, fused with the residual add.
Proportional attention is K4 ``_attention_kernel``: flash attention (online softmax) that adds the float32
log-size bias of each key tile to the logits, so no [B, 1, 1, N] float mask knocks PyTorch off FlashAttention.
It covers non-causal, dropout-free fp16/bf16 calls with power-of-two head dims in 16..256
(``attention_supported``); the dispatcher sends everything else to PyTorch.

Arithmetic is float32 inside every kernel whatever the storage dtype. Under ``TRITON_INTERPRET=1`` the
kernels run on CPU tensors (the tests use that); block sizes are fixed (no autotuning), so the interpreter
and the GPU run the same programs. K2 holds one sample's A set in SRAM: N_a up to 16384 (N = 32768 with the
alternate partition); larger sets raise ShapeError.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from tokenomy.errors import ShapeError
from tokenomy.kernels.merge import (NORM_EPS, MergePlan, check_attention_inputs, check_merge_inputs, check_metric,
                                    check_unmerge_inputs, partition)

MAX_SELECT = 16384


# token counts that may equal 1 must not be specialised into constants (the kernels use them in tensor
# arithmetic); channel counts and strides stay specialisable, so a multiple of 16 gives aligned vector loads
@triton.jit(do_not_specialize=["rows"])
def _inv_norm_kernel(metric, inv_norm, rows, c, eps, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < rows
    squares = tl.zeros([BLOCK_T], tl.float32)
    for c0 in range(0, c, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        m = tl.load(metric + tok[:, None] * c + ch[None, :], mask=tok_ok[:, None] & (ch < c)[None, :], other=0.0)
        m = m.to(tl.float32)
        squares += tl.sum(m * m, axis=1)
    tl.store(inv_norm + tok, 1.0 / tl.maximum(tl.sqrt(squares), eps), mask=tok_ok)


@triton.jit(do_not_specialize=["n_a", "n_b", "n", "n_protected"])
def _match_kernel(metric, inv_norm, a_idx, b_idx, node_max, node_idx, n_a, n_b, n, c, n_protected,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr,
                  UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    batch = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_a
    # offsets inside one sample fit in 32 bits (N·C < 2^31 is checked by the host); 64-bit offsets spill
    a_tok = tl.load(a_idx + rows, mask=row_ok, other=0).to(tl.int32)
    base = metric + batch * n * c
    chans = tl.arange(0, BLOCK_C)
    a_ptrs = base + a_tok[:, None] * c + chans[None, :]
    # norms come precomputed: squaring tiles here would put CUDA-core work beside every tensor-core dot
    inv_a = tl.load(inv_norm + batch * n + a_tok, mask=row_ok, other=0.0)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_M], tl.int32)
    dots = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # one flat loop over (B tile, channel block) with the row-max epilogue inside: Triton software-pipelines
    # the loads of a single loop, not of the inner loop of a nest
    c_blocks = tl.cdiv(c, BLOCK_C)
    for step in range(0, tl.cdiv(n_b, BLOCK_N) * c_blocks):
        j0 = (step // c_blocks) * BLOCK_N
        c0 = (step % c_blocks) * BLOCK_C
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_b
        b_tok = tl.load(b_idx + cols, mask=col_ok, other=0).to(tl.int32)
        b_ptrs = base + b_tok[:, None] * c + chans[None, :]
        if EVEN_C:
            a = tl.load(a_ptrs + c0, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs + c0, mask=col_ok[:, None], other=0.0)
        else:
            ch_ok = (c0 + chans) < c
            a = tl.load(a_ptrs + c0, mask=row_ok[:, None] & ch_ok[None, :], other=0.0)
            b = tl.load(b_ptrs + c0, mask=col_ok[:, None] & ch_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        dots = tl.dot(a, tl.trans(b), dots, input_precision=DOT_PRECISION)
        if step % c_blocks == c_blocks - 1:
            inv_b = tl.load(inv_norm + batch * n + b_tok, mask=col_ok, other=0.0)
            scores = dots * inv_a[:, None] * inv_b[None, :]
            scores = tl.where(col_ok[None, :], scores, float("-inf"))
            tile_max, tile_arg = tl.max(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
            better = tile_max > best  # strict: an equal score in a later tile keeps the earlier B row
            best = tl.where(better, tile_max, best)
            best_idx = tl.where(better, j0 + tile_arg, best_idx)
            dots = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    best = tl.where(rows < n_protected, float("-inf"), best)
    best_idx = tl.where(rows < n_protected, 0, best_idx)
    out = batch * n_a + rows
    tl.store(node_max + out, best, mask=row_ok)
    tl.store(node_idx + out, best_idx.to(tl.int64), mask=row_ok)


@triton.jit(do_not_specialize=["n_a", "n_b", "n", "r"])
def _select_kernel(node_max, node_idx, a_idx, b_idx, unm_idx, src_idx, dst_start, dst_count, out_row,
                   n_a, n_b, n, r, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    batch = tl.program_id(0).to(tl.int64)
    pos = tl.arange(0, BLOCK_A)
    valid = pos < n_a
    score = tl.load(node_max + batch * n_a + pos, mask=valid, other=float("-inf"))
    # order-preserving integer image of -score (0.0 - score also turns -0.0 into +0.0); the low 32 bits hold
    # the A position, so one ascending sort ranks by descending score with ties to the lower position
    bits = (0.0 - score).to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = (ordered.to(tl.int64) << 32) | pos.to(tl.int64)
    sorted_key = tl.sort(key)
    threshold = tl.sum(tl.where(pos == r - 1, sorted_key, 0), axis=0)
    is_src = valid & (key <= threshold) & (r > 0)
    keep = valid & ~is_src
    n_unm = n_a - r
    unm_pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(unm_idx + batch * n_unm + unm_pos, pos.to(tl.int64), mask=keep)
    dst = tl.load(node_idx + batch * n_a + pos, mask=valid, other=0)
    a_tok = tl.load(a_idx + pos, mask=valid, other=0)
    row = tl.where(keep, unm_pos.to(tl.int64), n_unm + dst)
    tl.store(out_row + batch * n + a_tok, row, mask=valid)
    cols = tl.arange(0, BLOCK_B)
    col_ok = cols < n_b
    b_tok = tl.load(b_idx + cols, mask=col_ok, other=0)
    tl.store(out_row + batch * n + b_tok, n_unm + cols.to(tl.int64), mask=col_ok)
    # src rows grouped by destination, ascending A position inside a group: the merge's summation order
    pos64 = pos.to(tl.int64)
    past_every_dst = (pos64 * 0 + n_b) << 32
    group_key = tl.where(is_src, (dst << 32) | pos64, past_every_dst | pos64)
    grouped = tl.sort(group_key)
    tl.store(src_idx + batch * r + pos, grouped & 0xFFFFFFFF, mask=pos < r)
    count = tl.histogram(dst.to(tl.int32), BLOCK_B, mask=is_src).to(tl.int64)
    start = tl.cumsum(count, axis=0) - count
    tl.store(dst_count + batch * n_b + cols, count, mask=col_ok)
    tl.store(dst_start + batch * n_b + cols, start, mask=col_ok)


@triton.jit
def _size_of(size, offset, HAS_SIZE: tl.constexpr):
    if HAS_SIZE:
        return tl.load(size + offset)
    else:
        return tl.full([], 1.0, tl.float32)


@triton.jit(do_not_specialize=["n", "n_a", "n_b", "r"])
def _merge_kernel(x, size, y, size_y, a_idx, b_idx, unm_idx, src_idx, dst_start, dst_count, n, n_a, n_b, r, d,
                  HAS_SIZE: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    n_unm = n_a - r
    n_out = n - r
    x_base = x + batch * n * d
    y_row = y + (batch * n_out + row) * d
    if row < n_unm:
        tok = tl.load(a_idx + tl.load(unm_idx + batch * n_unm + row))
        weight = _size_of(size, batch * n + tok, HAS_SIZE)
        for c0 in range(0, d, BLOCK_D):
            ch = c0 + tl.arange(0, BLOCK_D)
            value = tl.load(x_base + tok * d + ch, mask=ch < d)
            tl.store(y_row + ch, value, mask=ch < d)
        tl.store(size_y + batch * n_out + row, weight)
    else:
        j = row - n_unm
        tok = tl.load(b_idx + j)
        start = tl.load(dst_start + batch * n_b + j)
        count = tl.load(dst_count + batch * n_b + j)
        own = _size_of(size, batch * n + tok, HAS_SIZE)
        total_size = own
        for k in range(0, count):
            src_tok = tl.load(a_idx + tl.load(src_idx + batch * r + start + k))
            total_size += _size_of(size, batch * n + src_tok, HAS_SIZE)
        for c0 in range(0, d, BLOCK_D):
            ch = c0 + tl.arange(0, BLOCK_D)
            ch_ok = ch < d
            acc = own * tl.load(x_base + tok * d + ch, mask=ch_ok, other=0.0).to(tl.float32)
            for k in range(0, count):
                src_tok = tl.load(a_idx + tl.load(src_idx + batch * r + start + k))
                weight = _size_of(size, batch * n + src_tok, HAS_SIZE)
                acc += weight * tl.load(x_base + src_tok * d + ch, mask=ch_ok, other=0.0).to(tl.float32)
            tl.store(y_row + ch, (acc / total_size).to(y.dtype.element_ty), mask=ch_ok)
        tl.store(size_y + batch * n_out + row, total_size)


@triton.jit(do_not_specialize=["n", "n_out"])
def _unmerge_kernel(y, residual, out, out_row, n, n_out, d, HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    src = tl.load(out_row + batch * n + tok)
    y_row = y + (batch * n_out + src) * d
    out_offset = (batch * n + tok) * d
    for c0 in range(0, d, BLOCK_D):
        ch = c0 + tl.arange(0, BLOCK_D)
        ch_ok = ch < d
        value = tl.load(y_row + ch, mask=ch_ok, other=0.0)
        if HAS_RESIDUAL:
            value = value.to(tl.float32) + tl.load(residual + out_offset + ch, mask=ch_ok, other=0.0).to(tl.float32)
        tl.store(out + out_offset + ch, value.to(out.dtype.element_ty), mask=ch_ok)


@triton.jit(do_not_specialize=["n_q", "n_kv", "heads"])
def _attention_kernel(q, k, v, bias, out, n_q, n_kv, heads, scale,
                      sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                      HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(1).to(tl.int64)
    batch = pid_bh // heads
    head = pid_bh % heads
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_q
    dims = tl.arange(0, HEAD_DIM)
    q_tile = tl.load(q + batch * sq_b + head * sq_h + rows[:, None] * sq_n + dims[None, :], mask=row_ok[:, None],
                     other=0.0)
    if UPCAST:
        q_tile = q_tile.to(tl.float32)
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for j0 in range(0, n_kv, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_kv
        k_tile = tl.load(k + batch * sk_b + head * sk_h + cols[:, None] * sk_n + dims[None, :], mask=col_ok[:, None],
                         other=0.0)
        v_tile = tl.load(v + batch * sv_b + head * sv_h + cols[:, None] * sv_n + dims[None, :], mask=col_ok[:, None],
                         other=0.0)
        if UPCAST:
            k_tile = k_tile.to(tl.float32)
            v_tile = v_tile.to(tl.float32)
        logits = tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PRECISION) * scale
        if HAS_BIAS:
            logits += tl.load(bias + batch * n_kv + cols, mask=col_ok, other=0.0)[None, :]
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        weights = tl.exp(logits - new_max[:, None])
        rescale = tl.exp(running_max - new_max)
        running_sum = running_sum * rescale + tl.sum(weights, axis=1)
        acc = acc * rescale[:, None] + tl.dot(weights.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION)
        running_max = new_max
    result = acc / running_sum[:, None]
    out_rows = out + (pid_bh * n_q + rows[:, None]) * HEAD_DIM + dims[None, :]
    tl.store(out_rows, result.to(out.dtype.element_ty), mask=row_ok[:, None])


def _interpreting() -> bool:
    return triton.knobs.runtime.interpret


def _check_device(t: torch.Tensor) -> None:
    if not t.is_cuda and not _interpreting():
        raise ShapeError(f"the Triton merge kernels need CUDA tensors (got {t.device}); use the torch backend "
                         "or set TRITON_INTERPRET=1 before tokenomy.kernels.merge_triton is imported")


def _match_config(batch: int, n_a: int):
    """(BLOCK_M, BLOCK_N, BLOCK_C, num_warps): fixed choices, no autotuning (the interpreter cannot run it)."""
    if _interpreting():
        return 64, 64, 32, 4
    if batch * n_a >= 128 * 128:  # enough row tiles to fill the GPU with large tiles
        return 128, 128, 64, 8
    return 64, 64, 64, 4


def _block_d(d: int) -> int:
    return min(1024, triton.next_power_of_2(d))


def match(metric: torch.Tensor, r: int, protected: Optional[Sequence[int]] = (), mode: str = "alternate", hw=None,
          stride=(2, 2), k: int = 2, generator: Optional[torch.Generator] = None) -> MergePlan:
    """Fused twin of :func:`tokenomy.kernels.merge.match` (K1 + K2)."""
    batch, n = metric.shape[:2] if metric.dim() == 3 else (0, 0)
    a_idx, b_idx, n_protected = partition(n, protected, mode, hw, stride, k, generator, metric.device)
    n_a, n_b = a_idx.numel(), b_idx.numel()
    check_metric(metric, r, n_a, n_b, n_protected)
    _check_device(metric)
    if n * metric.shape[2] >= 2 ** 31:
        raise ShapeError(f"one sample of the metric has N·C = {n * metric.shape[2]} elements, past the 32-bit "
                         "offsets of the Triton kernels; use the torch backend")
    if n_a > MAX_SELECT or n_b > MAX_SELECT:
        raise ShapeError(f"the Triton selection holds one sample's sets in SRAM: N_a={n_a}, N_b={n_b} exceed "
                         f"{MAX_SELECT}; use the torch backend")
    c = metric.shape[2]
    device = metric.device
    node_max = torch.empty(batch, n_a, dtype=torch.float32, device=device)
    node_idx = torch.empty(batch, n_a, dtype=torch.long, device=device)
    if n_b == 0:
        node_max.fill_(float("-inf"))
        node_idx.zero_()
    elif n_a > 0:
        inv_norm = torch.empty(batch, n, dtype=torch.float32, device=device)
        _inv_norm_kernel[(triton.cdiv(batch * n, 32),)](metric, inv_norm, batch * n, c, NORM_EPS, BLOCK_T=32,
                                                         BLOCK_C=min(256, triton.next_power_of_2(c)))
        # the interpreter runs numpy, which has no bfloat16 matmul: upcast tiles there and for fp32 inputs
        upcast = _interpreting() or metric.dtype == torch.float32
        block_m, block_n, block_c, warps = _match_config(batch, n_a)
        _match_kernel[(batch, triton.cdiv(n_a, block_m))](
            metric, inv_norm, a_idx, b_idx, node_max, node_idx, n_a, n_b, n, c, n_protected,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c, EVEN_C=c % block_c == 0, UPCAST=upcast,
            DOT_PRECISION="ieee" if upcast else "tf32", num_warps=warps, num_stages=3)
    unm_idx = torch.empty(batch, n_a - r, dtype=torch.long, device=device)
    src_idx = torch.empty(batch, r, dtype=torch.long, device=device)
    dst_start = torch.empty(batch, n_b, dtype=torch.long, device=device)
    dst_count = torch.empty(batch, n_b, dtype=torch.long, device=device)
    out_row = torch.empty(batch, n, dtype=torch.long, device=device)
    if batch > 0 and n > 0:
        block_a = max(16, triton.next_power_of_2(n_a))
        block_b = max(16, triton.next_power_of_2(n_b))
        _select_kernel[(batch,)](node_max, node_idx, a_idx, b_idx, unm_idx, src_idx, dst_start, dst_count, out_row,
                                 n_a, n_b, n, r, BLOCK_A=block_a, BLOCK_B=block_b,
                                 num_warps=4 if block_a < 1024 else 8 if block_a < 8192 else 16)
    return MergePlan(n, r, a_idx, b_idx, n_protected, node_max, node_idx, unm_idx, src_idx, dst_start, dst_count,
                     out_row)


def merge(x: torch.Tensor, plan: MergePlan, size: Optional[torch.Tensor] = None):
    """Fused twin of :func:`tokenomy.kernels.merge.merge` (K3)."""
    check_merge_inputs(x, plan, size)
    _check_device(x)
    batch, n, d = x.shape
    y = torch.empty(batch, plan.n_out, d, dtype=x.dtype, device=x.device)
    size_y = torch.empty(batch, plan.n_out, dtype=torch.float32, device=x.device)
    if batch > 0 and plan.n_out > 0 and d > 0:
        _merge_kernel[(plan.n_out, batch)](x, x if size is None else size, y, size_y, plan.a_idx, plan.b_idx,
                                           plan.unm_idx, plan.src_idx, plan.dst_start, plan.dst_count, n,
                                           plan.a_idx.numel(), plan.b_idx.numel(), plan.r, d,
                                           HAS_SIZE=size is not None, BLOCK_D=_block_d(d))
    return y, size_y


def _unmerge(y: torch.Tensor, plan: MergePlan, residual: Optional[torch.Tensor]) -> torch.Tensor:
    check_unmerge_inputs(y, plan, residual)
    _check_device(y)
    batch, n_out, d = y.shape
    out = torch.empty(batch, plan.n, d, dtype=y.dtype, device=y.device)
    if batch > 0 and plan.n > 0 and d > 0:
        _unmerge_kernel[(plan.n, batch)](y, y if residual is None else residual, out, plan.out_row, plan.n, n_out, d,
                                         HAS_RESIDUAL=residual is not None, BLOCK_D=_block_d(d))
    return out


def unmerge(y: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Fused twin of :func:`tokenomy.kernels.merge.unmerge` (K5 without the residual)."""
    return _unmerge(y, plan, None)


def unmerge_add(y: torch.Tensor, plan: MergePlan, residual: torch.Tensor) -> torch.Tensor:
    """Fused twin of :func:`tokenomy.kernels.merge.unmerge_add` (K5): one gather, one residual read, one write."""
    return _unmerge(y, plan, residual)


def attention_supported(q: torch.Tensor, causal: bool = False, dropout_p: float = 0.0) -> bool:
    """Whether K4 covers this call: non-causal, no dropout, head dim a power of two in 16..256, half precision.

    float32 runs only in the interpreter (for the parity tests): exact fp32 dots spill registers on sm_90, and
    PyTorch's fp32 attention is the better choice there.
    """
    head_dim = q.shape[-1]
    precision_ok = q.dtype in (torch.float16, torch.bfloat16) or _interpreting()
    return (precision_ok and not causal and dropout_p == 0.0 and 16 <= head_dim <= 256
            and head_dim & (head_dim - 1) == 0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_log_size: Optional[torch.Tensor] = None,
              causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """Fused twin of :func:`tokenomy.kernels.merge.attention` (K4): flash attention with a float32 per-key bias.

    Only what ``attention_supported`` allows; the dispatcher sends the rest to the reference.
    """
    check_attention_inputs(q, k, v, key_log_size)
    _check_device(q)
    if not attention_supported(q, causal, dropout_p):
        raise ShapeError(f"the Triton attention takes non-causal, dropout-free fp16/bf16 calls with a power-of-two "
                         f"head dim in 16..256; got {q.dtype}, head dim {q.shape[-1]}, causal={causal}, "
                         f"dropout_p={dropout_p}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ShapeError("q, k and v need a contiguous last dimension")
    if key_log_size is not None and (key_log_size.dtype != torch.float32 or not key_log_size.is_contiguous()):
        raise ShapeError(f"key_log_size must be contiguous float32, got {key_log_size.dtype}")
    batch, heads, n_q, head_dim = q.shape
    n_kv = k.shape[2]
    out = torch.empty(batch, heads, n_q, head_dim, dtype=q.dtype, device=q.device)
    upcast = _interpreting() or q.dtype == torch.float32
    block = 32 if _interpreting() else 64
    _attention_kernel[(triton.cdiv(n_q, block), batch * heads)](
        q, k, v, q if key_log_size is None else key_log_size, out, n_q, n_kv, heads, head_dim ** -0.5,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        HAS_BIAS=key_log_size is not None, UPCAST=upcast, DOT_PRECISION="ieee" if upcast else "tf32",
        HEAD_DIM=head_dim, BLOCK_M=block, BLOCK_N=block,
        num_warps=4 if head_dim <= 64 else 8)
    return out
