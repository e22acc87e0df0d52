"""The LLM site: pruning or merging visual tokens at any set of decoder layers during prefill, decoding kept exact.

The decoder loop hands one (cos, sin), one mask and one position tensor to every layer, so a pre-hook on every layer
lays out what that layer reads: the tokens still alive at that layer (in original order, left-padded per sample), the
matching rows of (cos, sin) and position ids, and a mask built for exactly those tokens. At a step layer the hidden
states are gathered (and merged rows averaged) from the previous layer's layout. Each layer caches the keys of the
tokens it saw; a step that cuts caches also removes its dropped tokens from the caches of the layers before it. During
decoding every layer's mask is gathered down to its own cached keys.

Signals (the last prompt token's attention row, ...) are recomputed at layer-1 from that layer's own q/k/v projections
and rotary embedding, so SDPA/FlashAttention stay on. Under the multi position policy a forward hook on the rotary
embedding hands the tokens' several positions to the plan's rotary.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenomy.errors import InputError
from tokenomy.ops.attention import apply_rotary
from tokenomy.reducers.base import (
    FINAL_NORM,
    LAST_TEXT_ATTENTION,
    LAST_TEXT_ATTENTION_AFTER,
    LAST_TEXT_VALUE_SIMILARITY,
    LLM_KEYS,
    LLM_VALUES,
    MEAN_TEXT_ATTENTION,
    STEP_LAYER_LAST_TEXT_ATTENTION,
    TEXT_FEATURES,
    TEXT_LLM_KEYS,
    ImageTokens,
)
from tokenomy.vlm.sites import Timed, select_checked


def attention_qkv(attn, normed_hidden, cos, sin):
    """The layer's q, k, v as its attention computes them: [B, H, L, d] each, rotary applied, GQA repeated."""
    batch, length, _ = normed_hidden.shape
    head_dim = attn.head_dim
    query = attn.q_proj(normed_hidden).view(batch, length, -1, head_dim).transpose(1, 2)
    keys = attn.k_proj(normed_hidden).view(batch, length, -1, head_dim).transpose(1, 2)
    values = attn.v_proj(normed_hidden).view(batch, length, -1, head_dim).transpose(1, 2)
    if getattr(attn, "q_norm", None) is not None:
        query, keys = attn.q_norm(query), attn.k_norm(keys)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    query, keys = apply_rotary(query, cos, sin), apply_rotary(keys, cos, sin)
    repeat = query.shape[1] // keys.shape[1]
    return query.float(), keys.repeat_interleave(repeat, dim=1).float(), values.repeat_interleave(repeat, dim=1).float()


@dataclass
class Step:
    layer: int
    stage: object
    record: object
    signals: tuple = ()


@dataclass
class _Sample:
    """One sample's live tokens: original sequence indices (ascending), and its images' tokens."""

    alive: torch.Tensor  # [n] original sequence indices of the tokens alive at the current layer
    images: list  # per image: dict(slots=LongTensor of original indices, positions=tensor, index=global image index)
    cut: set = field(default_factory=set)  # original indices removed from earlier layers' caches


def _padded(rows: list, device, fill: int = -1) -> torch.Tensor:
    """Left-pad 1-D LongTensors into [B, max_len] with `fill`."""
    longest = max((len(row) for row in rows), default=0)
    out = torch.full((len(rows), longest), fill, dtype=torch.long, device=device)
    for index, row in enumerate(rows):
        if len(row):
            out[index, longest - len(row) :] = row.to(device)
    return out


def _positions_in(layout: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """For one sample: where each original index of `wanted` sits in `layout` (a padded row of original indices)."""
    if wanted.numel() == 0:  # an image a stage removed whole (SEATS Stage III)
        return wanted.to(device=layout.device, dtype=torch.long)
    lookup = torch.full((int(max(layout.max(), wanted.max())) + 1,), -1, dtype=torch.long, device=layout.device)
    valid = layout >= 0
    lookup[layout[valid]] = torch.nonzero(valid).squeeze(1)
    found = lookup[wanted.to(layout.device)]
    if bool((found < 0).any()):
        raise RuntimeError("LLM-site bookkeeping: a token is missing from the layout it should be in")
    return found


class LLMRun:
    """Context manager that installs the LLM-site hooks for one prefill + decode of one batch.

    steps: Steps sorted by layer (stage order within a layer). replay: the `record()` of an earlier run over the same
    prompt; its selections are reused and its tokens after the prompt are decoded tokens (a no-cache recompute).
    """

    def __init__(self, adapter, steps: list, inputs, multi_rotary=None, replay=None):
        self.adapter, self.steps, self.inputs = adapter, steps, inputs
        self.layers = adapter.decoder_layers
        self.num_layers = len(self.layers)
        for step in steps:
            if not 1 <= step.layer < self.num_layers:
                raise InputError(f"{step.stage.name} acts before LLM layer {step.layer}, which must be in 1..{self.num_layers - 1}")
        self.multi_rotary = multi_rotary
        self.replay = replay
        self.prompt_length = inputs.attention_mask.shape[1]
        self.handles, self.calls = [], 0
        self.selections = {}  # (step index, sample, image) -> Selection
        self.visual_per_layer = None  # per sample: visual tokens each layer read in prefill
        self.positions_per_layer = None  # per sample, per layer: the positions of each image's tokens that layer read
        self.signals = {}
        self.step_signals = {}  # layer -> per sample, per image: signals computed with that layer's own q/k

    # ---- installation ---------------------------------------------------------------------------------------------
    def __enter__(self):
        self.handles.append(self.adapter.language_model.register_forward_pre_hook(self._on_call, with_kwargs=True))
        if self.steps:
            for index, layer in enumerate(self.layers):
                self.handles.append(layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True))
            for layer in sorted({step.layer - 1 for step in self.steps
                                 if set(step.signals) - {STEP_LAYER_LAST_TEXT_ATTENTION, LAST_TEXT_ATTENTION_AFTER}}):
                self.handles.append(self.layers[layer].self_attn.register_forward_pre_hook(self._signal_hook(layer), with_kwargs=True))
        if self.multi_rotary is not None:
            self.handles.append(self.adapter.language_model.rotary_emb.register_forward_hook(self._rotary_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def record(self) -> dict:
        """What a replay needs: the selections and which tokens each sample cut from earlier caches."""
        return dict(selections=self.selections, final_cut=[set(state.cut) for state in self.samples])

    # ---- per call -------------------------------------------------------------------------------------------------
    def _on_call(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        hidden = embeds if embeds is not None else (args[0] if args else kwargs.get("input_ids"))
        self.call_length = hidden.shape[1]
        self.first_call = self.calls == 0
        self.calls += 1
        if self.first_call:
            valid = self.inputs.attention_mask.bool().to(hidden.device)
            self.samples = []
            for sample in range(valid.shape[0]):
                images = [dict(slots=slots.to(hidden.device), positions=positions, index=None,
                               grid_ids=self._grid_ids(sample, slots, positions))
                          for slots, positions in zip(self.inputs.visual_slots[sample], self.inputs.visual_positions[sample])]
                self.samples.append(_Sample(torch.nonzero(valid[sample]).squeeze(1), images))
            counter = 0
            for sample in self.samples:
                for image in sample.images:
                    image["index"], counter = counter, counter + 1
            self.visual_per_layer = [[0] * self.num_layers for _ in self.samples]
            self.positions_per_layer = [[None] * self.num_layers for _ in self.samples]
            self.layout = None
            self.cache_layout = {}
        return None

    def _grid_ids(self, sample, slots, positions):
        """Under the multi policy: every TRUE grid position an image's tokens carry at prefill, [P, 3], and its
        position ids, [P, axes]."""
        multi = self.inputs.multi_position_ids
        if multi is None:
            return None
        ids = multi[:, sample] if multi.dim() == 4 else multi[sample][None]  # [axes, L, m]
        ids = ids[:, slots.to(ids.device)]
        grid = positions if positions.dim() == 3 else positions[:, None].expand(-1, ids.shape[-1], -1)
        return grid.reshape(-1, 3), ids.permute(1, 2, 0).reshape(-1, ids.shape[0]).to(grid.device)

    def _extra(self, device) -> torch.Tensor:
        """Original indices of the tokens after the prompt in this call (decoded tokens)."""
        if self.first_call:
            return torch.arange(self.prompt_length, self.call_length, device=device)
        start = self.prompt_length + self.decoded_before
        return torch.arange(start, start + self.call_length, device=device)

    # ---- signals --------------------------------------------------------------------------------------------------
    def _signal_hook(self, layer):
        def hook(module, args, kwargs):
            if not self.first_call:
                return None
            normed = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            wanted = {name for step in self.steps if step.layer - 1 == layer for name in step.signals}
            self.signals[layer] = self._compute_signals(module, normed, cos, sin, wanted)
            return None

        return hook

    def _compute_signals(self, attn, normed, cos, sin, wanted):
        """Per sample, per image: {name: tensor over the image's current tokens}."""
        layout = self.layout
        key_mask = layout >= 0
        query, keys, values = attention_qkv(attn, normed, cos, sin)
        scale = attn.scaling
        out = []
        for sample, state in enumerate(self.samples):
            per_image = []
            rows = {}
            if LAST_TEXT_ATTENTION in wanted:
                logits = torch.einsum("hd,hkd->hk", query[sample, :, -1], keys[sample]) * scale
                rows[LAST_TEXT_ATTENTION] = logits.masked_fill(~key_mask[sample][None], float("-inf")).softmax(-1).mean(0)
            if MEAN_TEXT_ATTENTION in wanted and state.images:
                last_visual = max(int(_positions_in(layout[sample], image["slots"]).max()) for image in state.images)
                queries = torch.arange(last_visual + 1, layout.shape[1], device=layout.device)
                logits = torch.einsum("hqd,hkd->hqk", query[sample][:, queries], keys[sample]) * scale
                allowed = key_mask[sample][None, :] & (torch.arange(layout.shape[1], device=layout.device)[None, :] <= queries[:, None])
                rows[MEAN_TEXT_ATTENTION] = logits.masked_fill(~allowed[None], float("-inf")).softmax(-1).mean(0).mean(0)
            if TEXT_LLM_KEYS in wanted and state.images:
                text = self._text_after_images(layout[sample], state)
                rows_text = keys[sample][:, text].transpose(0, 1).reshape(len(text), -1)
            for image in state.images:
                at = _positions_in(layout[sample], image["slots"])
                signals = {name: row[at] for name, row in rows.items()}
                if LLM_KEYS in wanted:
                    signals[LLM_KEYS] = keys[sample][:, at].transpose(0, 1).reshape(len(at), -1)
                if TEXT_LLM_KEYS in wanted:
                    signals[TEXT_LLM_KEYS] = rows_text
                if LAST_TEXT_VALUE_SIMILARITY in wanted:
                    similarity = torch.einsum("hd,hkd->hk", values[sample, :, -1], values[sample][:, at]) * scale
                    signals[LAST_TEXT_VALUE_SIMILARITY] = similarity.softmax(-1).mean(0)
                if LLM_VALUES in wanted:
                    signals[LLM_VALUES] = values[sample][:, at].mean(0)
                per_image.append(signals)
            out.append(per_image)
        return out

    def _text_after_images(self, layout_row, state) -> torch.Tensor:
        """Where the sample's prompt tokens after its last image sit in `layout_row` (decoded tokens excluded)."""
        slots = torch.cat([image["slots"] for image in state.images])
        after = int(_positions_in(layout_row, slots).max()) + 1
        tail = layout_row[after:]
        return after + torch.nonzero((tail >= 0) & (tail < self.prompt_length)).squeeze(1)

    def _signals_after(self, index, hidden, layout):
        """LAST_TEXT_ATTENTION_AFTER for a step before `index`: layer index-1's norm and q/k on its own output."""
        source = self.layers[index - 1]
        gather = layout.clamp(min=0)
        cos, sin = self.full_cos_sin
        cos, sin = _gather_rows(cos, gather, cos.dim() - 2), _gather_rows(sin, gather, sin.dim() - 2)
        rows = self._compute_signals(source.self_attn, source.input_layernorm(hidden), cos, sin, {LAST_TEXT_ATTENTION})
        merged = self.signals.setdefault(index - 1, [[{} for _ in state.images] for state in self.samples])
        for sample_rows, sample_merged in zip(rows, merged):
            for image_rows, image_merged in zip(sample_rows, sample_merged):
                image_merged[LAST_TEXT_ATTENTION_AFTER] = image_rows[LAST_TEXT_ATTENTION]

    # ---- the layer hook -------------------------------------------------------------------------------------------
    def _layer_hook(self, index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if self.first_call:
                hidden = self._prefill_layer(index, hidden, kwargs)
            else:
                if index == 0:
                    self.decoded_before = self.decoded_so_far
                    self.decoded_so_far += hidden.shape[1]
                kwargs["attention_mask"] = self._decode_mask(index, kwargs.get("attention_mask"), hidden)
            if args:
                args = (hidden,) + tuple(args[1:])
            else:
                kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    def _prefill_layer(self, index, hidden, kwargs):
        device = hidden.device
        if index == 0:
            self.cache = kwargs.get("cache")
            self.decoded_so_far = self.call_length - self.prompt_length
            self.full_cos_sin = kwargs["position_embeddings"]
            self.full_position_ids = kwargs.get("position_ids")
            self.layout = self._layout(device)
        previous = self.layout
        steps = [(number, step) for number, step in enumerate(self.steps) if step.layer == index]
        if any(LAST_TEXT_ATTENTION_AFTER in step.signals for _, step in steps):
            self._signals_after(index, hidden, previous)
        if steps:
            if any(STEP_LAYER_LAST_TEXT_ATTENTION in step.signals for _, step in steps):
                self._step_layer_signals(index, hidden, previous)
            merged_rows = self._run_steps(index, steps, hidden, previous)
            self.layout = self._layout(device)
            hidden = self._regather(hidden, previous, self.layout, merged_rows)
        layout = self.layout
        for sample, state in enumerate(self.samples):
            self.visual_per_layer[sample][index] = sum(len(image["slots"]) for image in state.images)
            self.positions_per_layer[sample][index] = [image["positions"] for image in state.images]
        self.cache_layout[index] = layout
        gather = layout.clamp(min=0)
        cos, sin = self.full_cos_sin
        kwargs["position_embeddings"] = (_gather_rows(cos, gather, cos.dim() - 2), _gather_rows(sin, gather, sin.dim() - 2))
        position_ids = self.full_position_ids
        if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] == self.call_length:
            kwargs["position_ids"] = _gather_rows(position_ids, gather, position_ids.dim() - 1)
        kwargs["attention_mask"] = self._prefill_mask(index, kwargs.get("attention_mask"), layout)
        return hidden

    def _layout(self, device) -> torch.Tensor:
        """[B, n] original indices of the tokens alive now (-1 for padding), decoded tokens of a replay appended."""
        extra = self._extra(device)
        return _padded([torch.cat([state.alive, extra]) for state in self.samples], device)

    def _step_layer_signals(self, index, hidden, layout):
        """STEP_LAYER_LAST_TEXT_ATTENTION: layer `index`'s own norm and q/k on the tokens entering it, before the step."""
        gather = layout.clamp(min=0)
        cos, sin = self.full_cos_sin
        cos, sin = _gather_rows(cos, gather, cos.dim() - 2), _gather_rows(sin, gather, sin.dim() - 2)
        normed = self.layers[index].input_layernorm(hidden)
        rows = self._compute_signals(self.layers[index].self_attn, normed, cos, sin, {LAST_TEXT_ATTENTION})
        self.step_signals[index] = [[{STEP_LAYER_LAST_TEXT_ATTENTION: image[LAST_TEXT_ATTENTION]} for image in sample]
                                    for sample in rows]

    def _run_steps(self, index, steps, hidden, layout) -> dict:
        """Select at this layer; returns {(sample, original index of the kept slot): merged hidden row}."""
        merged_rows = {}
        for number, step in steps:
            with Timed(step.record, hidden.device):
                for sample, state in enumerate(self.samples):
                    dropped = []
                    for position, image in enumerate(state.images):
                        at = _positions_in(layout[sample], image["slots"])
                        features = hidden[sample, at]
                        key = (number, sample, position)
                        if self.replay is not None:
                            selection = self.replay["selections"][key]
                        else:
                            signals = dict(self.signals.get(index - 1, [[{}] * len(state.images)] * len(self.samples))[sample][position])
                            if index in self.step_signals:
                                signals.update(self.step_signals[index][sample][position])
                            context = {TEXT_FEATURES: hidden[sample, self._text_after_images(layout[sample], state)],
                                       FINAL_NORM: self.adapter.language_model.norm}
                            tokens = ImageTokens(features, image["positions"], {name: signals[name] for name in step.signals},
                                                 layer=index, context=context)
                            selection = select_checked(step.stage, tokens)
                        self.selections[key] = selection
                        step.record.add(image["index"], index, len(image["slots"]), selection.num_kept)
                        kept = selection.kept.to(image["slots"].device)
                        gone = torch.ones(len(image["slots"]), dtype=torch.bool, device=kept.device)
                        gone[kept] = False
                        dropped.append(image["slots"][gone])
                        if selection.merge_index is not None:
                            for slot, row in zip(image["slots"][kept].tolist(), selection.apply(features)):
                                merged_rows[(sample, slot)] = row
                        if self.multi_rotary is not None:
                            self._rotate_moved(sample, image, kept, selection.positions, hidden)
                        # slots stay ascending (original order); the positions follow the same permutation
                        order = torch.argsort(kept)
                        image["slots"] = image["slots"][kept][order]
                        image["positions"] = selection.positions[order.to(selection.positions.device)]
                    gone = torch.cat(dropped) if dropped else state.alive[:0]
                    state.alive = state.alive[~torch.isin(state.alive, gone)]
                    if step.stage.cuts_caches:
                        state.cut |= set(gone.tolist())
                if step.stage.cuts_caches:
                    self._cut_caches(index)
        return merged_rows

    def _rotate_moved(self, sample, image, kept, positions, hidden):
        """Kept slots that a selection gives positions other than their own (PPE's paper-figure cascade) get cos/sin
        rows computed from those positions by the plan's multi rotary, for this layer on. Each new position is one a
        token of the image carried at prefill, so its M-RoPE ids are looked up there."""
        own = image["positions"][kept.to(image["positions"].device)]
        own = own if own.dim() == 3 else own[:, None]
        new = positions if positions.dim() == 3 else positions[:, None]
        width = max(own.shape[1], new.shape[1])  # a single position stands for all m
        own, new = own.expand(-1, width, -1).to(new.device), new.expand(-1, width, -1)
        moved = torch.nonzero((own != new).flatten(1).any(1)).squeeze(1)
        if not len(moved):
            return
        grid, ids = image["grid_ids"]
        wanted = new[moved].to(grid.device)  # [k, m, 3]
        match = (wanted.reshape(-1, 1, 3) == grid[None]).all(-1)
        if not bool(match.any(1).all()):
            raise InputError("a selection at the LLM site gave a token a position no token of its image had")
        new_ids = ids[match.float().argmax(1)].reshape(*wanted.shape[:2], -1).permute(2, 0, 1)  # [axes, k, m]
        rotary_ids = new_ids[:, None] if self.inputs.multi_position_ids.dim() == 4 else new_ids[0][None]
        cos, sin = self.multi_rotary(self.adapter.language_model.rotary_emb, hidden[:1], rotary_ids.to(hidden.device))
        full_cos, full_sin = (t.expand(len(self.samples), *t.shape[1:]).clone() for t in self.full_cos_sin)
        rows = image["slots"][kept.to(image["slots"].device)][moved.to(image["slots"].device)]
        full_cos[sample, rows], full_sin[sample, rows] = cos[0].to(full_cos.dtype), sin[0].to(full_sin.dtype)
        self.full_cos_sin = (full_cos, full_sin)

    def _regather(self, hidden, previous, layout, merged_rows):
        index = torch.zeros_like(layout)
        for sample in range(layout.shape[0]):
            valid = layout[sample] >= 0
            index[sample, valid] = _positions_in(previous[sample], layout[sample, valid])
        out = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        by_sample = {}
        for (sample, original), row in merged_rows.items():
            by_sample.setdefault(sample, []).append((original, row))
        for sample, merged in by_sample.items():
            originals = torch.tensor([original for original, _ in merged], dtype=torch.long, device=layout.device)
            present = torch.isin(originals, layout[sample])  # a later step at the same layer may have dropped some
            if bool(present.any()):
                rows = torch.stack([row for _, row in merged])[present.to(merged[0][1].device)]
                out[sample, _positions_in(layout[sample], originals[present])] = rows.to(out.dtype)
        return out

    def _cut_caches(self, before_layer):
        """Remove each sample's cut tokens from the caches of layers 0..before_layer-1 (and from what they read)."""
        cache = getattr(self, "cache", None)
        for layer in range(before_layer):
            old = self.cache_layout[layer]
            rows = [row[(row >= 0) & ~torch.isin(row, torch.tensor(sorted(state.cut), dtype=torch.long, device=row.device))]
                    for row, state in zip(old, self.samples)]
            new = _padded(rows, old.device)
            if cache is not None and layer < len(cache.layers) and getattr(cache.layers[layer], "keys", None) is not None:
                index = torch.zeros_like(new)
                for sample in range(new.shape[0]):
                    valid = new[sample] >= 0
                    index[sample, valid] = _positions_in(old[sample], new[sample, valid])
                entry = cache.layers[layer]
                expand = index[:, None, :, None].expand(-1, entry.keys.shape[1], -1, entry.keys.shape[-1])
                entry.keys, entry.values = entry.keys.gather(2, expand), entry.values.gather(2, expand)
            self.cache_layout[layer] = new

    # ---- masks ----------------------------------------------------------------------------------------------------
    def _cut_for_decode(self, sample):
        if self.replay is not None:
            return self.replay["final_cut"][sample]
        return self.samples[sample].cut

    def _prefill_mask(self, index, mask, layout):
        """Causal over original order among the alive tokens; in a replay, decoded tokens also skip cut tokens."""
        valid = layout >= 0
        causal = layout[:, None, :] <= layout[:, :, None]
        allowed = causal & valid[:, None, :]
        if self.replay is not None and layout.shape[1]:
            for sample in range(layout.shape[0]):
                cut = torch.tensor(sorted(self._cut_for_decode(sample)), dtype=torch.long, device=layout.device)
                if len(cut):
                    decoded_rows = layout[sample] >= self.prompt_length
                    cut_columns = torch.isin(layout[sample], cut)
                    allowed[sample] &= ~(decoded_rows[:, None] & cut_columns[None, :])
        if self.replay is None and torch.equal(layout, self._full_layout(layout.device)):
            return mask  # nothing removed before this layer: the model's own mask is exact
        # A padding row attends to itself only, so softmax never sees an empty row (its output is never read).
        allowed |= torch.eye(layout.shape[1], dtype=torch.bool, device=layout.device)[None] & ~valid[:, :, None]
        return _as_mask(allowed[:, None], mask, valid)

    def _decode_mask(self, index, mask, hidden):
        layout = self.cache_layout[index]
        if torch.equal(layout, self._full_layout(layout.device)):
            return mask
        valid = layout >= 0
        batch, new = hidden.shape[:2]
        earlier = torch.ones(batch, self.decoded_before, dtype=torch.bool, device=layout.device)
        causal = torch.ones(new, new, dtype=torch.bool, device=layout.device).tril()
        keys = torch.cat([valid[:, None, :].expand(-1, new, -1), earlier[:, None, :].expand(-1, new, -1),
                          causal[None].expand(batch, -1, -1)], dim=2)
        if mask is None and bool(valid.all()):
            return None
        return _as_mask(keys[:, None], mask, torch.cat([valid, earlier, torch.ones(batch, new, dtype=torch.bool, device=layout.device)], 1))

    def inputs_valid(self, device):
        return self.inputs.attention_mask.bool().to(device)

    def _full_layout(self, device) -> torch.Tensor:
        valid = self.inputs_valid(device)
        full = torch.arange(self.prompt_length, device=device).expand_as(valid).masked_fill(~valid, -1)
        if self.first_call and self.call_length > self.prompt_length:
            return torch.cat([full, self._extra(device).expand(valid.shape[0], -1)], dim=1)
        return full

    # ---- multi positions ------------------------------------------------------------------------------------------
    def _rotary_hook(self, module, args, kwargs, output):
        x = args[0] if args else kwargs["x"]
        position_ids = args[1] if len(args) > 1 else kwargs["position_ids"]
        multi = self.inputs.multi_position_ids.to(position_ids.device)
        length = position_ids.shape[-1]
        if length == multi.shape[-2]:
            positions = multi
        elif self.calls == 1 and length > multi.shape[-2]:  # a replay: decoded tokens after the prompt
            tail = position_ids[..., multi.shape[-2] :, None].expand(*position_ids.shape[:-1], -1, multi.shape[-1])
            positions = torch.cat([multi.expand(*tail.shape[:-2], -1, -1), tail], dim=-2)
        else:
            positions = position_ids[..., None].expand(*position_ids.shape, multi.shape[-1])
        return self.multi_rotary(module, x, positions)


def _gather_rows(tensor, index, seq_dim):
    """Gather `tensor` along `seq_dim` with index [B, L'] (the batch dim is the one before; size 1 broadcasts)."""
    batch_dim = seq_dim - 1
    tensor = tensor.expand(*tensor.shape[:batch_dim], index.shape[0], *tensor.shape[batch_dim + 1 :])
    shape = [1] * tensor.dim()
    shape[batch_dim], shape[seq_dim] = index.shape
    expanded = index.view(shape).expand(*tensor.shape[:seq_dim], index.shape[1], *tensor.shape[seq_dim + 1 :])
    return torch.gather(tensor, seq_dim, expanded)


def _as_mask(allowed, mask, key_valid):
    """`allowed` [B, 1, q, k] in the form of the model's own mask (bool for SDPA, additive floats for eager, the 2-D
    key-padding mask for FlashAttention)."""
    if mask is not None and mask.dim() == 2:
        return key_valid.to(mask.dtype)
    if mask is None or mask.dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=mask.dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(mask.dtype).min)
