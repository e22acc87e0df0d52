"""The ToMe patch on tiny random-weight timm, open_clip and transformers CLIP vision transformers."""
import pytest
import torch

from tokenomy.errors import InputError
from tokenomy.kernels import tome


@pytest.fixture(scope="module")
def timm_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4, num_classes=10).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_timm_r0_equals_the_unpatched_model(timm_vit, images):
    want = timm_vit(images)
    with tome.patch(timm_vit, r=0) as handle:
        got = timm_vit(images)
    assert handle.state.tokens == [17] * 4
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_timm_r_reduces_tokens_per_block_and_unpatch_restores(timm_vit, images):
    want = timm_vit(images)
    handle = tome.patch(timm_vit, r=3)
    features = timm_vit.forward_features(images)
    assert handle.state.tokens == [17, 14, 11, 8]
    assert features.shape == (2, 17 - 4 * 3, 192)
    torch.testing.assert_close(handle.state.size.sum(-1), torch.full((2,), 17.0))
    assert torch.all(handle.state.source[:, 0] == 0)  # CLS is protected and stays first
    merged_logits = timm_vit(images)
    assert not torch.allclose(merged_logits, want, atol=1e-4)
    tome.unpatch(timm_vit)
    assert "forward" not in timm_vit.blocks[0].__dict__ and not hasattr(timm_vit, "_tokenomy_tome")
    assert torch.equal(timm_vit(images), want)


@torch.no_grad()
def test_timm_schedule_list_and_clamp(timm_vit, images):
    with tome.patch(timm_vit, r=[100, 0, 100, 100]) as handle:
        timm_vit(images)
    # 17 tokens = CLS + 8 more in A and 8 in B: all 8 mergeable A rows go, then 4 of 9, then 2 of 5
    assert handle.state.tokens == [17, 9, 9, 5]
    assert handle.state.size.shape == (2, 3)
    with pytest.raises(InputError, match="one per block"):
        tome.patch(timm_vit, r=[1, 2])


@torch.no_grad()
def test_proportional_attention_changes_merged_blocks_only(timm_vit, images):
    with tome.patch(timm_vit, r=4, prop_attn=True):
        with_bias = timm_vit(images)
    with tome.patch(timm_vit, r=4, prop_attn=False):
        without_bias = timm_vit(images)
    with tome.patch(timm_vit, r=[0, 0, 0, 4], prop_attn=True):
        last_only = timm_vit.forward_features(images)
    with tome.patch(timm_vit, r=[0, 0, 0, 4], prop_attn=False):
        last_only_plain = timm_vit.forward_features(images)
    assert (with_bias - without_bias).abs().max() > 1e-4
    torch.testing.assert_close(last_only, last_only_plain)  # no block runs attention after the only merge


@torch.no_grad()
def test_open_clip_vision_transformer():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, width=64, layers=3, heads=4, mlp_ratio=2.0,
                              output_dim=16).eval()
    pixels = torch.randn(2, 3, 32, 32)
    want = model(pixels)
    with tome.patch(model, r=0):
        torch.testing.assert_close(model(pixels), want, atol=1e-5, rtol=1e-5)
    with tome.patch(model, r=2) as handle:
        merged = model(pixels)
    assert handle.state.tokens == [17, 15, 13] and merged.shape == want.shape
    assert not torch.allclose(merged, want, atol=1e-4)
    torch.testing.assert_close(model(pixels), want)


@torch.no_grad()
def test_transformers_clip_vision_model():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8)
    model = CLIPVisionModel(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    want = model(pixel_values=pixels)
    with tome.patch(model, r=0):
        got = model(pixel_values=pixels)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=1e-5)
    with tome.patch(model, r=3) as handle:
        merged = model(pixel_values=pixels)
    assert handle.state.tokens == [17, 14, 11]
    assert merged.last_hidden_state.shape == (2, 8, 64) and merged.pooler_output.shape == (2, 64)
    torch.testing.assert_close(model(pixel_values=pixels).pooler_output, want.pooler_output)


def test_unsupported_model_is_refused():
    with pytest.raises(InputError, match="tome.patch supports"):
        tome.patch(torch.nn.Sequential(torch.nn.Linear(4, 4)), r=1)
