"""The Qwen ViT wrapper: exact features, and signals that match the tower's own attention inputs."""
import pytest
import torch

import tokenomy
from tests.conftest import random_images
from tokenomy.vision.base import MEAN_QUERY_ATTENTION, SignalRequest


@pytest.mark.parametrize("family", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_mean_query_row_matches_the_towers_own_q_and_k(family):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    pipeline = tokenomy.load(family, "none")
    _, _, info = pipeline.prepare(random_images(1), ["x"])
    batch = info["batch"]
    visual = pipeline.model.model.visual
    captured = {}

    def capture(module, args, kwargs):
        captured["hidden"], captured["rope"] = args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"]

    handle = visual.blocks[1].attn.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            stock = pipeline.model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output[0]
    finally:
        handle.remove()
    (encoded,) = pipeline.adapter.encode_images(batch, SignalRequest.of(**{MEAN_QUERY_ATTENTION: (1,)}))
    assert torch.equal(encoded.project(encoded.tokens.features), stock)  # pre-projector units, then the merger

    attn = visual.blocks[1].attn
    hidden = captured["hidden"]
    q, k, _ = attn.qkv(hidden).reshape(hidden.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *captured["rope"])
    row = torch.softmax(torch.einsum("hd,thd->ht", q.mean(0), k) * attn.scaling, dim=-1).mean(0)  # in tower order
    if hasattr(visual, "fullatt_block_indexes"):  # undo Qwen2.5's window permutation of merge units
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(batch["image_grid_thw"], 2, visual.window_size, visual.patch_size)
        row = row.view(-1, 4)[torch.argsort(window_index)].reshape(-1)
    expected = row.view(-1, 4).mean(-1)
    assert torch.allclose(encoded.signals.by_layer[MEAN_QUERY_ATTENTION][1], expected, atol=1e-6)
