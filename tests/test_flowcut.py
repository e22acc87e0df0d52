"""FlowCut (reducers.md §1) against the spec's formulas computed independently with NumPy, and on every family.

The NumPy reference follows flowcut/modeling_clip_flowcut.py lines 138-163 and flowcut/utils_flowcut.py lines 20-42
(LLaVA), FlowCut_Qwen/modeling_qwen2_vl_flowcut.py lines 148-173 and FlowCut_Qwen/utils_flowcut.py (Qwen) of
TungChintao/FlowCut, written from the spec's formulas, per image.
"""
import math

import numpy as np
import pytest
import torch

import tokenomy
from tests.conftest import random_images
from tests.test_composed_pipeline import folder  # noqa: F401  the composed-model fixture
from tests.test_reduction_plans import PROMPTS, TINY, _load, check_plan
from tokenomy.errors import InputError
from tokenomy.reducers import ImageTokens, create
from tokenomy.reducers.base import LAST_TEXT_ATTENTION, LAST_TEXT_VALUE_SIMILARITY, LLM_VALUES, Site
from tokenomy.reducers.flowcut import FlowCutLLM, prune_count
from tokenomy.vision.base import CLS_ATTENTION, CLS_VALUE_SIMILARITY, MEAN_QUERY_ATTENTION, VALUES, grid_positions

# ---- NumPy reference ------------------------------------------------------------------------------------------------


def np_entropy_count(attention, remaining, target):
    p = attention / attention.sum()
    entropy = -(p * np.log(p + 1e-7)).sum() / math.log(len(p))
    return int(np.round((len(p) - target) / math.sqrt(remaining) * (1 - entropy ** 2)))


def np_flowcut_vit(tables, num_tokens, target, last_prune_layer, semantic=True):
    """tables: per layer (attention, similarity, values) indexed by ORIGINAL token, as if the layer computed them
    for whatever survives. Returns the surviving original indices and the count after every layer."""
    alive = np.arange(num_tokens)
    cumulative = None
    counts = []
    for layer in range(last_prune_layer + 1):
        attention, similarity, values = (table[alive] for table in tables[layer])
        n = len(alive)
        if n > target:
            magnitude = np.abs(values).sum(axis=1)
            if semantic:
                score = (attention / attention.sum() + similarity / similarity.sum()) * magnitude
            else:
                score = attention * magnitude
            cumulative = score if cumulative is None else 0.5 * cumulative + 0.5 * score
            remaining = last_prune_layer - layer
            if remaining % 2 == 0:
                count = target if remaining == 0 else max(n - np_entropy_count(attention, remaining, target), target)
                keep = np.sort(np.argsort(-cumulative, kind="stable")[:count])
                alive, cumulative = alive[keep], cumulative[keep]
        counts.append(len(alive))
    return alive, counts


def random_tables(rng, layers, n, dim=8, sharpen=None):
    """Per layer: a softmax-like attention row (sharper in later layers, as in CLIP), a similarity row, values."""
    tables = []
    for layer in range(layers):
        temperature = 0.3 + (sharpen or 3.0) * layer / layers
        attention = np.exp(temperature * rng.randn(n)).astype(np.float32)
        attention /= attention.sum() * 1.02  # the CLS self-attention holds the rest
        similarity = np.exp(rng.randn(n)).astype(np.float32)
        similarity /= similarity.sum() * 1.05
        tables.append((attention, similarity, rng.randn(n, dim).astype(np.float32)))
    return tables


def run_vit_stage(stage, tables, n, feature_layer, num_layers, positions=None, mean_query=False):
    """Drive an encoder-site stage as the encoder hook does: after each layer it names, with that layer's signals."""
    layers = stage.encoder_layers(num_layers, feature_layer)
    alive = np.arange(n)
    positions = positions if positions is not None else grid_positions(1, 1, n)
    counts, steps = [], []
    for layer in range(feature_layer + 1):
        if layer in layers:
            attention, similarity, values = (torch.tensor(table[alive]) for table in tables[layer])
            signals = {VALUES: values[None]}
            if mean_query:
                signals[MEAN_QUERY_ATTENTION] = attention[None]
            else:
                signals[CLS_ATTENTION], signals[CLS_VALUE_SIMILARITY] = attention[None], similarity[None]
            image = ImageTokens(torch.zeros(len(alive), 4), positions, signals, layer=layer)
            selection = stage.select(image)
            if selection.num_kept != len(alive):
                steps.append(layer)
            alive, positions = alive[selection.kept.numpy()], selection.positions
        counts.append(len(alive))
    return alive, counts, steps, positions


# ---- the formulas -----------------------------------------------------------------------------------------------------


def test_llava_schedule_n576_t64_on_24_layers_matches_numpy():
    rng = np.random.RandomState(0)
    tables = random_tables(rng, 24, 576)
    stage = create("flowcut", keep=64)
    feature_layer = 22  # LLaVA-1.5 reads hidden_states[-2]: layers 0..22 run
    alive, counts, steps, _ = run_vit_stage(stage, tables, 576, feature_layer, 24)
    expected_alive, expected_counts = np_flowcut_vit(tables, 576, 64, last_prune_layer=21)
    assert counts[:22] == expected_counts and alive.tolist() == expected_alive.tolist()
    assert stage.encoder_layers(24, 22) == tuple(range(22))  # layers 22, 23 never prune
    assert set(steps) <= set(range(1, 22, 2)) and steps[-1] == 21  # only where R = 21 - l is even
    assert counts[21] == counts[22] == 64 and all(a >= b for a, b in zip(counts, counts[1:]))
    assert counts[0] == 576 and len(set(counts)) > 3, f"the entropy rule should prune step by step: {counts}"


def test_entropy_rule():
    n, target = 576, 64
    uniform = torch.full((n,), 1.0 / n)
    assert prune_count(uniform, 9, target) == 0  # e = 1: nothing pruned
    peaked = torch.zeros(n)
    peaked[3] = 1.0  # e = 0 (and 0 log 0 stays finite): the whole (N - T) / sqrt(R)
    assert prune_count(peaked, 9, target) == round((n - target) / 3)
    rng = np.random.RandomState(1)
    for remaining in (1, 3, 8, 21):
        row = np.exp(2.5 * rng.randn(n)).astype(np.float32)
        assert prune_count(torch.tensor(row), remaining, target) == np_entropy_count(row, remaining, target)
    assert prune_count(torch.tensor([float("nan")] + [1.0] * 9), 4, 2) == 0  # NaN counts as 0 attention


def test_official_per_layer_counts_of_a_known_sharpening():
    """A hand-made schedule: attention whose normalised entropy is known at each layer gives counts by hand."""
    n, target, stage = 100, 10, create("flowcut", keep=10)
    stage.encoder_layers(6, 5)  # layers 0..5 run, the last pruning layer is 4: prune at l = 0 (R=4), 2 (R=2), 4 (R=0)
    tables = [(np.full(n, 1.0, np.float32), np.full(n, 1.0, np.float32), np.ones((n, 2), np.float32)) for _ in range(6)]
    peaked = np.full(n, 1e-30, np.float32)
    peaked[:50] = 1.0  # e = log 50 / log N' at every layer it is seen on N' tokens
    tables[0] = (peaked, peaked, np.ones((n, 2), np.float32))
    alive, counts, steps, _ = run_vit_stage(stage, tables, n, 5, 6)
    e = math.log(50) / math.log(100)
    first = n - int(np.round((n - target) / 2 * (1 - e ** 2)))
    assert steps == [0, 4] and counts[0] == counts[2] == first  # l = 2 sees uniform rows: e = 1, r = 0
    assert counts[4] == counts[5] == target and set(alive.tolist()) <= set(range(50))


def test_qwen_variant_mean_query_units_and_last_layer_matches_numpy():
    rng = np.random.RandomState(2)
    units, keep = 300, 20
    tables = random_tables(rng, 32, units)
    (stage, llm_stage) = create("flowcut", keep=keep).expand("qwen2-vl")
    assert stage.query == "mean" and stage.crop_target == 2 * keep and isinstance(llm_stage, FlowCutLLM)
    assert stage.encoder_layers(32, 31) == tuple(range(32))  # R = 31 - l: the last pruning follows the last block
    alive, counts, _, _ = run_vit_stage(stage, tables, units, 31, 32, mean_query=True)
    expected_alive, expected_counts = np_flowcut_vit(tables, units, 2 * keep, last_prune_layer=31, semantic=False)
    assert counts == expected_counts and alive.tolist() == expected_alive.tolist() and counts[-1] == 2 * keep


def test_official_positions_give_the_first_raster_positions_and_true_positions_otherwise():
    rng = np.random.RandomState(3)
    grid = grid_positions(1, 6, 8)
    window_order = torch.randperm(48, generator=torch.Generator().manual_seed(0))  # units in Qwen2.5-style order
    tables = random_tables(rng, 4, 48)
    results = {}
    for official in (False, True):
        (stage, _) = create("flowcut", keep=5, official_positions=official).expand("qwen2-vl")
        alive, _, _, positions = run_vit_stage(stage, tables, 48, 3, 4, positions=grid[window_order], mean_query=True)
        results[official] = (alive, positions)
    alive, positions = results[False]
    assert torch.equal(positions, grid[window_order][alive])  # TRUE (t, h, w) of each kept unit
    quirk_alive, quirk = results[True]
    assert quirk_alive.tolist() == alive.tolist()  # same units kept
    raster = torch.argsort(window_order[torch.tensor(alive)])  # kept units by their id in the raster grid
    assert torch.equal(quirk[raster], grid[:10])  # in raster order of the kept units: the grid's first 10 positions


def test_llm_stage_formula_matches_numpy():
    rng = np.random.RandomState(4)
    n, d, keep = 40, 16, 7
    heads_attention = rng.rand(4, n).astype(np.float32) * 0.02  # over the whole prefix, visual part
    attention = heads_attention.mean(0)
    similarity = np.exp(rng.randn(n)).astype(np.float32)
    similarity /= similarity.sum()
    values = rng.randn(n, d).astype(np.float32)
    image = ImageTokens(torch.zeros(n, d), grid_positions(1, 5, 8), {
        LAST_TEXT_ATTENTION: torch.tensor(attention), LAST_TEXT_VALUE_SIMILARITY: torch.tensor(similarity),
        LLM_VALUES: torch.tensor(values)}, layer=2)
    kept = FlowCutLLM(keep=keep).select(image).kept.tolist()
    score = (attention / attention.sum() + similarity) * np.abs(values).sum(axis=1)
    assert kept == sorted(np.argsort(-score)[:keep].tolist())


def test_options_are_checked_at_creation_and_at_load():
    with pytest.raises(InputError, match="flowcut query"):
        create("flowcut", keep=4, query="bogus")
    with pytest.raises(InputError, match="official_positions must be"):
        create("flowcut", keep=4, official_positions="yes")
    with pytest.raises(InputError, match="official_positions reproduces the official Qwen2-VL"):
        tokenomy.load("tiny-llava", "flowcut:official_positions=true", keep=4)
    with pytest.raises(InputError, match="CLS"):
        tokenomy.load("tiny-qwen2-vl", "flowcut:query=cls", keep=4)


# ---- on every family --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY + ["composed"])
def test_flowcut_on_every_family(family, folder):  # noqa: F811
    keep = 6
    pipeline = _load(family, folder, "flowcut", keep=keep)
    two_stage = family in ("tiny-llava-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl")
    assert [stage.site for stage in pipeline.plan.stages] == [Site.ENCODER] + [Site.LLM] * two_stage
    generations = check_plan(pipeline)  # batch of 3 = 3 singles; SDPA = eager; cached = recompute; exact stats
    feature_layer = pipeline.adapter.layers_run - 1
    for g in generations:
        per_layer = g.stats["visual_tokens_per_layer"]
        assert g.stats["stages"][0]["site"] == "encoder"
        if family.startswith("tiny-qwen"):
            assert g.stats["stages"][0]["layers"] == list(range(feature_layer + 1))
        else:
            assert g.stats["stages"][0]["layers"] == list(range(max(feature_layer, 1)))
        assert per_layer[-1] == keep, per_layer  # exactly K visual tokens from the LLM stage (or the ViT) on
        if two_stage:
            assert per_layer[:2] == [per_layer[0]] * 2 and per_layer[2:] == [keep] * (len(per_layer) - 2)
            assert per_layer[0] >= keep
        else:
            assert per_layer == [keep] * len(per_layer) and len(g.stats["kept_indices"][0]) == keep


def test_later_encoder_layers_run_on_fewer_tokens():
    """LLaVA: the feature layer (index 1 of the tiny tower, read as hidden_states[-2]) runs on T + CLS tokens."""
    pipeline = tokenomy.load("tiny-llava", "flowcut", keep=7)
    seen = []
    layers = pipeline.adapter.vision._layers()
    handles = [layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1])) for layer in layers]
    try:
        pipeline.generate(random_images(1), PROMPTS[:1], max_new_tokens=1)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == [50, 8]  # layer 0 on 49 patches + CLS; layer 1 on 7 + CLS; layer 2 never runs


def test_official_positions_reach_the_llm_on_qwen():
    images = random_images(1)
    grid_of = lambda info: info["final"][0].positions  # noqa: E731
    pipeline = tokenomy.load("tiny-qwen2-vl", "flowcut:official_positions=true", keep=3)
    _, _, info = pipeline.prepare(images, PROMPTS[:1])
    true_pipeline = tokenomy.load("tiny-qwen2-vl", "flowcut", keep=3)
    _, _, true_info = true_pipeline.prepare(images, PROMPTS[:1])
    quirk, true = grid_of(info), grid_of(true_info)
    t, h, w = info["batch"]["image_grid_thw"][0].tolist()
    assert torch.equal(quirk, grid_positions(t, h // 2, w // 2)[: len(quirk)])
    assert torch.equal(info["final"][0].features, true_info["final"][0].features)  # the same units, other positions
    assert not torch.equal(quirk, true)


@pytest.mark.parametrize("family", ["tiny-qwen2.5-vl", "tiny-qwen2-vl", "tiny-llava-next"])
def test_keep_all_equals_none(family):
    images = random_images(2)
    none = tokenomy.load(family, "none").forward(images, PROMPTS[:2])
    everything = tokenomy.load(family, "flowcut", keep=10_000).forward(images, PROMPTS[:2])
    assert everything.shape == none.shape and (everything - none).abs().max().item() <= 1e-5


def test_clip_signals_read_the_layers_own_projections():
    """The HF CLIP tower captures q/k/v from the layer's own attention: the same signals and output as recomputing."""
    from tokenomy.vision.base import SIGNAL_NAMES, WINDOW_ATTENTION

    names = set(SIGNAL_NAMES) - {WINDOW_ATTENTION}  # frames to window exist only in Qwen ViTs
    pipeline = tokenomy.load("tiny-llava", "none")
    vision = pipeline.adapter.vision
    hidden = vision._embed(torch.randn(2, 3, 56, 56))
    with torch.no_grad():
        output, qkv = vision._run_layer_capturing(0, hidden)
        captured = vision._signals_from(*qkv, names)
        recomputed = vision._signals(0, hidden, names)
        assert torch.equal(output, vision._run_layer(0, hidden))
    assert captured.keys() == recomputed.keys() == names
    assert all(torch.equal(captured[name], recomputed[name]) for name in names)
