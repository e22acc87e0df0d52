"""timm and open_clip encoder wrappers: exact against the libraries' own forward, hooks and attention rows."""
import pytest
import torch
import torch.nn as nn

from tokenomy.errors import InputError, ModelLoadError
from tokenomy.vision import (
    CLS_ATTENTION,
    CLS_VALUE_SIMILARITY,
    MEAN_QUERY_ATTENTION,
    VALUES,
    EncoderState,
    HFViTEncoder,
    OpenClipViTEncoder,
    SignalRequest,
    TimmViTEncoder,
    wrap_encoder,
)

TOL = 1e-6
IMAGE = 32
ALL_SIGNALS = dict(cls_attention=(1,), mean_query_attention=(1,), values=(1,), cls_value_similarity=(1,))


def pixels(batch=2, seed=0):
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def capture_output(module, run):
    seen = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return seen[0]


def max_diff(a, b):
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- timm

TIMM_VARIANTS = {
    "cls": dict(),
    "no_cls_avg_pool": dict(class_token=False, global_pool="avg"),
    "cls_registers": dict(reg_tokens=3),
    "registers_no_embed_class_qk_norm": dict(reg_tokens=2, no_embed_class=True, qk_norm=True),
    "no_cls_registers": dict(class_token=False, global_pool="avg", reg_tokens=2),
    "res_post_block": dict(block_fn="ResPostBlock"),
}


def tiny_timm(**overrides):
    import timm
    from timm.models.vision_transformer import ResPostBlock

    if overrides.get("block_fn") == "ResPostBlock":
        overrides["block_fn"] = ResPostBlock
    torch.manual_seed(0)
    kwargs = dict(img_size=IMAGE, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=0, pretrained=False)
    kwargs.update(overrides)
    return timm.create_model("vit_tiny_patch16_224", **kwargs).eval()


@pytest.fixture(params=sorted(TIMM_VARIANTS), scope="module")
def timm_model(request):
    return tiny_timm(**TIMM_VARIANTS[request.param])


def test_timm_last_layer_equals_forward_features(timm_model):
    x = pixels()
    encoder = wrap_encoder(timm_model)
    assert isinstance(encoder, TimmViTEncoder)
    out = encoder.encode(x, feature_layer=-1)
    with torch.no_grad():
        reference = timm_model.forward_features(x)
    prefix = timm_model.num_prefix_tokens
    assert out.tokens.shape == (2, 16, 32)
    assert max_diff(out.tokens, reference[:, prefix:]) <= TOL
    if timm_model.cls_token is not None:
        assert max_diff(out.cls, reference[:, 0]) <= TOL
    else:
        assert out.cls is None
    assert out.grid.shape == (16, 3) and out.grid[:, 2].max() == 3


def test_timm_intermediate_layer_equals_block_output(timm_model):
    x = pixels()
    block_output = capture_output(timm_model.blocks[1], lambda: timm_model.forward_features(x))
    out = wrap_encoder(timm_model).encode(x, feature_layer=1)
    assert max_diff(out.tokens, block_output[:, timm_model.num_prefix_tokens:]) <= TOL
    if not isinstance(timm_model.norm, nn.Identity):  # the final norm must not leak into intermediate layers
        assert max_diff(out.tokens, timm_model.norm(block_output)[:, timm_model.num_prefix_tokens:]) > 1e-3


def eager_timm_attention(model, layer, x):
    """The layer's softmax map [B, H, T, T] as timm's unfused path computes it, and its raw qkv projection."""
    attn = model.blocks[layer].attn
    attn.fused_attn = False
    try:
        with torch.no_grad():
            seen = {}
            hooks = [
                attn.attn_drop.register_forward_hook(lambda _m, _i, out: seen.setdefault("map", out)),
                attn.qkv.register_forward_hook(lambda _m, _i, out: seen.setdefault("qkv", out)),
            ]
            reference = model.forward_features(x)
            for hook in hooks:
                hook.remove()
    finally:
        attn.fused_attn = True
    return seen["map"], seen["qkv"], reference


def test_timm_signals_equal_eager_attention(timm_model):
    x = pixels()
    prefix = timm_model.num_prefix_tokens
    has_cls = timm_model.cls_token is not None
    attention_map, qkv, _ = eager_timm_attention(timm_model, 1, x)
    wanted = ALL_SIGNALS if has_cls else dict(mean_query_attention=(1,), values=(1,))
    signals = wrap_encoder(timm_model).encode(x, feature_layer=2, request=SignalRequest.of(**wanted)).signals
    attn = timm_model.blocks[1].attn
    q, k, v = qkv.reshape(2, 16 + prefix, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    mean_query = ((q.mean(dim=2, keepdim=True) @ k.transpose(-1, -2)) * attn.scale).softmax(-1)
    assert max_diff(signals[MEAN_QUERY_ATTENTION][1], mean_query.mean(1)[:, 0, prefix:]) <= TOL
    assert max_diff(signals[VALUES][1], v[:, :, prefix:].mean(1)) <= TOL
    if has_cls:
        assert signals[CLS_ATTENTION][1].shape == (2, 16)
        assert max_diff(signals[CLS_ATTENTION][1], attention_map[:, :, 0, prefix:].mean(1)) <= TOL
        value_sim = (v[:, :, :1] @ v.transpose(-1, -2)).softmax(-1).mean(1)[:, 0, prefix:]
        assert max_diff(signals[CLS_VALUE_SIMILARITY][1], value_sim) <= TOL


def test_timm_without_cls_refuses_cls_signals():
    encoder = wrap_encoder(tiny_timm(class_token=False, global_pool="avg"))
    with pytest.raises(InputError, match="no CLS"):
        encoder.encode(pixels(), request=SignalRequest.of(cls_attention=(0,)))


@pytest.mark.parametrize("variant", ["cls", "cls_registers", "no_cls_registers"])
def test_timm_pruning_hook_keeps_registers_attending(variant):
    """A hook that drops patches after layer 0 equals running timm's blocks on the pruned sequence by hand."""
    model = tiny_timm(**TIMM_VARIANTS[variant])
    x = pixels()
    prefix, num_cls = model.num_prefix_tokens, int(model.cls_token is not None)
    kept = torch.tensor([[0, 2, 5, 7, 11], [1, 3, 4, 12, 15]])

    def prune(state: EncoderState):
        if state.layer != 0:
            assert state.hidden.shape[1] == num_cls + 5
            return None
        assert state.hidden.shape[1] == num_cls + 16  # hooks never see register tokens
        patches = state.hidden[:, num_cls:].gather(1, kept[..., None].expand(-1, -1, state.hidden.shape[-1]))
        return EncoderState(state.layer, torch.cat([state.hidden[:, :num_cls], patches], 1), kept, state.signals)

    out = wrap_encoder(model).encode(x, feature_layer=-1, hooks=(prune,))
    with torch.no_grad():
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        h = model.blocks[0](h)
        patches = h[:, prefix:].gather(1, kept[..., None].expand(-1, -1, h.shape[-1]))
        h = torch.cat([h[:, :prefix], patches], 1)
        for block in model.blocks[1:]:
            h = block(h)
        h = model.norm(h)
    assert out.tokens.shape == (2, 5, 32)
    assert max_diff(out.tokens, h[:, prefix:]) <= TOL
    assert torch.equal(out.patch_index, kept)
    assert torch.equal(out.grid[1, 3], torch.tensor([0, 3, 0]))  # patch 12 of a 4x4 grid


def test_timm_dynamic_image_size_grid():
    model = tiny_timm(dynamic_img_size=True, reg_tokens=1)
    x = torch.randn(1, 3, 48, 24)
    out = wrap_encoder(model).encode(x, feature_layer=-1)
    with torch.no_grad():
        reference = model.forward_features(x)
    assert max_diff(out.tokens, reference[:, model.num_prefix_tokens:]) <= TOL
    assert out.tokens.shape[1] == 18 and out.grid[:, 1].max() == 5 and out.grid[:, 2].max() == 2


def test_timm_training_mode_patch_dropout_is_refused():
    model = tiny_timm(patch_drop_rate=0.5).train()
    with pytest.raises(InputError, match="eval"):
        wrap_encoder(model).encode(pixels())


def test_timm_unsupported_block_is_refused():
    from timm.models.vision_transformer import ParallelScalingBlock

    with pytest.raises(ModelLoadError, match="ParallelScalingBlock"):
        wrap_encoder(tiny_timm(block_fn=ParallelScalingBlock))


# ---------------------------------------------------------------- open_clip

OPEN_CLIP_VARIANTS = {
    "default": dict(),
    "qk_norm_custom_block": dict(qk_norm=True),
    "layer_scale": dict(ls_init_value=0.5),
}


def tiny_open_clip(**overrides):
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    torch.manual_seed(0)
    cfg = CLIPVisionCfg(layers=3, width=32, head_width=16, patch_size=8, image_size=IMAGE, output_tokens=True, **overrides)
    return _build_vision_tower(16, cfg).eval()


@pytest.fixture(params=sorted(OPEN_CLIP_VARIANTS), scope="module")
def open_clip_model(request):
    return tiny_open_clip(**OPEN_CLIP_VARIANTS[request.param])


def test_open_clip_last_layer_equals_forward_tokens(open_clip_model):
    x = pixels()
    encoder = wrap_encoder(open_clip_model)
    assert isinstance(encoder, OpenClipViTEncoder)
    out = encoder.encode(x, feature_layer=-1)
    with torch.no_grad():
        _, tokens = open_clip_model(x)
    assert out.tokens.shape == (2, 16, 32)
    assert max_diff(out.tokens, tokens) <= TOL


def test_open_clip_intermediate_layer_equals_block_output(open_clip_model):
    x = pixels()
    block_output = capture_output(open_clip_model.transformer.resblocks[1], lambda: open_clip_model(x))
    out = wrap_encoder(open_clip_model).encode(x, feature_layer=1)
    assert max_diff(out.tokens, block_output[:, 1:]) <= TOL
    assert max_diff(out.cls, block_output[:, 0]) <= TOL


def open_clip_attention_map(model, layer, x):
    """[B, H, T, T] softmax map of resblock `layer`: torch's MHA weights, or by hand for open_clip's `Attention`
    (whose own unfused path calls bmm on 4-D tensors and fails in open_clip 3.3)."""
    block = model.transformer.resblocks[layer]
    normed = capture_output(block.ln_1, lambda: model(x))
    with torch.no_grad():
        attn = block.attn
        if isinstance(attn, nn.MultiheadAttention):
            return attn(normed, normed, normed, need_weights=True, average_attn_weights=False)[1]
        packed = normed @ attn.in_proj_weight.T + attn.in_proj_bias
        q, k, _ = (t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2) for t in packed.chunk(3, dim=-1))
        return (attn.ln_q(q) @ attn.ln_k(k).transpose(-1, -2) * attn.scale).softmax(-1)


def test_open_clip_cls_row_equals_eager_attention(open_clip_model):
    x = pixels()
    attention_map = open_clip_attention_map(open_clip_model, 1, x)
    signals = wrap_encoder(open_clip_model).encode(x, feature_layer=-1, request=SignalRequest.of(**ALL_SIGNALS)).signals
    assert max_diff(signals[CLS_ATTENTION][1], attention_map[:, :, 0, 1:].mean(1)) <= TOL
    assert signals[VALUES][1].shape == (2, 16, 16)
    assert set(signals[CLS_VALUE_SIMILARITY]) == {1} and signals[MEAN_QUERY_ATTENTION][1].shape == (2, 16)


def test_open_clip_sequence_first_transformer():
    """Older open_clip stacks run [T, B, D]; the wrapper must still return batch-first tokens equal to forward."""
    from open_clip.transformer import Transformer

    model = tiny_open_clip()
    torch.manual_seed(1)
    model.transformer = Transformer(32, 3, 2, batch_first=False).eval()
    x = pixels()
    out = wrap_encoder(model).encode(x, feature_layer=-1)
    with torch.no_grad():
        _, tokens = model(x)
    assert max_diff(out.tokens, tokens) <= TOL


def test_open_clip_whole_clip_model_is_unwrapped_to_visual():
    from open_clip.model import CLIP

    vision = dict(layers=2, width=32, head_width=16, patch_size=8, image_size=IMAGE)
    clip = CLIP(16, vision, dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1)).eval()
    encoder = wrap_encoder(clip)
    assert isinstance(encoder, OpenClipViTEncoder) and encoder.model is clip.visual


def test_open_clip_timm_tower_is_unwrapped_to_trunk():
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    tower = _build_vision_tower(16, CLIPVisionCfg(timm_model_name="vit_tiny_patch16_224", image_size=224))
    encoder = wrap_encoder(tower)
    assert isinstance(encoder, TimmViTEncoder) and encoder.model is tower.trunk


# ---------------------------------------------------------------- dispatch


def test_wrap_encoder_picks_transformers_clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE, patch_size=8)
    model = CLIPVisionModel(config).eval()
    encoder = wrap_encoder(model)
    assert isinstance(encoder, HFViTEncoder)
    out = encoder.encode(pixels(), feature_layer=-2)
    with torch.no_grad():
        hidden = model(pixels(), output_hidden_states=True).hidden_states[-2]
    assert max_diff(out.tokens, hidden[:, 1:]) <= TOL


def test_wrap_encoder_names_unknown_type():
    with pytest.raises(ModelLoadError, match="torch.nn.modules.linear.Linear"):
        wrap_encoder(nn.Linear(2, 2))


def test_wrap_encoder_returns_an_encoder_unchanged():
    encoder = wrap_encoder(tiny_timm())
    assert wrap_encoder(encoder) is encoder
