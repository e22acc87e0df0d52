"""The Qwen2-VL and Qwen2.5-VL vision towers behind `VisionEncoder`, one image at a time.

The tower is packed (no batch dim) and merges 2x2 patches into one LLM token. Qwen2.5-VL additionally runs most
blocks on windows, with its tokens permuted into window order. This wrapper runs the blocks itself so it can compute
signals in between, then returns per-LLM-token signals in the merged raster order: a patch signal is averaged over
the 4 patches of its merge unit (reducers.md §0.1, ecosystem.md §3.4).
"""
from __future__ import annotations

import torch

from tokenomy.errors import InputError
from tokenomy.ops.attention import apply_rotary
from tokenomy.ops.window_attention import window_attention_received
from tokenomy.vision.base import WINDOW_ATTENTION, EncoderState, VisionEncoder, VisionOutput, grid_positions


def _rotate(x, cos, sin):
    return apply_rotary(x.float(), cos, sin).to(x.dtype)


def is_qwen_vit(model) -> bool:
    return all(hasattr(model, attr) for attr in ("patch_embed", "blocks", "merger", "rotary_pos_emb"))


class QwenViTEncoder(VisionEncoder):
    has_cls = False
    has_frames = True
    takes_encoder_merges = False
    frames_per_window = 2  # SEATS' grid_in_window: temporal grids whose patches share a window_attention window

    def __init__(self, visual):
        self.visual = visual
        self.config = visual.config
        self.merge = self.config.spatial_merge_size
        self.windowed = hasattr(visual, "fullatt_block_indexes")
        self._position_embeddings = None

    def _layers(self):
        return self.visual.blocks

    def _qkv(self, layer_index, hidden):
        block = self.visual.blocks[layer_index]
        attn = block.attn
        tokens = hidden[0]
        normed = block.norm1(tokens)
        if hasattr(attn, "qkv"):
            q, k, v = attn.qkv(normed).reshape(tokens.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        else:  # Qwen2.5-Omni's ViT projects q, k and v separately
            q, k, v = (project(normed).reshape(tokens.shape[0], attn.num_heads, -1) for project in (attn.q, attn.k, attn.v))
        cos, sin = (part.unsqueeze(-2).float() for part in self._position_embeddings)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        return q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn.scaling

    @torch.no_grad()
    def encode_image(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, request, hooks: tuple = ()) -> VisionOutput:
        """pixel_values: [patches, C*T*P*P] of one image; grid_thw: [1, 3]. Returns the merger's input, one row per 2x2
        merge unit in merged-raster order: [1, U, 4*D] (the adapter applies the merger, which is the projector).

        Hooks act between blocks on 2x2 merge units (a unit is kept or dropped whole, so the merger only ever joins
        true spatial neighbours): `EncoderState.hidden` is [1, U, 4*D] (the unit's patches concatenated),
        `patch_index` [1, U] the unit's index in the merged raster grid. A hook returns the units to keep in the same
        form; merging units is not defined here. After pruning, kept patches keep their own rotary angles, and
        Qwen2.5-VL's windows are recomputed over the surviving units of each window.
        """
        from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids

        visual, unit = self.visual, self.merge ** 2
        position_ids = get_vision_position_ids(grid_thw, self.merge, kwargs={})
        cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid_thw, self.config, kwargs={})
        hidden = visual.patch_embed(pixel_values.type(visual.dtype))
        length = hidden.shape[0]
        units = torch.arange(length // unit, device=hidden.device)  # merged-raster unit held at each unit slot
        units_per_frame = int(grid_thw[0, 1] * grid_thw[0, 2]) // unit  # frames are contiguous in raster and window order
        window_of_unit = torch.zeros_like(units)
        position_embeddings = visual.rotary_pos_emb(hidden, position_ids)
        if self.windowed:
            from transformers.vision_utils import get_vision_window_index

            window_index, cu_window = get_vision_window_index(
                grid_thw, spatial_merge_size=self.merge, window_size=visual.window_size, patch_size=visual.patch_size, kwargs={}
            )
            permute = lambda x: visual.permute_input_for_window_attn(x, window_index, seq_len=length)  # noqa: E731
            hidden = permute(hidden)
            position_embeddings = tuple(permute(part) for part in position_embeddings)
            units = window_index.to(hidden.device)
            slot_starts = torch.arange(len(units), device=hidden.device) * unit
            window_of_unit = torch.searchsorted(cu_window.to(hidden.device).long(), slot_starts, right=True) - 1
        self._position_embeddings = position_embeddings
        wanted_by_layer = request.resolve(self.num_layers)
        signals = {name: {} for name in wanted_by_layer}
        for index, block in enumerate(visual.blocks):
            self._frame_of_patch = (units // units_per_frame).repeat_interleave(unit)
            wanted = {name for name, layers in wanted_by_layer.items() if index in layers}
            layer_signals = {name: self._per_llm_token(value[0])[None] for name, value in
                             (self._signals(index, hidden[None], wanted) if wanted else {}).items()}
            for name, value in layer_signals.items():
                signals[name][index] = (value, units)
            full = not self.windowed or index in visual.fullatt_block_indexes
            seqlens = self._seqlens(units // units_per_frame if full else window_of_unit, hidden)
            hidden = block(hidden, cu_seqlens=seqlens, max_seqlen=int(seqlens.diff().max()), position_embeddings=position_embeddings)
            for hook in hooks:
                state = hook(EncoderState(index, hidden.reshape(1, -1, unit * hidden.shape[-1]), units[None], layer_signals))
                if state is None:
                    continue
                if state.sources is not None:
                    raise InputError("merging tokens between Qwen vision blocks is not supported; prune whole 2x2 units")
                slots = _slots_of(units, state.patch_index[0])
                patches = (slots[:, None] * unit + torch.arange(unit, device=slots.device)).reshape(-1)
                hidden = hidden[patches]
                position_embeddings = tuple(part[patches] for part in position_embeddings)
                self._position_embeddings = position_embeddings
                units, window_of_unit = units[slots], window_of_unit[slots]
        unit_features = hidden.reshape(len(units), unit * hidden.shape[-1])  # the merger's input, one row per unit
        raster = torch.argsort(units)
        t, h, w = grid_thw[0].tolist()
        grid = grid_positions(t, h // self.merge, w // self.merge, device=hidden.device)
        final = units[raster]
        out_signals = {
            name: {layer: value[:, _slots_of(at_units, final)] for layer, (value, at_units) in by_layer.items()}
            for name, by_layer in signals.items()
        }
        return VisionOutput(tokens=unit_features[raster][None], cls=None, grid=grid[final], patch_index=final[None], signals=out_signals)

    def _signals(self, layer_index: int, hidden: torch.Tensor, wanted: set) -> dict:
        out = super()._signals(layer_index, hidden, wanted - {WINDOW_ATTENTION})
        if WINDOW_ATTENTION in wanted:
            # Frames are contiguous in raster and window order, so each window is one run of patches.
            q, k, _, scale = self._qkv(layer_index, hidden)
            window = self._frame_of_patch // self.frames_per_window
            change = (torch.nonzero(window[1:] != window[:-1]).squeeze(1) + 1).tolist()
            bounds = list(zip([0, *change], [*change, len(window)]))
            out[WINDOW_ATTENTION] = window_attention_received(q[0], k[0], bounds, scale)[None]
        return out

    def _seqlens(self, group_of_unit: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """cu_seqlens of the current patches: one sequence per run of units of one group, the frame for a
        full-attention block (a video's frames attend apart, as transformers' cu_seqlens say), else the window."""
        unit = self.merge ** 2
        counts = torch.unique_consecutive(group_of_unit, return_counts=True)[1] * unit
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)

    def _per_llm_token(self, value):
        """Average a per-patch signal over each merge unit (consecutive patches in Qwen's patch order)."""
        unit = self.merge ** 2
        return value.reshape(value.shape[0] // unit, unit, *value.shape[1:]).mean(dim=1)


def _slots_of(units: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Positions in `units` of the unit ids `wanted` (each must be present)."""
    lookup = torch.full((int(units.max()) + 1,), -1, dtype=torch.long, device=units.device)
    lookup[units] = torch.arange(len(units), device=units.device)
    slots = lookup[wanted.to(units.device)]
    if bool((slots < 0).any()):
        raise InputError("an encoder hook kept a Qwen merge unit that had already been dropped")
    return slots
