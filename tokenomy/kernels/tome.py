"""ToMe for vision transformers: merge r tokens in every block, with proportional attention.

    handle = tome.patch(model, r=8)          # timm VisionTransformer, open_clip CLIP/VisionTransformer,
    logits = model(images)                   # transformers CLIPVisionModel / CLIPModel / CLIPVisionTransformer
    handle.state.tokens                      # tokens entering each block's merge in the last forward
    handle.state.source                      # [B, N0]: the output row each input token ended up in
    handle.unpatch()                         # or tome.unpatch(model), or `with tome.patch(model, r=8): ...`

Each block runs attention (with log(size) added to every key's logits once tokens carry sizes), then merges
r tokens by bipartite soft matching on the keys averaged over heads, then runs its MLP on the merged tokens
(specs/reducers.md §6, specs/generation.md §10.1). The prefix tokens (CLS, distillation token, registers) are
protected. ``r`` is an int for every block or one int per block; a block merges min(r, (N - protected) // 2)
tokens, the limit of facebookresearch/ToMe ``tome/merge.py::bipartite_soft_matching``, so a large r merges all it
can instead of failing, and r = 0 leaves the tokens untouched.

The merged tokens equal the official ToMe (``tome/patch/timm.py``) in value, size, source and order: with a class
token the kept tokens stay in position order; without one (timm ``class_token=False``, SigLIP-style towers) they
stay in descending-similarity order as ToMe leaves them, which changes which tokens later blocks pair up.
``bipartite_soft_matching`` builds that plan for callers of their own. Merging uses the dispatched kernels,
re-exported here: ``tome.match``, ``tome.merge``, ``tome.unmerge``, ``tome.unmerge_add`` (canonical order, r
checked, not clamped; see tokenomy/kernels/merge.py).

Outputs keep the model's own pooling: the CLS token stays first; average pooling averages merged tokens.

This patch is for a bare vision model (classification, retrieval throughput). Inside a VLM pipeline ToMe is the
`tome` reducer (tokenomy/reducers/tome.py), which merges between encoder layers through the encoder site with
the same matching and leaves the host model's blocks unpatched.
Attention masks are not supported inside patched blocks (ViTs pass none); a mask raises InputError.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Union

import torch

from tokenomy.errors import InputError
from tokenomy.kernels.dispatch import (MergePlan, attention, log_size_bias, match, merge, partition, unmerge,
                                       unmerge_add)
from tokenomy.kernels.merge import plan_from_scores

__all__ = ["MergePlan", "ToMePatch", "ToMeState", "attention", "bipartite_soft_matching", "log_size_bias", "match",
           "merge", "patch", "unmerge", "unmerge_add", "unpatch"]


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: Sequence[int] = (),
                            backend: Optional[str] = None) -> MergePlan:
    """The plan of facebookresearch/ToMe ``tome/merge.py::bipartite_soft_matching`` for ``metric`` [B, N, C].

    ``protected`` are the leading prefix tokens (ToMe: class token, then distillation token). r is clamped to
    (N - len(protected)) // 2; r <= 0 gives the identity plan (``merge`` returns the tokens as they are).
    Kept unprotected tokens follow ToMe's order: position order when a token is protected (ToMe sorts them
    to keep the class token first), descending best-match similarity when none is. Exact score ties may
    order differently from ToMe's unstable argsort.
    """
    metric = metric.contiguous()
    batch, n = metric.shape[0], metric.shape[1]
    a_idx, b_idx, n_protected = partition(n, protected, device=metric.device)
    mergeable = a_idx.numel() - n_protected if b_idx.numel() else 0
    r = min(int(r), (n - n_protected) // 2, mergeable)
    if r <= 0:
        return _identity_plan(batch, n, metric.device)
    plan = match(metric, r, protected, backend=backend)
    return plan if n_protected else _score_ordered(plan)


def _identity_plan(batch: int, n: int, device) -> MergePlan:
    # every position is a kept A row in position order and B is empty, so merge copies and unmerge gathers
    everything = torch.arange(n, device=device)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return plan_from_scores(n, 0, everything, empty, 0, torch.full((batch, n), float("-inf"), device=device),
                            torch.zeros(batch, n, dtype=torch.long, device=device))


def _score_ordered(plan: MergePlan) -> MergePlan:
    """The same merge with the kept A rows in descending-score order (ToMe without a class token)."""
    order = torch.sort(plan.node_max, dim=-1, descending=True, stable=True).indices[:, plan.r:]
    out_row = plan.out_row.clone()
    ranks = torch.arange(order.shape[1], device=order.device).expand_as(order)
    out_row.scatter_(1, plan.a_idx[order], ranks)
    return replace(plan, unm_idx=order, out_row=out_row)


@dataclass
class ToMeState:
    """What the patched blocks share during one forward pass."""

    schedule: List[int]
    protected: tuple
    prop_attn: bool = True
    trace_source: bool = True
    backend: Optional[str] = None
    size: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None
    tokens: List[int] = field(default_factory=list)

    def reset(self) -> None:
        self.size, self.source, self.tokens = None, None, []

    def attend(self, q, k, v, dropout_p: float) -> torch.Tensor:
        """Attention of one block; proportional (log-size bias, fused kernel on CUDA) once tokens carry sizes."""
        bias = log_size_bias(self.size) if self.prop_attn else None
        # without a bias PyTorch's FlashAttention is the fastest choice, and r=0 stays the stock computation
        return attention(q, k, v, bias, dropout_p=dropout_p, backend="torch" if bias is None else self.backend)

    def merge_step(self, block_index: int, x: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
        """Merge this block's r tokens of x (after attention, before the MLP); record the bookkeeping."""
        batch, n = x.shape[:2]
        self.tokens.append(n)
        if self.trace_source and self.source is None:
            self.source = torch.arange(n, device=x.device).expand(batch, n)
        if self.schedule[block_index] <= 0:
            return x
        plan = bipartite_soft_matching(metric, self.schedule[block_index], self.protected, self.backend)
        if plan.r == 0:
            return x
        # timm towers without a class token hand over x as a strided view of the patch embedding
        x, self.size = merge(x.contiguous(), plan, self.size, backend=self.backend)
        if self.trace_source:
            self.source = plan.out_row.gather(1, self.source)
        return x


class ToMePatch:
    """Handle of a patched model: ``unpatch()`` restores it; usable as a context manager."""

    def __init__(self, model: torch.nn.Module, blocks: Sequence[torch.nn.Module], state: ToMeState, block_forward):
        self.model, self.blocks, self.state = model, list(blocks), state
        for index, block in enumerate(self.blocks):
            block.forward = _bind(block_forward, block, state, index)
        self._reset_hook = self.blocks[0].register_forward_pre_hook(lambda module, args: state.reset())
        model._tokenomy_tome = self

    def unpatch(self) -> None:
        for block in self.blocks:
            if "forward" in block.__dict__:
                del block.forward  # the class's own forward is visible again
        self._reset_hook.remove()
        if getattr(self.model, "_tokenomy_tome", None) is self:
            del self.model._tokenomy_tome

    def __enter__(self) -> "ToMePatch":
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()


def _bind(block_forward, block, state, index):
    def forward(*args, **kwargs):
        return block_forward(block, state, index, *args, **kwargs)

    return forward


def patch(model: torch.nn.Module, r: Union[int, Sequence[int]], prop_attn: bool = True, trace_source: bool = True,
          backend: Optional[str] = None) -> ToMePatch:
    """Make every transformer block of ``model`` merge r tokens; returns the handle that undoes it."""
    unpatch(model)
    blocks, protected, block_forward = _find_blocks(model)
    schedule = [int(r)] * len(blocks) if isinstance(r, int) else [int(v) for v in r]
    if len(schedule) != len(blocks) or min(schedule) < 0:
        raise InputError(f"r must be a non-negative int or {len(blocks)} of them (one per block), got {r!r}")
    state = ToMeState(schedule, protected, prop_attn, trace_source, backend)
    return ToMePatch(model, blocks, state, block_forward)


def unpatch(model: torch.nn.Module) -> None:
    """Undo ``patch``; a model that is not patched is left as it is."""
    handle = getattr(model, "_tokenomy_tome", None)
    if handle is not None:
        handle.unpatch()


def _find_blocks(model):
    """(blocks, protected positions, block forward) for the supported hosts, or InputError."""
    kind = type(model).__module__.split(".")[0]
    if kind == "timm":
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        blocks = list(getattr(model, "blocks", []))
        if blocks and all(type(b) is Block and type(b.attn) is Attention for b in blocks):
            return blocks, tuple(range(getattr(model, "num_prefix_tokens", 1))), _timm_block_forward
    if kind == "open_clip":
        from open_clip.transformer import ResidualAttentionBlock

        visual = getattr(model, "visual", model)
        transformer = getattr(visual, "transformer", None)
        blocks = list(getattr(transformer, "resblocks", []))
        if blocks and transformer.batch_first and all(type(b) is ResidualAttentionBlock for b in blocks):
            return blocks, (0,), _open_clip_block_forward
    if kind == "transformers":
        from transformers.models.clip.modeling_clip import CLIPEncoderLayer

        vision = getattr(model, "vision_model", model)
        blocks = list(getattr(getattr(vision, "encoder", None), "layers", []))
        if blocks and all(type(b) is CLIPEncoderLayer for b in blocks):
            return blocks, (0,), _clip_layer_forward
    raise InputError(f"tome.patch supports timm VisionTransformer (plain Block/Attention), open_clip vision "
                     f"transformers with batch-first ResidualAttentionBlock, and transformers CLIP vision models; "
                     f"got {type(model).__module__}.{type(model).__name__}")


def _refuse_mask(*masks) -> None:
    if any(mask is not None and mask is not False for mask in masks):
        raise InputError("a ToMe-patched block got an attention mask, causal flag or cross-attention input; "
                         "merged tokens no longer match them")


def _timm_block_forward(block, state, index, x, attn_mask=None, is_causal=False):
    _refuse_mask(attn_mask, is_causal)
    attn = block.attn
    h = block.norm1(x)
    batch, n, _ = h.shape
    gate = attn.gate(h).sigmoid() if attn.gate is not None else None
    q, k, v = attn.qkv(h).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = state.attend(q, k, v, attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(batch, n, attn.attn_dim))
    if gate is not None:
        out = out * gate
    x = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
    x = state.merge_step(index, x, k.mean(1))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _open_clip_block_forward(block, state, index, q_x, k_x=None, v_x=None, attn_mask=None):
    _refuse_mask(attn_mask, k_x, v_x)
    mha = block.attn
    h = block.ln_1(q_x)
    batch, n, width = h.shape
    heads = mha.num_heads
    q, k, v = (t.reshape(batch, n, heads, width // heads).transpose(1, 2)
               for t in torch.nn.functional.linear(h, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1))
    out = state.attend(q, k, v, mha.dropout if mha.training else 0.0)
    x = q_x + block.ls_1(mha.out_proj(out.transpose(1, 2).reshape(batch, n, width)))
    x = state.merge_step(index, x, k.mean(1))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _clip_layer_forward(layer, state, index, hidden_states, attention_mask=None, *args, **kwargs):
    _refuse_mask(attention_mask)
    attn = layer.self_attn
    h = layer.layer_norm1(hidden_states)
    batch, n, width = h.shape
    q, k, v = (proj(h).view(batch, n, attn.num_heads, attn.head_dim).transpose(1, 2)
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    out = state.attend(q, k, v, attn.dropout if attn.training else 0.0)
    x = hidden_states + attn.out_proj(out.transpose(1, 2).reshape(batch, n, width))
    x = state.merge_step(index, x, k.mean(1))
    return x + layer.mlp(layer.layer_norm2(x))
