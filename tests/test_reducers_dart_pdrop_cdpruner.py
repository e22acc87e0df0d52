"""DART, PyramidDrop and CDPruner: selections equal their official formulas recomputed in NumPy, the signals and
context they read equal an independent forward, and each passes the reduction-plan checks on every tiny family."""
import numpy as np
import pytest
import torch

import tokenomy
from tests.conftest import random_images
from tests.test_composed_pipeline import folder  # noqa: F401  the composed-model fixture
from tests.test_reduction_plans import PROMPTS, TINY, _load, check_plan
from tokenomy.cli import main
from tokenomy.errors import InputError
from tokenomy.reducers import ImageTokens, Reducer, Selection, Site, create
from tokenomy.reducers.base import (
    FINAL_NORM,
    INSTRUCTION_EMBEDDINGS,
    LAST_TEXT_ATTENTION,
    LLM_KEYS,
    STEP_LAYER_LAST_TEXT_ATTENTION,
    TEXT_FEATURES,
    TEXT_LLM_KEYS,
)
from tokenomy.reducers.cdpruner import dpp_greedy_map
from tokenomy.reducers.registry import registered

KEEP = 6


def grid(n):
    return torch.stack([torch.zeros(n), torch.arange(n) // 8, torch.arange(n) % 8], dim=1).long()


# ---- DART ---------------------------------------------------------------------------------------------------------
def dart_reference(image_keys, text_keys, image_hidden, text_hidden, per_pivot, remainder=0, pivots=(4, 4)):
    """The official `get_retained_image_token` (DART, LLaVA code; reducers spec peers.md §4) in NumPy, on one image:
    pivots = top key-L1 image and text tokens, each pivot (ascending sequence index) takes the `per_pivot` candidates
    with the largest -cos of hidden states; image pivots kept, text pivots dropped. `remainder`: our exact-budget
    rule, the first pivots take one more."""
    def top(scores, k):
        return list(np.argsort(-scores, kind="stable")[:k])

    image_pivots = top(np.abs(image_keys).sum(-1), pivots[0])
    text_pivots = top(np.abs(text_keys).sum(-1), pivots[1])
    rows = [image_hidden[i] for i in sorted(image_pivots)] + [text_hidden[i] for i in sorted(text_pivots)]
    candidates = [i for i in range(len(image_hidden)) if i not in image_pivots]
    kept = set(image_pivots)
    for number, row in enumerate(rows):
        count = per_pivot + (number < remainder)
        pool = image_hidden[candidates]
        negative_cos = -(pool @ row) / (np.linalg.norm(pool, axis=1) * np.linalg.norm(row))
        chosen = [candidates[i] for i in np.argsort(-negative_cos, kind="stable")[:count]]
        kept.update(chosen)
        candidates = [c for c in candidates if c not in chosen]
    return sorted(kept)


def dart_tokens(n=40, text=7, dim=16, seed=0, norm=None):
    generator = np.random.default_rng(seed)
    image_keys, text_keys = generator.normal(size=(n, 12)), generator.normal(size=(text, 12))
    image_hidden, text_hidden = generator.normal(size=(n, dim)), generator.normal(size=(text, dim))
    context = {TEXT_FEATURES: torch.tensor(text_hidden, dtype=torch.float32)}
    if norm is not None:
        context[FINAL_NORM] = norm
    tokens = ImageTokens(torch.tensor(image_hidden, dtype=torch.float32), grid(n),
                         {LLM_KEYS: torch.tensor(image_keys), TEXT_LLM_KEYS: torch.tensor(text_keys)}, layer=2, context=context)
    return tokens, (image_keys, text_keys, image_hidden, text_hidden)


@pytest.mark.parametrize("keep, per_pivot, remainder", [(4 + 8 * 3, 3, 0), (4 + 8 * 3 + 5, 3, 5), (9, 0, 5)])
def test_dart_selection_equals_the_official_formula(keep, per_pivot, remainder):
    tokens, arrays = dart_tokens()
    kept = create("dart", keep=keep).select(tokens).kept.tolist()
    assert len(kept) == keep
    assert kept == dart_reference(*arrays, per_pivot=per_pivot, remainder=remainder)


def test_dart_compares_hidden_states_after_the_final_norm():
    weight = torch.linspace(0.1, 3.0, 16)
    tokens, (image_keys, text_keys, image_hidden, text_hidden) = dart_tokens(seed=3, norm=lambda x: x * weight)
    kept = create("dart", keep=20).select(tokens).kept.tolist()
    w = weight.numpy()
    assert kept == dart_reference(image_keys, text_keys, image_hidden * w, text_hidden * w, per_pivot=2, remainder=0)
    plain = dict(tokens.context)
    del plain[FINAL_NORM]
    unnormed = create("dart", keep=20).select(ImageTokens(tokens.features, tokens.positions, tokens.signals, layer=2, context=plain))
    assert unnormed.kept.tolist() != kept  # the norm's weight changes which tokens count as duplicates


def test_dart_without_text_pivots_and_bad_options():
    tokens, (image_keys, text_keys, image_hidden, text_hidden) = dart_tokens(seed=5)
    kept = create("dart", keep=16, pivot_text_tokens=0).select(tokens).kept.tolist()
    assert kept == dart_reference(image_keys, text_keys, image_hidden, text_hidden, per_pivot=3, pivots=(4, 0))
    with pytest.raises(InputError, match="pivot_image_tokens"):
        create("dart", pivot_image_tokens=0)
    with pytest.raises(InputError, match="dart layer 4"):
        create("dart", layer=4).llm_layers(4)


# ---- PyramidDrop --------------------------------------------------------------------------------------------------
def test_pdrop_layers_scale_to_the_model_depth():
    assert create("pdrop").llm_layers(32) == (8, 16, 24)
    assert create("pdrop").llm_layers(4) == (1, 2, 3)
    assert create("pdrop").llm_layers(24) == (6, 12, 18)
    assert create("pdrop", layers="2-8-16").llm_layers(32) == (2, 8, 16)
    assert create("pdrop").llm_layers(6) == (2, 3, 4)
    assert create("pdrop").llm_layers(3) == (1, 2)  # stages that land on one layer become one
    assert create("pdrop", layers=(20, 24), reference_depth=25).llm_layers(4) == (3,)
    with pytest.raises(InputError, match="pdrop layers"):
        create("pdrop", layers=(16, 8))
    with pytest.raises(InputError, match="pdrop ratio"):
        create("pdrop", ratio=0)
    with pytest.raises(InputError, match="at least 2 layers"):
        create("pdrop").llm_layers(1)


def pdrop_stages(reducer, scores_per_stage, layers, n):
    """Run the stages of one image: at stage s the scores are read at the tokens still alive."""
    alive = np.arange(n)
    counts = []
    for layer, scores in zip(layers, scores_per_stage):
        tokens = ImageTokens(torch.zeros(len(alive), 4), grid(n)[alive], {STEP_LAYER_LAST_TEXT_ATTENTION: torch.tensor(scores[alive])},
                             layer=layer)
        kept = reducer.select(tokens).kept.numpy()
        alive = alive[kept]
        counts.append(len(alive))
    return alive, counts


def test_pdrop_stages_equal_the_official_rank_and_drop():
    """Official `pdrop_rank_drop` (PyramidDrop llava/model/modeling_llama_pdrop.py L1285-1465): stage s keeps
    int(n0 * ratio ** s) image tokens, the top of the head-averaged last-instruction attention, sorted."""
    n, generator = 100, np.random.default_rng(1)
    scores = [generator.random(n) for _ in range(3)]
    reducer = create("pdrop", ratio=0.5)
    layers = reducer.llm_layers(32)
    alive, counts = pdrop_stages(reducer, scores, layers, n)
    expected = np.arange(n)
    for stage, stage_scores in enumerate(scores, start=1):
        keep_length = int(n * 0.5 ** stage)
        local = stage_scores[expected]
        expected = expected[np.sort(np.argsort(-local, kind="stable")[:keep_length])]
    assert counts == [50, 25, 12]
    assert alive.tolist() == expected.tolist()


def test_pdrop_keep_is_the_last_stage_count():
    reducer = create("pdrop", keep=64)
    layers = reducer.llm_layers(32)
    scores = [np.random.default_rng(seed).random(576) for seed in range(3)]
    _, counts = pdrop_stages(reducer, scores, layers, 576)
    ratio = (64 / 576) ** (1 / 3)
    assert counts[-1] == 64
    assert counts[0] == int(576 * ratio) and counts[1] == int(counts[0] * (64 / counts[0]) ** 0.5)


# ---- CDPruner -----------------------------------------------------------------------------------------------------
def cdpruner_reference(features, instruction, k):
    """The official `encode_images` (CDPruner llava/model/llava_arch.py L141-189) in NumPy for one image, with the
    instruction rows in place of the CLIP text embeds and the projector outputs in place of the CLIP image embeds."""
    image = features / np.linalg.norm(features, axis=-1, keepdims=True)
    similarity = image @ image.T
    text = instruction / np.linalg.norm(instruction, axis=-1, keepdims=True)
    relevance = (-(image @ text.T)).mean(-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance[:, None] * similarity * relevance[None, :]
    n = len(features)
    cis, di2s, picked = np.zeros((k, n)), np.diag(kernel).copy(), []
    for i in range(k):
        j = int(np.argmax(di2s))
        picked.append(j)
        eis = (kernel[j] - cis[:i, j] @ cis[:i]) / np.sqrt(di2s[j])
        cis[i] = eis
        di2s -= eis ** 2
        di2s[j] = -np.inf
    return sorted(picked)


def cdpruner_tokens(n=30, dim=12, text=5, seed=0):
    generator = np.random.default_rng(seed)
    features, instruction = generator.normal(size=(n, dim)), generator.normal(size=(text, dim))
    tokens = ImageTokens(torch.tensor(features, dtype=torch.float32), grid(n),
                         context={INSTRUCTION_EMBEDDINGS: torch.tensor(instruction, dtype=torch.float32)})
    return tokens, features, instruction


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cdpruner_selection_equals_the_official_greedy_map(seed):
    tokens, features, instruction = cdpruner_tokens(seed=seed)
    kept = create("cdpruner", keep=10, negate_relevance=True).select(tokens).kept.tolist()
    assert kept == cdpruner_reference(features, instruction, 10)
    # our default reads the LLM-space similarity with its own sign: the official formula on the negated instruction
    ours = create("cdpruner", keep=10).select(tokens).kept.tolist()
    assert ours == cdpruner_reference(features, -instruction, 10)


def test_greedy_map_adds_the_token_that_maximises_the_determinant():
    """Each fast greedy MAP step (Chen et al. 2018) adds argmax_j det(L[picked + j]); checked by brute force."""
    basis = np.random.default_rng(4).normal(size=(12, 6))
    kernel = basis @ basis.T
    picked = []
    for _ in range(5):
        gains = [np.linalg.det(kernel[np.ix_(picked + [j], picked + [j])]) if j not in picked else -np.inf for j in range(12)]
        picked.append(int(np.argmax(gains)))
    assert dpp_greedy_map(torch.tensor(kernel), 5).tolist() == picked


def test_cdpruner_without_instruction_keeps_a_diverse_set():
    """No instruction: r = 1, pure diversity; a duplicated token is never kept twice while others are left."""
    features = torch.tensor(np.random.default_rng(5).normal(size=(10, 12)), dtype=torch.float32)
    features[7] = features[2]
    kept = create("cdpruner", keep=9).select(ImageTokens(features, grid(10))).kept.tolist()
    assert len(kept) == 9 and not {2, 7} <= set(kept)


def test_cdpruner_is_nan_safe_and_checks_its_option():
    tokens, _, _ = cdpruner_tokens()
    tokens.features[3] = float("nan")
    kept = create("cdpruner", keep=8).select(tokens).check(tokens, "cdpruner").kept
    assert kept.numel() == 8
    with pytest.raises(InputError, match="negate_relevance"):
        create("cdpruner", negate_relevance="yes")


# ---- what the sites hand over, against an independent forward ------------------------------------------------------
class Recorder(Reducer):
    """Keeps everything and records what it was given."""

    def __init__(self, keep=None):
        super().__init__(keep)
        self.seen = []

    def select(self, image):
        self.seen.append(image)
        return Selection.keep_all(image)


class LLMRecorder(Recorder):
    name, site = "test-llm-recorder", Site.LLM

    def llm_layers(self, num_layers):
        return (2,)

    def llm_request(self, layer):
        return (LLM_KEYS, TEXT_LLM_KEYS, LAST_TEXT_ATTENTION, STEP_LAYER_LAST_TEXT_ATTENTION)


class PostProjectorRecorder(Recorder):
    name, site = "test-post-projector-recorder", Site.POST_PROJECTOR


def test_llm_signals_and_text_features_equal_a_plain_eager_forward():
    """Before layer 2: keys and the last token's attention row of layer 1 (on its input), the same row of layer 2
    itself (STEP_LAYER_...), and the hidden states entering layer 2, against transformers' own eager forward."""
    recorder = LLMRecorder()
    pipeline = tokenomy.load("tiny-llava", recorder)
    image, prompt = random_images(1), ["Describe the picture in detail, please."]
    llm_kwargs, context, info = pipeline.prepare(image, prompt)
    with torch.no_grad():
        with context:
            pipeline.model(**llm_kwargs, use_cache=False)
        pipeline.model.set_attn_implementation("eager")
        plain = pipeline.model(**llm_kwargs, output_hidden_states=True, output_attentions=True, use_cache=False)
        pipeline.model.set_attn_implementation("sdpa")
    seen = recorder.seen[0]
    is_image = info["batch"]["input_ids"][0] == pipeline.model.config.image_token_id
    image_at = torch.nonzero(is_image).squeeze(1)
    text_at = torch.arange(int(image_at.max()) + 1, is_image.shape[0])
    layer = pipeline.adapter.decoder_layers[1]
    normed = layer.input_layernorm(plain.hidden_states[1])
    keys = layer.self_attn.k_proj(normed).view(1, normed.shape[1], -1, layer.self_attn.head_dim).transpose(1, 2)
    cos, sin = pipeline.adapter.language_model.rotary_emb(normed, llm_kwargs["position_ids"])
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    keys, _ = apply_rotary_pos_emb(keys, keys, cos, sin)
    repeat = pipeline.adapter.text_config.num_attention_heads // keys.shape[1]
    keys = keys.repeat_interleave(repeat, dim=1)[0].transpose(0, 1).reshape(normed.shape[1], -1)
    torch.testing.assert_close(seen.signals[LLM_KEYS], keys[image_at].float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen.signals[TEXT_LLM_KEYS], keys[text_at].float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen.context[TEXT_FEATURES], plain.hidden_states[2][0, text_at], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen.features, plain.hidden_states[2][0, image_at], rtol=1e-4, atol=1e-5)
    assert seen.context[FINAL_NORM] is pipeline.adapter.language_model.norm
    for layer, name in ((1, LAST_TEXT_ATTENTION), (2, STEP_LAYER_LAST_TEXT_ATTENTION)):
        row = plain.attentions[layer][0, :, -1].float().mean(0)
        torch.testing.assert_close(seen.signals[name], row[image_at], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(seen.signals[LAST_TEXT_ATTENTION], seen.signals[STEP_LAYER_LAST_TEXT_ATTENTION])


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-qwen2-vl"])
def test_post_projector_context_holds_each_samples_instruction_embeddings(family):
    recorder = PostProjectorRecorder()
    pipeline = tokenomy.load(family, recorder)
    pipeline.prepare(random_images(2), PROMPTS[1:])
    assert len(recorder.seen) == 2
    for seen, prompt in zip(recorder.seen, PROMPTS[1:]):
        ids = pipeline.adapter.tokenizer(prompt.replace("<image>", " "), add_special_tokens=False)["input_ids"]
        expected = pipeline.adapter.embed(torch.tensor(ids))
        torch.testing.assert_close(seen.context[INSTRUCTION_EMBEDDINGS], expected)


# ---- the reduction-plan checks on every family ----------------------------------------------------------------------
@pytest.mark.parametrize("family", TINY + ["composed"])
@pytest.mark.parametrize("name", ["dart", "pdrop", "cdpruner"])
def test_plan_checks(name, family, folder):  # noqa: F811
    pipeline = _load(family, folder, name, keep=KEEP)
    batched = check_plan(pipeline)
    for generation in batched:
        per_layer = generation.stats["visual_tokens_per_layer"]
        assert per_layer[-1] == KEEP
        if name == "cdpruner":
            assert set(per_layer) == {KEEP}  # exactly KEEP visual tokens enter the LLM
        if name == "pdrop":  # one stage before every layer from the first on: strictly fewer tokens each layer
            assert all(before > after for before, after in zip(per_layer, per_layer[1:]))


# ---- the listing ----------------------------------------------------------------------------------------------------
def test_reducers_list_prints_every_reducer_with_site_options_and_paper(capsys):
    assert main(["eval", "--reducers", "list"]) == 0
    out = capsys.readouterr().out
    blocks = {}
    for line in out.splitlines():
        if not line.startswith(" "):
            name = line.split()[0]
            blocks[name] = line
        else:
            blocks[name] += "\n" + line
    for name, cls in registered().items():
        assert cls.description and cls.paper, name
        block = blocks[name]
        assert cls.description in block and f"site: {cls.site.value}" in block and cls.paper in block
    assert "options: keep=None, layers=(8, 16, 24), ratio=0.5, reference_depth=32" in out
    assert "options: keep=None, layer=2, pivot_image_tokens=4, pivot_text_tokens=4" in out
    assert "site: llm; position policy: keep" in out
    assert main(["eval", "--model", "tiny-llava", "--data-dir", "."]) == 2  # --tasks is still needed to evaluate
    assert "--tasks" in capsys.readouterr().err
