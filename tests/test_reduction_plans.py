"""Reduction plans: one small reducer per site, written here, run on every tiny family it applies to.

For each: a batch of 3 equals 3 single runs (kept indices and greedy tokens); SDPA and eager select the same tokens;
cached greedy decoding equals a no-cache recompute over the same kept sequence; the stats count exactly the tokens
each LLM layer saw.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import tokenomy
from tests.conftest import random_images
from tests.test_composed_pipeline import folder  # noqa: F401  the composed-model fixture
from tokenomy.errors import InputError, TokenomyError
from tokenomy.reducers import ImageTokens, Reducer, Selection, Site
from tokenomy.reducers.base import LAST_TEXT_ATTENTION, LLM_VALUES, top_k_sorted
from tokenomy.vision.base import MEAN_QUERY_ATTENTION, EncoderState, SignalRequest
from tokenomy.vlm.in_llm import LLMRun
from tokenomy.vlm.pipeline import Pipeline

PROMPTS = ["What is it?", "Describe the picture in detail, please.", "<image>\nWhich colour dominates?"]
TINY = ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl"]


def merge_into_nearest(image: ImageTokens, keep: int) -> Selection:
    """Keep the `keep` largest-norm tokens; every other token joins its most cosine-similar kept token."""
    k = min(keep, image.num_tokens)
    kept = top_k_sorted(image.features.float().norm(dim=-1), k)
    unit = F.normalize(image.features.float(), dim=-1)
    index = (unit @ unit[kept].T).argmax(dim=1)
    index[kept] = torch.arange(k)
    return Selection(kept, image.positions[kept], merge_index=index, merge_weight=torch.ones(image.num_tokens))


class EncoderPrune(Reducer):
    """Prunes after encoder layers 0 and 1 by the mean-query attention row of that layer."""

    name = "test-encoder-prune"
    site = Site.ENCODER

    def encoder_layers(self, num_layers, feature_layer):
        return (0, 1)

    def vision_request(self, num_layers, feature_layer):
        return SignalRequest.of(**{MEAN_QUERY_ATTENTION: (0, 1)})

    def select(self, image):
        target = max(self.keep, math.ceil(0.75 * image.num_tokens)) if image.layer == 0 else self.keep
        return Selection.from_indices(image, top_k_sorted(image.signals[MEAN_QUERY_ATTENTION][0], target))


class EncoderMerge(Reducer):
    name = "test-encoder-merge"
    site = Site.ENCODER

    def encoder_layers(self, num_layers, feature_layer):
        return (0,)

    def select(self, image):
        return merge_into_nearest(image, self.budget(image))


class PostProjectorMerge(Reducer):
    name = "test-post-projector-merge"
    site = Site.POST_PROJECTOR

    def select(self, image):
        return merge_into_nearest(image, self.budget(image))


class Progressive(Reducer):
    """Three LLM steps (two on a 3-layer LLM): by the last prompt token's attention at layer 1 and the last step, a
    merge by value vectors at layer 2."""

    name = "test-progressive"
    site = Site.LLM

    def llm_layers(self, num_layers):
        self.last = min(3, num_layers - 1)
        return tuple(range(1, self.last + 1))

    def llm_request(self, layer):
        return (LLM_VALUES,) if layer == 2 and layer != self.last else (LAST_TEXT_ATTENTION,)

    def select(self, image):
        if image.layer == self.last:
            return Selection.from_indices(image, top_k_sorted(image.signals[LAST_TEXT_ATTENTION], self.budget(image)))
        target = max(self.keep, math.ceil(0.8 * image.num_tokens))
        if image.layer == 2:
            return merge_into_nearest(ImageTokens(image.signals[LLM_VALUES], image.positions), target)
        return Selection.from_indices(image, top_k_sorted(image.signals[LAST_TEXT_ATTENTION], target))


class CacheCut(Reducer):
    name = "test-cache-cut"
    site = Site.LLM
    cuts_caches = True

    def llm_layers(self, num_layers):
        return (2,)

    def llm_request(self, layer):
        return (LAST_TEXT_ATTENTION,)

    def select(self, image):
        return Selection.from_indices(image, top_k_sorted(image.signals[LAST_TEXT_ATTENTION], self.budget(image)))


class RecordingRotary:
    """A test rotary for the multi policy: records the positions it is given, rotates by each token's first one."""

    def __init__(self):
        self.seen = []

    def __call__(self, rotary_emb, x, positions):
        self.seen.append(positions.clone())
        return rotary_emb.forward(x, positions[..., 0])


class MultiMerge(PostProjectorMerge):
    """Merges at the post-projector site; a merged token carries its kept slot's position and its first partner's."""

    positions_per_token = 2

    def __init__(self, keep=None):
        super().__init__(keep)
        self.rotary = RecordingRotary()

    def multi_rotary(self, text_config):
        return self.rotary

    def select(self, image):
        selection = merge_into_nearest(image, self.budget(image))
        partner = selection.kept.clone()
        for token, slot in enumerate(selection.merge_index.tolist()):
            if token not in selection.kept.tolist() and partner[slot] == selection.kept[slot]:
                partner[slot] = token
        if self.positions_per_token == 2:
            selection.positions = torch.stack([image.positions[selection.kept], image.positions[partner]], dim=1)
        return selection


def _load(family, folder, reducer, **kwargs):
    return tokenomy.load(folder if family == "composed" else family, reducer, **kwargs)


def recompute_greedy(pipeline, images, prompts, steps):
    """Greedy tokens from full no-cache forwards over prompt + generated tokens, with the kept sets of a cached
    prefill replayed at every step (decoded tokens are never pruned, and skip what earlier caches cut)."""
    llm_kwargs, context, info = pipeline.prepare(images, prompts)
    with torch.no_grad():
        with context:
            pipeline.model(**llm_kwargs, use_cache=True)
        record = context.record() if isinstance(context, LLMRun) else None
        embeds, mask, positions = llm_kwargs["inputs_embeds"], llm_kwargs["attention_mask"], llm_kwargs["position_ids"]
        tokens = []
        for _ in range(steps):
            run = pipeline.llm_context(info["inputs"], info["records"], replay=record)
            with run:
                logits = pipeline.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False).logits
            token = logits[:, -1].argmax(-1)
            tokens.append(token)
            embeds = torch.cat([embeds, pipeline.adapter.embed(token[:, None])], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = torch.cat([positions, positions[..., -1:] + 1], dim=-1)
    return torch.stack(tokens, dim=1).tolist()


def prefill_lengths(pipeline, images, prompts):
    """Tokens each decoder layer reads in the prefill, and each layer's cache length after it."""
    lengths, handles = [], []
    for layer in pipeline.adapter.decoder_layers:
        handles.append(layer.register_forward_hook(
            lambda module, args, out: lengths.append((out[0] if isinstance(out, tuple) else out).shape[1])))
    llm_kwargs, context, _ = pipeline.prepare(images, prompts)
    try:
        with context, torch.no_grad():
            output = pipeline.model(**llm_kwargs, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    cache = output.past_key_values if getattr(output, "past_key_values", None) is not None else output.cache
    return lengths[: len(pipeline.adapter.decoder_layers)], [layer.keys.shape[2] for layer in cache.layers]


def check_plan(pipeline, cut_layers=0):
    images = random_images(3)
    batched = pipeline.generate(images, PROMPTS, max_new_tokens=4, eos_token_id=None)
    for image, prompt, together in zip(images, PROMPTS, batched):
        (alone,) = pipeline.generate([image], [prompt], max_new_tokens=4, eos_token_id=None)
        assert alone.token_ids == together.token_ids
        assert alone.stats["kept_indices"] == together.stats["kept_indices"]
        assert alone.stats["visual_tokens_per_layer"] == together.stats["visual_tokens_per_layer"]
        assert alone.stats["stages"][0]["tokens_out"] == together.stats["stages"][0]["tokens_out"]
        # Stats: each layer read the prompt's text plus exactly the visual tokens the stats say it saw.
        stats = alone.stats
        seen, cached = prefill_lengths(pipeline, [image], [prompt])
        text = stats["prefill_tokens"] - stats["visual_tokens_per_layer"][0]
        assert seen == [text + visual for visual in stats["visual_tokens_per_layer"]]
        expected_cache = seen[:]
        for layer in range(cut_layers):
            expected_cache[layer] = seen[cut_layers]
        assert cached == expected_cache

    reference = recompute_greedy(pipeline, images, PROMPTS, steps=4)
    assert [g.token_ids for g in batched] == reference

    pipeline.model.set_attn_implementation("eager")
    try:
        eager = pipeline.generate(images, PROMPTS, max_new_tokens=4, eos_token_id=None)
    finally:
        pipeline.model.set_attn_implementation("sdpa")
    assert [g.stats["kept_indices"] for g in eager] == [g.stats["kept_indices"] for g in batched]
    assert [g.token_ids for g in eager] == [g.token_ids for g in batched]
    return batched


@pytest.mark.parametrize("family", TINY + ["composed"])
def test_encoder_layer_prune_at_two_layers(family, folder):  # noqa: F811
    pipeline = _load(family, folder, EncoderPrune(keep=5))
    generations = check_plan(pipeline)
    for g in generations:
        stage = g.stats["stages"][0]
        assert stage["site"] == "encoder" and stage["layers"] == [0, 1]
        kept = sum(len(indices) for indices in g.stats["kept_indices"])
        assert g.stats["visual_tokens_per_layer"] == [kept] * len(pipeline.adapter.decoder_layers)
        if family != "tiny-llava-next":  # LLaVA-NeXT keeps 5 per crop, less what unpadding drops
            assert all(len(indices) == 5 for indices in g.stats["kept_indices"])


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-llava-next", "composed"])
def test_encoder_layer_merge(family, folder):  # noqa: F811
    generations = check_plan(_load(family, folder, EncoderMerge(keep=6)))
    if family != "tiny-llava-next":
        assert all(len(kept) == 6 for g in generations for kept in g.stats["kept_indices"])


def test_encoder_layer_merge_on_qwen_is_refused_by_name():
    pipeline = tokenomy.load("tiny-qwen2-vl", EncoderMerge(keep=6))
    with pytest.raises(InputError, match="merging tokens between Qwen vision blocks"):
        pipeline.generate(random_images(1), PROMPTS[:1], max_new_tokens=1)


@pytest.mark.parametrize("family", TINY + ["composed"])
def test_post_projector_merge(family, folder):  # noqa: F811
    generations = check_plan(_load(family, folder, PostProjectorMerge(keep=7)))
    assert all(g.stats["stages"][0]["site"] == "post_projector" for g in generations)


@pytest.mark.parametrize("family", TINY + ["composed"])
def test_three_step_progressive_llm_reduction(family, folder):  # noqa: F811
    generations = check_plan(_load(family, folder, Progressive(keep=3)))
    for g in generations:
        per_layer = g.stats["visual_tokens_per_layer"]
        assert per_layer[0] > per_layer[1] >= per_layer[-1] == 3 * len(g.stats["kept_indices"])
        assert g.stats["stages"][0]["layers"] == list(range(1, len(per_layer)))[:3]


@pytest.mark.parametrize("family", TINY + ["composed"])
def test_llm_step_that_cuts_earlier_caches(family, folder):  # noqa: F811
    check_plan(_load(family, folder, CacheCut(keep=4)), cut_layers=2)


@pytest.mark.parametrize("family,spec", [("tiny-llava", "vtc-cls:keep=12+fastv"), ("tiny-llava-next", "vtc-cls:keep=30+fastv"),
                                         ("composed", "vtc-cls:keep=12+fastv"), ("tiny-qwen2-vl", "random:keep=6+fastv"),
                                         ("tiny-qwen2.5-vl", "random:keep=6+fastv:layer=1")])
def test_stacked_pre_llm_and_llm_plan(family, spec, folder):  # noqa: F811
    generations = check_plan(_load(family, folder, spec, keep=3))
    for g in generations:
        pre, llm = g.stats["stages"]
        images = len(g.stats["kept_indices"])
        assert pre["site"] == "pre_projector" and llm["site"] == "llm"
        assert pre["tokens_out"] == llm["tokens_in"] and llm["tokens_out"] == 3 * images
        assert g.stats["visual_tokens_per_layer"][-1] == 3 * images
        assert g.stats["reducer"] == spec and g.stats["keep"] == 3


def test_stacked_plan_keeps_a_subset_of_what_the_first_stage_kept():
    images = random_images(1)
    (first,) = tokenomy.load("tiny-llava", "vtc-cls", keep=32).generate(images, PROMPTS[:1], max_new_tokens=1)
    (both,) = tokenomy.load("tiny-llava", "vtc-cls:keep=32+fastv", keep=16).generate(images, PROMPTS[:1], max_new_tokens=1)
    assert set(both.stats["kept_indices"][0]) < set(first.stats["kept_indices"][0])
    assert len(both.stats["kept_indices"][0]) == 16 and both.stats["visual_tokens_per_layer"] == [32, 32, 16, 16]


@pytest.mark.parametrize("family", TINY + ["composed"])
def test_multi_position_merge(family, folder):  # noqa: F811
    reducer = MultiMerge(keep=6)
    pipeline = _load(family, folder, reducer, position_policy="multi")
    generations = check_plan(pipeline)
    # The m positions arrive intact at the rotary: each merged token's two members' reference positions.
    reducer.rotary.seen.clear()
    images = random_images(1)
    llm_kwargs, context, info = pipeline.prepare(images, PROMPTS[:1])
    with context, torch.no_grad():
        pipeline.model(**llm_kwargs, use_cache=True)
    seen = reducer.rotary.seen[0]
    inputs, (encoded,), (final,) = info["inputs"], info["encoded"], info["final"]
    slots = inputs.visual_slots[0][0]
    reference = pipeline.adapter.reference_positions(info["batch"])
    spans = (info["batch"]["input_ids"][0] == pipeline.adapter.image_token_id).nonzero().squeeze(1)
    members = spans[encoded.offsets(final.positions)]  # [K, 2] placeholder positions of each token's members
    expected = reference[..., 0, members]
    got = seen[..., 0, slots, :]
    assert torch.equal(got, expected)
    assert (final.positions[:, 0] != final.positions[:, 1]).any(), "some tokens should carry two different positions"
    # A rotary that reads each token's first position equals the keep policy with those positions.
    kept = [g.stats["kept_indices"] for g in generations]
    single = MultiMerge(keep=6)
    single.positions_per_token = 1
    keep_policy = _load(family, folder, single, position_policy="keep")
    first_only = keep_policy.generate(random_images(3), PROMPTS, max_new_tokens=4, eos_token_id=None)
    assert [g.token_ids for g in first_only] == [g.token_ids for g in generations]
    assert [g.stats["kept_indices"] for g in first_only] == kept


@pytest.mark.parametrize("family", TINY + ["composed"])
def test_none_reducer_equals_stock_logits(family, folder):  # noqa: F811
    pipeline = _load(family, folder, "none")
    images = random_images(2)
    _, _, info = pipeline.prepare(images, PROMPTS[:2])
    with torch.no_grad():
        stock = pipeline.model(**info["batch"]).logits
    ours = pipeline.forward(images, PROMPTS[:2])
    assert (ours - stock).abs().max().item() <= 1e-5


@pytest.mark.parametrize("layer", [-3, -2, -1, 0, 1, 2, 3, [0, -1], [-2, 1]])
def test_vision_feature_layer_follows_transformers(layer):
    from tokenomy.vlm.tiny import build_tiny_llava

    model, processor = build_tiny_llava()
    model.config.vision_feature_layer = layer
    pipeline = Pipeline(model.eval(), processor, "none")
    if isinstance(layer, list):  # the projector reads concatenated layers: widen its input to match
        width = model.config.vision_config.hidden_size * len(layer)
        torch.manual_seed(1)
        model.model.multi_modal_projector.linear_1 = torch.nn.Linear(width, model.config.text_config.hidden_size)
    images = random_images(1)
    _, _, info = pipeline.prepare(images, PROMPTS[:1])
    with torch.no_grad():
        # output_hidden_states: transformers' own selection asks the tower for no hidden states at all for index 0
        stock = model(**info["batch"], output_hidden_states=True).logits
    assert (pipeline.forward(images, PROMPTS[:1]) - stock).abs().max().item() <= 1e-5


def test_vision_feature_layer_out_of_range_is_refused_at_load():
    from tokenomy.errors import ModelLoadError
    from tokenomy.vlm.tiny import build_tiny_llava

    model, processor = build_tiny_llava()
    model.config.vision_feature_layer = 4
    with pytest.raises(ModelLoadError, match="vision_feature_layer 4 is outside hidden_states"):
        Pipeline(model, processor, "none")


@pytest.mark.parametrize("spec,message", [
    ("", "non-empty"),
    ("vtc-cls:keep", "not of the form key=value"),
    ("vtc-cls:keep=3,keep=4", "given twice"),
    ("+fastv", "does not start with a reducer name"),
    ("nosuch+fastv", "unknown reducer 'nosuch'"),
    ("vtc-cls:bogus=1", "unknown option"),
    ("fastv+vtc-cls", "'vtc-cls' acts at the pre_projector site, which comes before the llm site of 'fastv'"),
])
def test_bad_specs_are_refused_naming_the_culprit(spec, message):
    with pytest.raises(TokenomyError, match=message):
        tokenomy.load("tiny-llava", spec, keep=4)


def test_encoder_stage_after_an_llm_stage_is_refused():
    with pytest.raises(InputError, match="encoder site, which comes before the llm site"):
        tokenomy.load("tiny-llava", [CacheCut(keep=4), EncoderPrune(keep=4)])


def test_keep_given_twice_and_llm_layer_out_of_range_are_refused():
    with pytest.raises(InputError, match="last stage sets keep=8 but keep=4"):
        tokenomy.load("tiny-llava", "vtc-cls:keep=16+fastv:keep=8", keep=4)
    with pytest.raises(InputError, match="fastv layer 4 must be in 1..3"):
        tokenomy.load("tiny-llava", "fastv", keep=4, layer=4)
    with pytest.raises(InputError, match="position_policy 'bogus'"):
        tokenomy.load("tiny-llava", "fastv", keep=4, position_policy="bogus")


def test_keep_with_the_identity_is_not_reported_as_a_budget():
    (generation,) = tokenomy.load("tiny-llava", "none", keep=8).generate(random_images(1), PROMPTS[:1], max_new_tokens=1)
    assert generation.stats["keep"] is None and generation.stats["visual_tokens_kept"] == 49


class KeepUnits(Reducer):
    """Keeps fixed merge units (every third one), at the encoder site after `layer` or before the projector."""

    name = "test-keep-units"

    def __init__(self, site, layer=None):
        super().__init__()
        self.site, self.layer = site, layer

    def encoder_layers(self, num_layers, feature_layer):
        return (self.layer,)

    def select(self, image):
        raster = image.positions[:, 1] * 100 + image.positions[:, 2]  # same units whatever order the tokens come in
        return Selection.from_indices(image, torch.nonzero(raster % 3 == 0).squeeze(1))


@pytest.mark.parametrize("family", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_qwen_units_pruned_after_the_last_block_equal_pruning_before_the_merger(family):
    """After the last block nothing else runs in the tower, so both sites must give the same tokens, TRUE M-RoPE
    positions included (the LLM sees the same ids for the same units)."""
    images = random_images(2)
    encoder = tokenomy.load(family, KeepUnits(Site.ENCODER, layer=1)).forward(images, PROMPTS[:2])
    before_merger = tokenomy.load(family, KeepUnits(Site.PRE_PROJECTOR)).forward(images, PROMPTS[:2])
    assert encoder.shape == before_merger.shape
    assert (encoder - before_merger).abs().max().item() <= 1e-5


def test_qwen_encoder_site_keeps_true_positions():
    pipeline = tokenomy.load("tiny-qwen2-vl", KeepUnits(Site.ENCODER, layer=0))
    images = random_images(1)
    (generation,) = pipeline.generate(images, PROMPTS[:1], max_new_tokens=1)
    llm_kwargs, _, info = pipeline.prepare(images, PROMPTS[:1])
    batch = info["batch"]
    span = (batch["input_ids"][0] == pipeline.adapter.image_token_id).nonzero().squeeze(1)
    reference = pipeline.adapter.reference_positions(batch)[:, 0, span]  # [3, units] of the unreduced image
    kept = torch.tensor(generation.stats["kept_indices"][0])
    slots = info["inputs"].visual_slots[0][0]
    assert torch.equal(llm_kwargs["position_ids"][1:, 0, slots], reference[:, kept])
    assert (kept.diff() > 1).any(), "kept units should leave gaps in the grid"


def test_qwen25_windows_are_recomputed_over_the_surviving_units():
    """A 3-block Qwen2.5-VL tower whose block 1 uses windows: pruning after block 0 equals running block 1 on each
    window's surviving patches alone."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.vision_utils import get_vision_window_index

    from transformers.vision_utils import get_vision_position_ids

    from tokenomy.vision.qwen_vit import QwenViTEncoder

    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2,
                                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}),
                              vision_config=dict(depth=3, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4,
                                                 patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                                                 fullatt_block_indexes=[2], in_channels=3))
    visual = Qwen2_5_VLForConditionalGeneration(config).eval().model.visual
    grid = torch.tensor([[1, 12, 8]])  # 6 x 4 units -> 2 x 2 windows of 2 x 2 units (3 x 2 windows in all)
    pixels = torch.randn(int(grid.prod()), 3 * 2 * 14 * 14)
    keep_units = torch.tensor([0, 2, 3, 5, 9, 10, 12, 17, 18, 23])
    captured = {}

    def prune(state: EncoderState):
        if state.layer != 0:
            return None
        captured["after_block0"] = state.hidden[0].clone()
        captured["units"] = state.patch_index[0].clone()
        keep = torch.isin(state.patch_index[0], keep_units)
        return EncoderState(0, state.hidden[:, keep], state.patch_index[:, keep], state.signals)

    ours = QwenViTEncoder(visual).encode_image(pixels, grid, SignalRequest(), hooks=(prune,)).tokens[0]

    # Reference: block 1 on each window's surviving patches alone, then block 2 on all of them.
    window_index, cu_window = get_vision_window_index(grid, 2, visual.window_size, visual.patch_size)
    units = captured["units"]
    hidden = captured["after_block0"].reshape(-1, 32)  # [patches, D] in window order
    cos_sin = visual.rotary_pos_emb(hidden, get_vision_position_ids(grid, 2, kwargs={}))
    permute = lambda x: visual.permute_input_for_window_attn(x, window_index, seq_len=x.shape[0])  # noqa: E731
    cos_sin = tuple(permute(part) for part in cos_sin)
    windows = torch.searchsorted(cu_window.long(), torch.arange(len(units)) * 4, right=True) - 1
    parts, rope_parts = [], []
    for window in windows.unique():
        slots = torch.nonzero((windows == window) & torch.isin(units, keep_units)).squeeze(1)
        if not len(slots):
            continue
        patches = (slots[:, None] * 4 + torch.arange(4)).reshape(-1)
        rope = tuple(part[patches] for part in cos_sin)
        with torch.no_grad():
            parts.append(visual.blocks[1](hidden[patches], cu_seqlens=torch.tensor([0, len(patches)], dtype=torch.int32),
                                          max_seqlen=len(patches), position_embeddings=rope))
        rope_parts.append(rope)
    hidden = torch.cat(parts)
    rope = tuple(torch.cat([r[i] for r in rope_parts]) for i in range(2))
    with torch.no_grad():
        hidden = visual.blocks[2](hidden, cu_seqlens=torch.tensor([0, len(hidden)], dtype=torch.int32),
                                  max_seqlen=len(hidden), position_embeddings=rope)
    kept_in_window_order = units[torch.isin(units, keep_units)]
    reference = hidden.reshape(-1, 4 * 32)[torch.argsort(kept_in_window_order)]
    assert torch.allclose(ours, reference, atol=1e-5)
