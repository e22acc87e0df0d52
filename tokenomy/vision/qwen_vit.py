"""The Qwen2-VL and Qwen2.5-VL vision towers behind `VisionEncoder`, one image at a time.

The tower is packed (no batch dim) and merges 2x2 patches into one LLM token. Qwen2.5-VL additionally runs most
blocks on windows, with its tokens permuted into window order. This wrapper runs the blocks itself so it can compute
signals in between, then returns per-LLM-token signals in the merged raster order: a patch signal is averaged over
the 4 patches of its merge unit (reducers.md §0.1, ecosystem.md §3.4).
"""
from __future__ import annotations

import torch

from tokenomy.vision.base import VisionEncoder, VisionOutput, grid_positions


def _rotate(x, cos, sin):
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def is_qwen_vit(model) -> bool:
    return all(hasattr(model, attr) for attr in ("patch_embed", "blocks", "merger", "rotary_pos_emb"))


class QwenViTEncoder(VisionEncoder):
    has_cls = False

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
        q, k, v = attn.qkv(block.norm1(tokens)).reshape(tokens.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = (part.unsqueeze(-2).float() for part in self._position_embeddings)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        return q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn.scaling

    @torch.no_grad()
    def encode_image(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, request) -> VisionOutput:
        """pixel_values: [patches, C*T*P*P] of one image; grid_thw: [1, 3]. Returns merged tokens [1, N, d_llm]."""
        from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids

        visual = self.visual
        position_ids = get_vision_position_ids(grid_thw, self.merge, kwargs={})
        cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid_thw, self.config, kwargs={})
        hidden = visual.patch_embed(pixel_values.type(visual.dtype))
        length = hidden.shape[0]
        order = torch.arange(length, device=hidden.device)  # patch (processor order) held at each sequence slot
        position_embeddings = visual.rotary_pos_emb(hidden, position_ids)
        windows = None
        if self.windowed:
            from transformers.vision_utils import get_max_seqlen, get_vision_window_index

            window_index, cu_window = get_vision_window_index(
                grid_thw, spatial_merge_size=self.merge, window_size=visual.window_size, patch_size=visual.patch_size, kwargs={}
            )
            windows = (window_index, cu_window, get_max_seqlen(cu_window, self.config, kwargs={}))
            permute = lambda x: visual.permute_input_for_window_attn(x, window_index, seq_len=length)  # noqa: E731
            hidden, order = permute(hidden), permute(order[:, None])[:, 0]
            position_embeddings = tuple(permute(part) for part in position_embeddings)
        self._position_embeddings = position_embeddings
        wanted_by_layer = request.resolve(self.num_layers)
        signals = {name: {} for name in wanted_by_layer}
        restore = torch.argsort(order)
        for index, block in enumerate(visual.blocks):
            wanted = {name for name, layers in wanted_by_layer.items() if index in layers}
            for name, value in (self._signals(index, hidden[None], wanted) if wanted else {}).items():
                signals[name][index] = self._per_llm_token(value[0][restore])[None]
            full = not self.windowed or index in visual.fullatt_block_indexes
            seqlens, longest = (cu_seqlens, max_seqlen) if full else windows[1:]
            hidden = block(hidden, cu_seqlens=seqlens, max_seqlen=longest, position_embeddings=position_embeddings)
        merged = visual.merger(hidden)
        if self.windowed:
            merged = merged[torch.argsort(windows[0])]
        t, h, w = grid_thw[0].tolist()
        grid = grid_positions(t, h // self.merge, w // self.merge, device=merged.device)
        return VisionOutput(tokens=merged[None], cls=None, grid=grid, patch_index=torch.arange(len(merged))[None], signals=signals)

    def _per_llm_token(self, value):
        """Average a per-patch signal over each merge unit (consecutive patches in Qwen's patch order)."""
        unit = self.merge ** 2
        return value.reshape(value.shape[0] // unit, unit, *value.shape[1:]).mean(dim=1)
