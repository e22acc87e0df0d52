"""Foundation checks: identity with stock transformers, batch invariance, budgets, and the in-LLM hook."""
import pytest
import torch

import tokenomy
from tokenomy.errors import InputError
from tests.conftest import random_images

FAMILIES = ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl"]
PROMPTS = ["What is it?", "Describe the picture in detail, please.", "<image>\nWhich colour dominates?"]


def stock_inputs(pipeline, images, prompts):
    _, _, info = pipeline.prepare(images, prompts)
    return info["batch"]


@pytest.mark.parametrize("family", FAMILIES)
def test_none_reducer_logits_equal_stock_model(family):
    pipeline = tokenomy.load(family, "none")
    images = random_images(1)
    batch = stock_inputs(pipeline, images, PROMPTS[:1])
    with torch.no_grad():
        stock = pipeline.model(**batch).logits
    ours = pipeline.forward(images, PROMPTS[:1])
    assert ours.shape == stock.shape
    assert (ours - stock).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_none_reducer_greedy_equals_model_generate_with_padding(family):
    pipeline = tokenomy.load(family, "none")
    images = random_images(2)
    batch = stock_inputs(pipeline, images, PROMPTS[:2])
    assert batch["attention_mask"].min() == 0, "the two prompts should need left padding"
    with torch.no_grad():
        stock = pipeline.model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=pipeline.adapter.tokenizer.pad_token_id)
    stock_new = stock[:, batch["input_ids"].shape[1]:].tolist()
    ours = pipeline.generate(images, PROMPTS[:2], max_new_tokens=6)
    for generation, row in zip(ours, stock_new):
        assert generation.token_ids == row[: len(generation.token_ids)]
        assert len(generation.token_ids) == 6 or row[len(generation.token_ids)] == pipeline.adapter.tokenizer.eos_token_id


CASES = [(family, reducer) for family in FAMILIES for reducer in ("none", "random", "vtc-cls", "fastv")
         if not (family.startswith("tiny-qwen") and reducer == "vtc-cls")]


@pytest.mark.parametrize("family,reducer", CASES)
def test_batch_equals_single_runs(family, reducer):
    pipeline = tokenomy.load(family, reducer, **({} if reducer == "none" else {"keep": 6}))
    images = random_images(3)
    batched = pipeline.generate(images, PROMPTS, max_new_tokens=5)
    for image, prompt, together in zip(images, PROMPTS, batched):
        (alone,) = pipeline.generate([image], [prompt], max_new_tokens=5)
        assert alone.token_ids == together.token_ids
        assert alone.stats["kept_indices"] == together.stats["kept_indices"]
        assert alone.stats["visual_tokens_kept"] == together.stats["visual_tokens_kept"]


def _captured_embeds(pipeline, images, prompts):
    shapes = []
    handle = pipeline.adapter.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(kwargs["inputs_embeds"].shape), with_kwargs=True
    )
    try:
        generations = pipeline.generate(images, prompts, max_new_tokens=1)
    finally:
        handle.remove()
    return shapes[0], generations


@pytest.mark.parametrize("family,reducer", [("tiny-llava", "random"), ("tiny-llava", "vtc-cls"), ("tiny-qwen2-vl", "random"),
                                            ("tiny-llava-next", "vtc-cls")])
def test_exactly_keep_visual_tokens_enter_the_llm(family, reducer):
    images = random_images(1)
    full_shape, full = _captured_embeds(tokenomy.load(family, "none"), images, PROMPTS[:1])
    keep = 7
    shape, reduced = _captured_embeds(tokenomy.load(family, reducer, keep=keep), images, PROMPTS[:1])
    removed = full[0].stats["visual_tokens_in"] - keep
    assert shape[1] == full_shape[1] - removed
    assert reduced[0].stats["visual_tokens_kept"] == keep
    assert reduced[0].stats["prefill_tokens"] == shape[1]
    assert all(len(kept) == keep for kept in reduced[0].stats["kept_indices"])


def test_keep_at_least_available_prunes_nothing():
    images = random_images(1)
    (generation,) = tokenomy.load("tiny-llava", "vtc-cls", keep=10_000).generate(images, PROMPTS[:1], max_new_tokens=3)
    (baseline,) = tokenomy.load("tiny-llava", "none").generate(images, PROMPTS[:1], max_new_tokens=3)
    assert generation.stats["visual_tokens_kept"] == generation.stats["visual_tokens_in"] == 49
    assert generation.token_ids == baseline.token_ids


def test_vtc_cls_under_sdpa_matches_eager_attention_maps():
    pipeline = tokenomy.load("tiny-llava", "vtc-cls", keep=10, start_layer=0)
    images = random_images(3)
    generations = pipeline.generate(images, PROMPTS, max_new_tokens=1)
    batch = stock_inputs(pipeline, images, PROMPTS)
    tower = pipeline.model.model.vision_tower
    assert tower.config._attn_implementation == "sdpa"
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = tower(batch["pixel_values"], output_attentions=True).attentions
    finally:
        tower.set_attn_implementation("sdpa")
    feature_layer = len(attentions) + pipeline.model.config.vision_feature_layer  # layers 0..feature_layer score
    scores = sum(attentions[layer].mean(dim=1)[:, 0, 1:] for layer in range(feature_layer + 1))
    for sample, generation in enumerate(generations):
        expected = torch.topk(scores[sample], 10).indices.sort().values.tolist()
        assert generation.stats["kept_indices"] == [expected]


def _cache_lengths(pipeline, images, prompts):
    llm_kwargs, context, _ = pipeline.prepare(images, prompts)
    with context, torch.no_grad():
        output = pipeline.model(**llm_kwargs, use_cache=True)
    return [layer.keys.shape[2] for layer in output.past_key_values.layers], llm_kwargs["inputs_embeds"].shape[1]


def test_fastv_shortens_the_cache_of_later_layers():
    images = random_images(1)
    pipeline = tokenomy.load("tiny-llava", "fastv", keep=5, layer=2)
    lengths, full = _cache_lengths(pipeline, images, PROMPTS[:1])
    assert lengths[:2] == [full, full]
    assert lengths[2:] == [full - (49 - 5)] * 2


def _masked_reference_greedy(pipeline, images, prompts, kept_per_sample, layer, steps):
    """Greedy decoding over the full sequence where layers >= `layer` cannot see the dropped visual keys."""
    llm_kwargs, _, info = pipeline.prepare(images, prompts)
    embeds, mask, positions = llm_kwargs["inputs_embeds"], llm_kwargs["attention_mask"], llm_kwargs["position_ids"]
    batch, length = mask.shape
    visible = mask.bool().clone()
    for sample, slots_per_image in enumerate(info["inputs"].visual_slots):
        for slots, kept in zip(slots_per_image, kept_per_sample[sample]):
            dropped = torch.ones(len(slots), dtype=torch.bool)
            dropped[kept] = False
            visible[sample, slots[dropped]] = False
    layers = pipeline.adapter.decoder_layers

    def mask_hook(module, args, kwargs):
        query = (args[0] if args else kwargs["hidden_states"]).shape[1]
        keys = visible_now.shape[1]
        allowed = visible_now[:, None, None, :].expand(batch, 1, query, keys).clone()
        allowed &= torch.ones(query, keys, dtype=torch.bool).tril(keys - query)[None, None]
        # Every row sees itself, so padding rows never face an empty softmax (their outputs are never read).
        allowed |= torch.ones(query, keys, dtype=torch.bool).tril(keys - query).triu(keys - query)[None, None]
        kwargs["attention_mask"] = allowed
        return args, kwargs

    handles = [layers[i].register_forward_pre_hook(mask_hook, with_kwargs=True) for i in range(layer, len(layers))]
    tokens = []
    try:
        with torch.no_grad():
            visible_now = visible
            out = pipeline.model(**llm_kwargs, use_cache=True)
            cache = out.past_key_values
            next_token = out.logits[:, -1].argmax(-1)
            for _ in range(steps - 1):
                tokens.append(next_token)
                visible_now = torch.cat([visible_now, torch.ones(batch, 1, dtype=torch.bool)], dim=1)
                mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
                positions = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
                out = pipeline.model(input_ids=next_token[:, None], attention_mask=mask, position_ids=positions[..., -1:],
                                     past_key_values=cache, use_cache=True)
                next_token = out.logits[:, -1].argmax(-1)
            tokens.append(next_token)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(tokens, dim=1).tolist()


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-qwen2-vl"])
def test_fastv_greedy_equals_explicit_masking_reference(family):
    images = random_images(2)
    pipeline = tokenomy.load(family, "fastv", keep=4, layer=2)
    generations = pipeline.generate(images, PROMPTS[:2], max_new_tokens=6, eos_token_id=None)
    kept = [generation.stats["kept_indices"] for generation in generations]
    reference = _masked_reference_greedy(pipeline, images, PROMPTS[:2], kept, layer=2, steps=6)
    assert [generation.token_ids for generation in generations] == reference


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-qwen2.5-vl"])
def test_fastv_eager_and_sdpa_agree(family):
    images = random_images(3)
    pipeline = tokenomy.load(family, "fastv", keep=4)
    sdpa = pipeline.generate(images, PROMPTS, max_new_tokens=5)
    pipeline.model.set_attn_implementation("eager")
    eager = pipeline.generate(images, PROMPTS, max_new_tokens=5)
    assert [g.token_ids for g in eager] == [g.token_ids for g in sdpa]
    assert [g.stats["kept_indices"] for g in eager] == [g.stats["kept_indices"] for g in sdpa]


def test_local_folder_round_trip(tmp_path):
    pipeline = tokenomy.load("tiny-llava", "none")
    pipeline.model.save_pretrained(tmp_path)
    pipeline.processor.save_pretrained(tmp_path)
    reloaded = tokenomy.load(str(tmp_path), "none")
    images = random_images(1)
    assert torch.allclose(reloaded.forward(images, PROMPTS[:1]), pipeline.forward(images, PROMPTS[:1]), atol=1e-6)


def test_pre_llm_pruning_with_kept_positions_equals_masking_the_dropped_tokens():
    images = random_images(2)
    pruned = tokenomy.load("tiny-llava", "random", keep=6, position_policy="keep")
    generations = pruned.generate(images, PROMPTS[:2], max_new_tokens=5, eos_token_id=None)
    llm_kwargs, _, _ = pruned.prepare(images, PROMPTS[:2])
    assert (llm_kwargs["position_ids"].diff(dim=-1) > 1).any(), "kept positions should leave gaps"
    kept = [generation.stats["kept_indices"] for generation in generations]
    reference = _masked_reference_greedy(tokenomy.load("tiny-llava", "none"), images, PROMPTS[:2], kept, layer=0, steps=5)
    assert [generation.token_ids for generation in generations] == reference


def test_unsupported_position_policies_are_refused_at_load():
    with pytest.raises(InputError, match="'multi' needs a stage that supplies a multi-position rotary"):
        tokenomy.load("tiny-llava", "random", keep=6, position_policy="multi")
    with pytest.raises(InputError, match="'contiguous' is not supported by qwen2-vl models"):
        tokenomy.load("tiny-qwen2-vl", "random", keep=6, position_policy="contiguous")
