"""transformers CLIP/SigLIP wrapper: exact layer outputs, signal rows equal to eager attention, pruning hooks."""
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from tokenomy.vision import wrap_encoder
from tokenomy.vision.base import CLS_ATTENTION, MEAN_QUERY_ATTENTION, VALUES, EncoderState, SignalRequest

TINY = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=48, patch_size=8)


def clip():
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(**TINY)).eval()


def test_clip_layers_and_cls_rows_match_eager_attention():
    model = clip()
    pixels = torch.randn(2, 3, 48, 48)
    out = wrap_encoder(model).encode(pixels, feature_layer=-2, request=SignalRequest.of(cls_attention=(0, 1), values=(1,)))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        reference = model(pixels, output_hidden_states=True, output_attentions=True)
    assert torch.allclose(out.tokens, reference.hidden_states[-2][:, 1:], atol=1e-5)
    assert torch.allclose(out.cls, reference.hidden_states[-2][:, 0], atol=1e-5)
    for layer in (0, 1):
        expected = reference.attentions[layer].mean(dim=1)[:, 0, 1:]
        assert torch.allclose(out.signals[CLS_ATTENTION][layer], expected, atol=1e-6)
    assert out.signals[VALUES][1].shape == (2, 36, 8)
    assert out.grid.shape == (36, 3) and out.grid[7].tolist() == [0, 1, 1]


def test_siglip_mean_query_row_matches_eager_attention():
    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(**TINY)).eval()
    pixels = torch.randn(1, 3, 48, 48)
    encoder = wrap_encoder(model)
    assert not encoder.has_cls
    out = encoder.encode(pixels, feature_layer=-1, request=SignalRequest.of(mean_query_attention=(2,)))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        reference = model(pixels, output_hidden_states=True, output_attentions=True)
    assert torch.allclose(out.tokens, reference.hidden_states[-1], atol=1e-5)
    layer = model.encoder.layers[2]
    normed = layer.layer_norm1(reference.hidden_states[2])
    attn = layer.self_attn
    q = attn.q_proj(normed).view(1, 36, 4, 8).transpose(1, 2).mean(dim=2)
    k = attn.k_proj(normed).view(1, 36, 4, 8).transpose(1, 2)
    expected = torch.softmax(torch.einsum("bhd,bhtd->bht", q, k) * attn.scale, dim=-1).mean(dim=1)
    assert torch.allclose(out.signals[MEAN_QUERY_ATTENTION][2], expected, atol=1e-6)


def test_a_hook_can_prune_inside_the_encoder():
    model = clip()
    pixels = torch.randn(2, 3, 48, 48)
    keep = torch.tensor([[0, 3, 5, 7, 20], [1, 2, 3, 30, 35]])

    def prune_after_first_layer(state: EncoderState):
        if state.layer != 0:
            return None
        rows = torch.cat([torch.zeros(2, 1, dtype=torch.long), keep + 1], dim=1)  # CLS stays at index 0
        hidden = torch.gather(state.hidden, 1, rows[..., None].expand(-1, -1, state.hidden.shape[-1]))
        return EncoderState(state.layer, hidden, torch.gather(state.patch_index, 1, keep), state.signals)

    out = wrap_encoder(model).encode(pixels, feature_layer=-1, hooks=(prune_after_first_layer,))
    with torch.no_grad():
        after_first = model(pixels, output_hidden_states=True).hidden_states[1]
        rows = torch.cat([torch.zeros(2, 1, dtype=torch.long), keep + 1], dim=1)
        hidden = torch.gather(after_first, 1, rows[..., None].expand(-1, -1, 32))
        for layer in model.encoder.layers[1:]:
            hidden = layer(hidden, None)
    assert torch.allclose(out.tokens, hidden[:, 1:], atol=1e-6)
    assert out.patch_index.tolist() == keep.tolist()
    assert out.grid.shape == (2, 5, 3) and out.grid[1, 3].tolist() == [0, 30 // 6, 30 % 6]
