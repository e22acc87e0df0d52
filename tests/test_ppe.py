"""PPE: DPC-KNN merged tokens carrying K member positions in K frequency sub-bands of each M-RoPE axis.

Rotary: K=1 is stock M-RoPE bit for bit, K equal members rotate like their one position, and the sub-band layout
matches a hand computation. Reducer: clusters per super-frame, members' positions in the official order, the cascade's
code variant. End to end on tiny Qwen2-VL / Qwen2.5-VL (widened heads so K=2 and K=4 fit their sections): batch of 3
= 3 single runs and cached greedy = a no-cache recompute (tests/test_reduction_plans.py's `check_plan`).
"""
import math

import pytest
import torch

import tokenomy
from tests.conftest import random_images
from tests.test_reduction_plans import PROMPTS, check_plan
from tokenomy.errors import InputError
from tokenomy.kernels.dpc_knn import dpc_knn
from tokenomy.reducers import ImageTokens
from tokenomy.reducers import ppe as ppe_module
from tokenomy.kernels import dispatch
from tokenomy.reducers.ppe import (PPE, PPECascade, SubBandRotary, member_cycle, round_robin, split_budget,
                                     tome_assignment)
from tokenomy.vision.base import grid_positions
from tokenomy.vlm import tiny
from tokenomy.vlm.pipeline import Pipeline

FAMILIES = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]


def wide_qwen(family, sections):
    """The tiny family with 2 heads of 2*sum(sections) dims, so `sections` can carry K > 1."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    tokenizer = tiny.byte_tokenizer(tiny.QWEN_CHAT_TEMPLATE)
    hidden = 2 * 2 * sum(sections)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections}
    model_type = "qwen2_vl_text" if family == "tiny-qwen2-vl" else "qwen2_5_vl_text"
    text = tiny._text_config(model_type, rope_parameters=rope, hidden_size=hidden, num_attention_heads=2,
                             num_key_value_heads=1, **tiny._ids(tokenizer))
    if family == "tiny-qwen2-vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=4, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    else:
        vision = dict(depth=2, hidden_size=32, out_hidden_size=hidden, intermediate_size=64, num_heads=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                      tokens_per_second=2, in_channels=3)
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    config = config_class(text_config=text, vision_config=vision, **tiny._qwen_special_ids(tokenizer), **tiny._ids(tokenizer))
    torch.manual_seed(tiny.SEED)
    return model_class(config).eval(), tiny._qwen_processor(tokenizer)


# ---- the rotary -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES + ["tiny-llava"])
def test_k1_without_merging_equals_stock_logits(family, monkeypatch):
    calls = []
    original = SubBandRotary.__call__
    monkeypatch.setattr(SubBandRotary, "__call__", lambda self, *a: calls.append(1) or original(self, *a))
    pipeline = tokenomy.load(family, "ppe:ratio=1.0,ppe_k=1,order=raster")
    images = random_images(2)
    _, _, info = pipeline.prepare(images, PROMPTS[:2])
    with torch.no_grad():
        stock = pipeline.model(**info["batch"]).logits
    ours = pipeline.forward(images, PROMPTS[:2])
    assert calls, "the PPE rotary was not used"
    assert ours.shape == stock.shape and (ours - stock).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family,sections", [("tiny-qwen2-vl", [2, 1, 1]), ("tiny-qwen2.5-vl", [2, 1, 1]),
                                             ("tiny-qwen2-vl", [8, 4, 4])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equal_members_rotate_exactly_like_their_position(family, sections, dtype):
    model, _ = tiny.BUILDERS[family]() if sections == [2, 1, 1] else wide_qwen(family, sections)
    rotary = model.model.language_model.rotary_emb
    positions = torch.randint(0, 300, (3, 2, 9), generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(2, 9, 4, dtype=dtype)
    stock_cos, stock_sin = rotary(hidden, positions)
    for k in (k for k in (1, 2, 4) if all(width % k == 0 for width in sections)):
        cos, sin = SubBandRotary(sections, k)(rotary, hidden, positions[..., None].expand(-1, -1, -1, k))
        assert cos.dtype == dtype and torch.equal(cos, stock_cos) and torch.equal(sin, stock_sin)


def test_sub_band_rotation_matches_a_hand_computation():
    model, _ = wide_qwen("tiny-qwen2-vl", [4, 2, 2])  # head_dim 16: 8 frequency pairs, 4 for t, 2 for h, 2 for w
    rotary = model.model.language_model.rotary_emb
    members = torch.tensor([[3, 7], [11, 2], [5, 13]])  # (t, h, w) of member 0 and member 1, as [axis, member]
    cos, sin = SubBandRotary([4, 2, 2], 2)(rotary, torch.zeros(1, 1, 16), members[:, None, None, :])
    # pairs 0,1: t of member 0; pairs 2,3: t of member 1; pair 4: h of member 0; 5: h of 1; 6: w of 0; 7: w of 1
    per_pair = torch.tensor([3.0, 3.0, 7.0, 7.0, 11.0, 2.0, 5.0, 13.0])
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).double() / 16)
    angle = per_pair.double() * inv_freq
    torch.testing.assert_close(cos[0, 0].double(), torch.cat([angle.cos(), angle.cos()]), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[0, 0].double(), torch.cat([angle.sin(), angle.sin()]), atol=1e-6, rtol=0)


def test_bad_options_and_models_are_refused_at_load():
    with pytest.raises(InputError, match=r"ppe_k=2 cannot split this model's mrope_section=\[2, 1, 1\].*one of \[1\]"):
        tokenomy.load("tiny-qwen2-vl", "ppe:ppe_k=2")
    with pytest.raises(InputError, match="ppe_k=8 cannot split"):
        tokenomy.load("tiny-qwen2.5-vl", "ppe")  # the official K=8 needs Qwen's real [16, 24, 24]
    with pytest.raises(InputError, match="ppe_k=8 cannot split this model's 4 rotary frequency pairs.*one of \\[1, 2, 4\\]"):
        tokenomy.load("tiny-llava", "ppe")  # 1-D RoPE: one band of head_dim / 2 pairs
    with pytest.raises(InputError, match="needs position_policy='multi'"):
        tokenomy.load("tiny-qwen2-vl", "ppe:ppe_k=1", position_policy="keep")
    for options, message in [(dict(ratio=0), "ratio"), (dict(ratio=1.5), "ratio"), (dict(ppe_k=0), "ppe_k"),
                             (dict(knn=0), "knn"), (dict(order="score"), "order"), (dict(backend="cuda"), "backend"),
                             (dict(merger="pact"), "merger must be one of")]:
        with pytest.raises(InputError, match=message):
            PPE(**options)
    with pytest.raises(InputError, match="positions must be one of \\['code', 'paper'\\]"):
        PPECascade(positions="figure")
    with pytest.raises(InputError, match="layers"):
        PPECascade(layers="a/b")
    with pytest.raises(InputError, match="ppe-cascade layer 4 must be in 1..3"):
        tokenomy.load("tiny-qwen2-vl", "ppe:ppe_k=1+ppe-cascade:ppe_k=1,layers=2/4")


# ---- the reducer on tensors -------------------------------------------------------------------------------------

def video_tokens(frames=3, h=4, w=5, dim=12, seed=0):
    """Tokens of a video's merged grid: every t is one super-frame (2 frames)."""
    positions = grid_positions(frames, h, w)
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(h * w, dim, generator=generator).repeat(frames, 1) + 0.3 * torch.randn(frames * h * w, dim, generator=generator)
    return ImageTokens(features, positions)


def test_each_super_frame_is_clustered_alone_in_centre_order():
    image = video_tokens()
    selection = PPE(ppe_k=4).select(image)
    per_frame = 20
    count = math.ceil(per_frame * 0.45)
    assert selection.num_kept == 3 * count and selection.positions.shape == (3 * count, 4, 3)
    for frame in range(3):
        tokens = slice(frame * per_frame, (frame + 1) * per_frame)
        want = dpc_knn(image.features[tokens][None], count, 5)
        slots = slice(frame * count, (frame + 1) * count)
        assert torch.equal(selection.kept[slots], want.centres[0] + frame * per_frame)
        assert torch.equal(selection.merge_index[tokens], want.assign[0] + frame * count)
        torch.testing.assert_close(selection.apply(image.features)[slots], want.merged[0])
        assert bool((selection.positions[slots, :, 0] == frame).all())  # members never cross super-frames
    for slot in range(selection.num_kept):
        members = torch.nonzero(selection.merge_index == slot).squeeze(1)
        assert torch.equal(selection.positions[slot], image.positions[member_cycle(members, 4)])


def test_tome_as_the_base_merger():
    image = video_tokens(frames=2, seed=1)
    selection = PPE(ppe_k=2, merger="tome").select(image)
    assert selection.num_kept == 2 * 9
    merged = selection.apply(image.features)
    for slot in range(selection.num_kept):
        members = torch.nonzero(selection.merge_index == slot).squeeze(1)
        assert int(selection.kept[slot]) == int(members[0])  # the slot of its first member, slots in raster order
        assert len(set(image.positions[members, 0].tolist())) == 1
        assert torch.equal(selection.positions[slot], image.positions[member_cycle(members, 2)])
    assert bool((selection.kept.diff() > 0).all())
    # ToMe's own size-weighted rounds give the same merged tokens
    features = image.features[:20]
    y, size = features[None], None
    while y.shape[1] > 9:
        plan = dispatch.match(y, min(y.shape[1] - 9, (y.shape[1] + 1) // 2))
        y, size = dispatch.merge(y, plan, size)
    assign = tome_assignment(features, 9)
    for row in range(9):
        torch.testing.assert_close(y[0, row], features[assign == row].mean(0))
        slot = int(selection.merge_index[int(torch.nonzero(assign == row)[0])])
        torch.testing.assert_close(merged[slot], y[0, row])


def test_member_positions_follow_the_official_order_and_cycle():
    assert member_cycle(torch.tensor([2, 5, 9, 11, 30]), 4).tolist() == [30, 11, 9, 5]
    assert member_cycle(torch.tensor([3, 8]), 4).tolist() == [8, 3, 8, 3]
    assert member_cycle(torch.tensor([6]), 2).tolist() == [6, 6]


def test_raster_order_and_keep_budget():
    image = video_tokens()
    centre = PPE(ppe_k=2).select(image)
    raster = PPE(ppe_k=2, order="raster").select(image)
    assert torch.equal(raster.kept, torch.sort(centre.kept).values)
    torch.testing.assert_close(raster.apply(image.features), centre.apply(image.features)[torch.argsort(centre.kept)])
    budget = PPE(keep=10, ppe_k=2).select(image)
    assert budget.num_kept == 10 and torch.bincount(budget.positions[:, 0, 0]).tolist() == [4, 3, 3]
    assert split_budget([20, 20, 20], 10) == [4, 3, 3] and split_budget([2, 9], 8) == [2, 6]


def test_cascade_code_variant_keeps_the_last_members_positions():
    first = video_tokens()
    selection = PPE(ppe_k=2).select(first)
    merged = ImageTokens(selection.apply(first.features), selection.positions, layer=2)
    again = PPECascade(ppe_k=2, layers=2).select(merged)
    assert again.num_kept == 3 * math.ceil(9 * 0.45)
    for slot, kept in enumerate(again.kept.tolist()):
        members = torch.nonzero(again.merge_index == slot).squeeze(1)
        assert kept == int(members[-1])  # the cluster sits in its last member's slot ...
        assert torch.equal(again.positions[slot], merged.positions[kept])  # ... and keeps that slot's K positions
    assert bool((again.kept.diff() > 0).all())  # the LLM site keeps sequence order
    single = PPECascade(ppe_k=2, layers=2).select(ImageTokens(first.features, first.positions, layer=2))
    assert torch.equal(single.positions, first.positions[single.kept][:, None].expand(-1, 2, -1))


def test_nan_features_do_not_break_the_clustering():
    image = video_tokens(frames=1)
    image.features[3] = float("nan")
    selection = PPE(ppe_k=1).select(image)
    assert selection.num_kept == 9 and bool((selection.merge_index >= 0).all())


def test_cascade_keep_budget_is_what_the_last_layer_reads():
    cascade = PPECascade(keep=5, ppe_k=1)
    assert cascade.llm_layers(6) == (1, 3, 5)
    image = video_tokens(frames=1)  # 20 tokens
    counts = []
    for layer in (1, 3, 5):
        selection = cascade.select(ImageTokens(image.features, image.positions, layer=layer))
        counts.append(selection.num_kept)
        image = ImageTokens(selection.apply(image.features), selection.positions[:, 0])
    assert counts == [9, 5, 5]  # ratio 0.45 until the budget, never below it, exactly it at the last layer


def test_default_cascade_layers_are_the_official_ones_for_36_layers():
    assert PPECascade().llm_layers(36) == (11, 23, 35)
    assert PPECascade().llm_layers(4) == (1, 3)


# ---- end to end -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,sections,ppe_k", [("tiny-qwen2-vl", [4, 2, 2], 2), ("tiny-qwen2.5-vl", [4, 2, 2], 2),
                                                   ("tiny-qwen2.5-vl", [8, 4, 4], 4)])
def test_ppe_end_to_end(family, sections, ppe_k):
    model, processor = wide_qwen(family, sections)
    pipeline = Pipeline(model, processor, f"ppe:ppe_k={ppe_k}")
    generations = check_plan(pipeline)
    for g in generations:
        assert g.stats["position_policy"] == "multi"
        assert g.stats["visual_tokens_kept"] == math.ceil(g.stats["visual_tokens_in"] * 0.45)
    # each merged token's K member positions reach the LLM as their reference M-RoPE ids
    _, _, info = pipeline.prepare(random_images(1), PROMPTS[:1])
    inputs, (encoded,), (final,) = info["inputs"], info["encoded"], info["final"]
    reference = pipeline.adapter.reference_positions(info["batch"])
    spans = (info["batch"]["input_ids"][0] == pipeline.adapter.image_token_id).nonzero().squeeze(1)
    expected = reference[:, 0][:, spans[encoded.offsets(final.positions)]]
    assert torch.equal(inputs.multi_position_ids[:, 0, inputs.visual_slots[0][0]], expected)
    assert (final.positions[:, 0] != final.positions[:, -1]).any(), "some merged tokens should carry distinct positions"


def test_one_dimensional_rope_llava_end_to_end():
    # PPE is published for M-RoPE; on LLaVA's 1-D RoPE the one band of frequency pairs is split into K sub-bands
    generations = check_plan(tokenomy.load("tiny-llava", "ppe:ppe_k=2+ppe-cascade:ppe_k=2,layers=2"))
    for g in generations:
        first = math.ceil(49 * 0.45)
        assert g.stats["visual_tokens_per_layer"] == [first, first, math.ceil(first * 0.45), math.ceil(first * 0.45)]


def test_tome_merger_end_to_end():
    model, processor = wide_qwen("tiny-qwen2-vl", [4, 2, 2])
    for g in check_plan(Pipeline(model, processor, "ppe:ppe_k=2,merger=tome+ppe-cascade:ppe_k=2,layers=2,merger=tome")):
        assert [s["reducer"] for s in g.stats["stages"]] == ["ppe", "ppe-cascade"]


@pytest.mark.parametrize("family", FAMILIES)
def test_ppe_with_cascade_end_to_end(family):
    model, processor = wide_qwen(family, [4, 2, 2])
    pipeline = Pipeline(model, processor, "ppe:ppe_k=2+ppe-cascade:ppe_k=2,layers=1/3")
    for g in check_plan(pipeline):
        first = math.ceil(g.stats["visual_tokens_in"] * 0.45)
        second = math.ceil(first * 0.45)
        assert g.stats["visual_tokens_per_layer"] == [first, second, second, math.ceil(second * 0.45)]
        assert [s["reducer"] for s in g.stats["stages"]] == ["ppe", "ppe-cascade"]


def test_triton_backend_selects_what_the_reference_selects():
    image = video_tokens(frames=2, seed=3)
    want = PPE(ppe_k=2, backend="torch").select(image)
    got = PPE(ppe_k=2, backend="triton").select(image)
    assert torch.equal(got.kept, want.kept) and torch.equal(got.merge_index, want.merge_index)
    assert torch.equal(got.positions, want.positions)


def test_registered():
    assert {"ppe", "ppe-cascade"} <= set(tokenomy.reducers.available())
    assert ppe_module.PPE.name == "ppe"


def test_round_robin_fills_the_slots_as_the_paper_figure_draws_them():
    def at(*rows):  # 1-D positions written as (0, 0, w)
        return torch.tensor([[0, 0, r] for r in rows])

    # the figure: {2, 6} (cycled to K=4) and {7, 5, 9, 14} -> {2, 7, 6, 5}
    members = torch.stack([at(2, 6, 2, 6), at(7, 5, 9, 14)])
    assert round_robin(members, 4)[:, 2].tolist() == [2, 7, 6, 5]
    assert round_robin(torch.stack([at(3, 3), at(3, 3)]), 2)[:, 2].tolist() == [3, 3]  # one distinct position
    assert round_robin(at(1, 4, 8), 4)[:, 2].tolist() == [1, 4, 8, 1]  # single positions cycle


@pytest.mark.parametrize("family", FAMILIES)
def test_paper_variant_gives_merged_slots_the_rotary_of_their_new_positions(family):
    model, processor = wide_qwen(family, [4, 2, 2])
    pipeline = Pipeline(model, processor, "ppe:ppe_k=2+ppe-cascade:ppe_k=2,layers=2,positions=paper")
    check_plan(pipeline)
    images = random_images(1)
    llm_kwargs, context, info = pipeline.prepare(images, PROMPTS[:1])
    seen = {}

    def capture(module, args, kwargs):
        seen.setdefault("cos", kwargs["position_embeddings"][0].clone())

    with context, torch.no_grad():  # registered after the LLM-site hooks, so it sees what layer 3 reads
        handle = pipeline.adapter.decoder_layers[3].register_forward_pre_hook(capture, with_kwargs=True)
        pipeline.model(**llm_kwargs, use_cache=True)
    handle.remove()
    image = context.samples[0].images[0]
    at = torch.nonzero(context.cache_layout[3][0][:, None] == image["slots"][None])[:, 0]
    (encoded,) = info["encoded"]
    reference = pipeline.adapter.reference_positions(info["batch"])
    spans = (info["batch"]["input_ids"][0] == pipeline.adapter.image_token_id).nonzero().squeeze(1)
    ids = reference[:, 0][:, spans[encoded.offsets(image["positions"])]]  # [3, tokens, K]
    rotary = pipeline.adapter.language_model.rotary_emb
    want, _ = SubBandRotary([4, 2, 2], 2)(rotary, torch.zeros(1, 1, 16), ids[:, None])
    assert torch.equal(seen["cos"][0, at], want[0])
    code = Pipeline(model, processor, "ppe:ppe_k=2+ppe-cascade:ppe_k=2,layers=2")
    _, code_context, _ = code.prepare(images, PROMPTS[:1])
    with code_context, torch.no_grad():
        code.model(**code.prepare(images, PROMPTS[:1])[0], use_cache=True)
    assert not torch.equal(code_context.samples[0].images[0]["positions"], image["positions"]), "no slot moved"
