"""Pruning visual tokens inside the LLM during prefill (FastV-style), with decoding kept consistent.

The decoder loop hands one (cos, sin), one mask and one position tensor to every layer, so shortening the sequence
after layer K-1 needs a pre-hook on every layer >= K: layer K gathers the hidden states, and every such layer gets
(cos, sin), position ids and the mask sliced the same way. Those layers then cache L' keys instead of L; layers < K
keep the full cache. During decoding the mask built for the full length is gathered down to the kept key columns.

The score row (last prompt token over all keys at layer K-1) is recomputed from that layer's own q/k projections
and rotary embedding, so SDPA/FlashAttention stay on.
"""
from __future__ import annotations

import torch

from tokenomy.errors import InputError
from tokenomy.reducers.base import LAST_TEXT_ATTENTION, ImageTokens


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def last_token_attention(attn, normed_hidden, cos, sin, key_mask):
    """Head-averaged softmax row of the last position's query over all keys: [B, L] in fp32."""
    batch, length, _ = normed_hidden.shape
    head_dim = attn.head_dim
    query = attn.q_proj(normed_hidden[:, -1:]).view(batch, 1, -1, head_dim).transpose(1, 2)
    keys = attn.k_proj(normed_hidden).view(batch, length, -1, head_dim).transpose(1, 2)
    if getattr(attn, "q_norm", None) is not None:
        query, keys = attn.q_norm(query), attn.k_norm(keys)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    query = query * cos[:, :, -1:] + rotate_half(query) * sin[:, :, -1:]
    keys = keys * cos + rotate_half(keys) * sin
    keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
    logits = torch.einsum("bhqd,bhkd->bhk", query.float(), keys.float()) * attn.scaling
    logits = logits.masked_fill(~key_mask[:, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


class InLLMReduction:
    """Context manager that installs the hooks for one prefill + decode of one batch."""

    def __init__(self, decoder_layers, reducer, llm_inputs):
        self.layers = decoder_layers
        self.reducer = reducer
        self.inputs = llm_inputs
        self.layer = reducer.llm_layer
        if not 1 <= self.layer < len(decoder_layers):
            raise InputError(f"{reducer.name} layer {self.layer} must be in 1..{len(decoder_layers) - 1} for this {len(decoder_layers)}-layer LLM")
        self.handles = []
        self.scores = None
        self.keep_index = None  # [B, L'] sequence indices kept for layers >= K
        self.slot_valid = None  # [B, L'] False where a row is padding (original or added for ragged keeps)
        self.prefill_length = None
        self.selections = None  # per sample, per image: Selection over the image's visual tokens
        self.decoded = 0  # tokens decoded so far (keys after the prefill)

    def __enter__(self):
        score_attn = self.layers[self.layer - 1].self_attn
        self.handles.append(score_attn.register_forward_pre_hook(self._capture_scores, with_kwargs=True))
        for index in range(self.layer, len(self.layers)):
            self.handles.append(self.layers[index].register_forward_pre_hook(self._make_layer_hook(index), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    # ---- prefill --------------------------------------------------------------------------------------------------
    def _capture_scores(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if self.scores is not None or hidden.shape[1] == 1:
            return None
        cos, sin = kwargs["position_embeddings"]
        key_mask = self.inputs.attention_mask.bool().to(hidden.device)
        self.scores = last_token_attention(module, hidden, cos, sin, key_mask)
        return None

    def _select(self, hidden):
        batch, length = hidden.shape[:2]
        keeps, self.selections = [], []
        for sample in range(batch):
            drop = torch.zeros(length, dtype=torch.bool, device=hidden.device)
            sample_selections = []
            for slots in self.inputs.visual_slots[sample]:
                slots = slots.to(hidden.device)
                image = ImageTokens(
                    features=hidden[sample, slots],
                    positions=torch.zeros(len(slots), 3, dtype=torch.long, device=hidden.device),
                    signals={LAST_TEXT_ATTENTION: self.scores[sample, slots]},
                )
                selection = self.reducer.select(image)
                if selection.merge_index is not None:
                    raise InputError(f"{self.reducer.name}: merging inside the LLM is not supported by this hook")
                sample_selections.append(selection)
                dropped = torch.ones(len(slots), dtype=torch.bool, device=hidden.device)
                dropped[selection.kept] = False
                drop[slots[dropped]] = True
            self.selections.append(sample_selections)
            keeps.append(torch.nonzero(~drop).squeeze(1))
        longest = max(len(keep) for keep in keeps)
        self.keep_index = torch.zeros(batch, longest, dtype=torch.long, device=hidden.device)
        self.slot_valid = torch.zeros(batch, longest, dtype=torch.bool, device=hidden.device)
        padding = self.inputs.attention_mask.bool().to(hidden.device)
        for sample, keep in enumerate(keeps):
            pad = longest - len(keep)
            self.keep_index[sample, pad:] = keep
            self.slot_valid[sample, pad:] = padding[sample, keep]
        self.prefill_length = length

    def _gather_seq(self, tensor, dim):
        """Gather `tensor` along its sequence dim `dim` with keep_index; the batch dim is the one before it."""
        index = self.keep_index
        tensor = tensor.expand(*tensor.shape[: dim - 1], index.shape[0], *tensor.shape[dim:])
        shape = [1] * tensor.dim()
        shape[dim - 1], shape[dim] = index.shape
        index = index.view(shape).expand(*tensor.shape[:dim], index.shape[1], *tensor.shape[dim + 1 :])
        return torch.gather(tensor, dim, index)

    def _gather_keys(self, mask):
        """Gather the key columns [B, 1, q, L] of a 4-D mask down to the kept keys [B, 1, q, L']."""
        mask = mask.expand(self.keep_index.shape[0], *mask.shape[1:])
        index = self.keep_index[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1)
        return torch.gather(mask, 3, index)

    def _prefill_mask(self, mask, device):
        batch, length = self.keep_index.shape
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        allowed = causal[None] & self.slot_valid[:, None, :]
        # A padding row attends to itself only, so softmax never sees an empty row (its output is never read).
        allowed |= torch.eye(length, dtype=torch.bool, device=device)[None] & ~self.slot_valid[:, :, None]
        if mask is None:
            return allowed[:, None] if not bool(self.slot_valid.all()) else None
        if mask.dim() == 2:  # FlashAttention's 2-D padding mask
            return self.slot_valid.to(mask.dtype)
        if mask.dtype == torch.bool:
            return allowed[:, None]
        return torch.zeros(allowed.shape, dtype=mask.dtype, device=device).masked_fill(~allowed, torch.finfo(mask.dtype).min)[:, None]

    def _decode_mask(self, mask, new_tokens):
        """Gather the full-length decode mask [B, 1, q, L + t] down to the kept keys [B, 1, q, L' + t]."""
        if mask is None:
            if bool(self.slot_valid.all()):
                return None
            steps = torch.ones(self.slot_valid.shape[0], self.decoded, dtype=torch.bool, device=self.slot_valid.device)
            keys = torch.cat([self.slot_valid, steps], dim=1)
            return keys[:, None, None, :].expand(-1, 1, new_tokens, -1)
        if mask.dim() == 2:
            return torch.cat([self.slot_valid.to(mask.dtype), mask[:, self.prefill_length :]], dim=1)
        prefix = self._gather_keys(mask[..., : self.prefill_length])
        if mask.dtype == torch.bool:
            prefix = prefix & self.slot_valid[:, None, None, :]
        else:
            prefix = prefix.masked_fill(~self.slot_valid[:, None, None, :], torch.finfo(mask.dtype).min)
        rest = mask[..., self.prefill_length :].expand(prefix.shape[0], -1, -1, -1)
        return torch.cat([prefix, rest], dim=-1)

    def _make_layer_hook(self, index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            if self.keep_index is None:
                if self.scores is None:
                    raise RuntimeError("in-LLM reduction: the score layer did not run before the pruning layer")
                self._select(hidden)
            in_prefill = cos.shape[-2] == self.prefill_length
            if in_prefill:
                if index == self.layer:
                    hidden = self._gather_seq(hidden, 1)
                kwargs["position_embeddings"] = (self._gather_seq(cos, 1), self._gather_seq(sin, 1))
                position_ids = kwargs.get("position_ids")
                if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] == self.prefill_length:
                    position_ids = position_ids.expand(*position_ids.shape[:-2], hidden.shape[0], -1)
                    kwargs["position_ids"] = self._gather_seq(position_ids, position_ids.dim() - 1)
                kwargs["attention_mask"] = self._prefill_mask(kwargs.get("attention_mask"), hidden.device)
            else:
                if index == self.layer:
                    self.decoded += hidden.shape[1]
                kwargs["attention_mask"] = self._decode_mask(kwargs.get("attention_mask"), hidden.shape[1])
            if args:
                args = (hidden,) + tuple(args[1:])
            else:
                kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook
