"""Peer reducers, part A: visionzip, divprune, prumerge+, tome, pool, downsample.

Each selection is checked on small hand-made tensors against its formula written independently here in NumPy
(following the official file named in each test), then each runs on every tiny family it applies to: a batch of 3
equals 3 single runs, SDPA and eager keep the same tokens, cached decoding equals a no-cache recompute
(`check_plan`), and exactly `keep` tokens (merging: `keep` slots) enter the LLM.
"""
import numpy as np
import pytest
import torch

import tokenomy
from tests.conftest import random_images
from tests.test_composed_pipeline import folder  # noqa: F401  the composed-model fixture
from tests.test_reduction_plans import PROMPTS, _load, check_plan
from tokenomy.errors import InputError
from tokenomy.reducers import ImageTokens, create
from tokenomy.vision.base import CLS_ATTENTION, CLS_OR_MEAN_ATTENTION, KEYS, grid_positions

QWEN = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]
CLS_FAMILIES = ["tiny-llava", "tiny-llava-next", "composed"]


def image_tokens(n=20, dim=6, key_dim=4, seed=0, h=4, w=5, **signals):
    rng = np.random.RandomState(seed)
    features = torch.tensor(rng.randn(n, dim), dtype=torch.float32)
    attention = torch.tensor(rng.dirichlet(np.ones(n)), dtype=torch.float32)
    keys = torch.tensor(rng.randn(n, key_dim), dtype=torch.float32)
    signals = {CLS_ATTENTION: attention[None], KEYS: keys[None], **signals}
    signals[CLS_OR_MEAN_ATTENTION] = signals[CLS_ATTENTION]  # what query="auto" reads on a tower with a CLS token
    return ImageTokens(features, grid_positions(1, h, w), signals)


# ---- selections against NumPy -----------------------------------------------------------------------------------
@pytest.mark.parametrize("keep,share", [(8, 0.25), (9, 3 / 9)])  # (D, C) = (6, 2) and (6, 3): C does not divide N - D
def test_visionzip_matches_official_dominant_and_contextual(keep, share):
    """dvlab-research/VisionZip visionzip/clip_encoder.py L50-83 (CLIPVisionTower_VisionZip.forward), on patches."""
    image = image_tokens()
    selection = create("visionzip", keep=keep, contextual_share=share).select(image)
    x, a, k = image.features.numpy(), image.signals[CLS_ATTENTION][0].numpy(), image.signals[KEYS][0].numpy()
    contextual = int(round(keep * share))
    dominant = np.sort(np.argsort(-a, kind="stable")[: keep - contextual])
    mask = np.ones(len(x), bool)
    mask[dominant] = False
    left_x, left_k = x[mask], k[mask]
    unit = left_k / np.linalg.norm(left_k, axis=-1, keepdims=True)
    step = max(1, len(unit) // contextual)
    targets = np.arange(0, len(unit), step)[:contextual]
    others = ~np.isin(np.arange(len(unit)), targets)
    assign = (unit[others] @ unit[targets].T).argmax(1)
    one_hot = np.eye(contextual)[assign]
    counts = np.maximum(one_hot.sum(0), 1)[:, None]
    contextual_tokens = left_x[targets] + one_hot.T @ left_x[others] / counts
    expected = np.concatenate([x[dominant], contextual_tokens])
    assert selection.kept[: keep - contextual].tolist() == dominant.tolist()
    assert selection.kept[keep - contextual :].tolist() == np.nonzero(mask)[0][targets].tolist()
    np.testing.assert_allclose(selection.apply(image.features).numpy(), expected, rtol=1e-5, atol=1e-6)


def official_divprune(x, k):
    """vbdi/divprune LLaVA/llava/model/llava_arch.py L147-171 (pairwise_cosine_similarity + DivPrune), in NumPy."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    distance = 1.0 - unit @ unit.T
    picked = []
    for i in range(k):
        if i == 0:
            scores = np.sort(distance, axis=0)[1]  # second smallest of each column: nearest other token
        else:
            scores = distance[picked].min(axis=0)
        picked.append(int(np.argmax(scores)))
    return sorted(picked)


@pytest.mark.parametrize("seed", [0, 1])
def test_divprune_matches_official_greedy(seed):
    image = image_tokens(seed=seed)
    x = image.features.clone()
    x[7] = x[3]  # a duplicate pair: neither can be the first pick (its nearest neighbour is at distance 0)
    image.features = x
    selection = create("divprune", keep=6).select(image)
    assert selection.kept.tolist() == official_divprune(x.double().numpy(), 6)
    assert 3 not in selection.kept.tolist()[:1] and 7 not in selection.kept.tolist()[:1]
    assert create("divprune", ratio=0.098).budget(image_tokens(n=576, h=24, w=24)) == 56  # the official default


def test_prumerge_plus_iqr_outliers_spatial_samples_and_merge():
    """42Shawn/LLaVA-PruMerge clip_encoder.py L34-47 (outlier_dectection: np.percentile IQR) and L198-281 (top-k by
    attention, raster samples, x_i + sum of attention-weighted key neighbours), in our exact-budget form."""
    rng = np.random.RandomState(3)
    n, keep, neighbours = 20, 7, 4
    a = rng.uniform(0.01, 0.02, n)
    a[[4, 11, 17]] = [0.3, 0.2, 0.25]  # three outliers
    image = image_tokens(n=n, **{CLS_ATTENTION: torch.tensor(a / a.sum(), dtype=torch.float32)[None]})
    a = image.signals[CLS_ATTENTION][0].double().numpy()
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    outliers = int((a > q3 + 1.5 * (q3 - q1)).sum())
    assert outliers == 3
    top = np.argsort(-a, kind="stable")[:outliers]
    rest = np.setdiff1d(np.arange(n), top)
    spread = rest[(np.arange(keep - outliers) * len(rest)) // (keep - outliers)]
    kept = np.concatenate([top, spread])
    keys = image.signals[KEYS][0].double().numpy()
    unit = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    x = image.features.double().numpy()
    expected = x[kept].copy()
    similarity = unit[kept] @ unit.T
    for row, token in enumerate(kept):
        similarity[row, token] = -np.inf
    clusters = [set(np.argsort(-similarity[row])[:neighbours]) for row in range(keep)]
    for j in np.setdiff1d(np.arange(n), kept):
        holding = [row for row in range(keep) if j in clusters[row]]
        if holding:
            best = max(holding, key=lambda row: similarity[row, j])
            expected[best] += a[j] * x[j]
    selection = create("prumerge+", keep=keep, neighbours=neighbours).select(image)
    assert selection.kept.tolist() == kept.tolist()
    np.testing.assert_allclose(selection.apply(image.features).double().numpy(), expected, rtol=1e-5, atol=1e-6)


def official_tome_round(metric, x, size, r):
    """facebookresearch/ToMe tome/merge.py L18-100 (bipartite_soft_matching, no class token) + merge_wavg, in NumPy.
    Returns {representative token: merged row}: each output row keyed by the token whose slot it keeps."""
    unit = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
    a_ids, b_ids = np.arange(0, len(x), 2), np.arange(1, len(x), 2)
    scores = unit[a_ids] @ unit[b_ids].T
    node_max, node_idx = scores.max(-1), scores.argmax(-1)
    edges = np.argsort(-node_max, kind="stable")
    total = {int(t): (x[t] * size[t], size[t]) for t in np.concatenate([a_ids[edges[r:]], b_ids])}
    for src in edges[:r]:
        dst = int(b_ids[node_idx[src]])
        value, weight = total[dst]
        total[dst] = (value + x[a_ids[src]] * size[a_ids[src]], weight + size[a_ids[src]])
    return {token: value / weight for token, (value, weight) in total.items()}


def test_tome_one_layer_matches_official_bipartite_merge():
    image = image_tokens(n=12, h=3, w=4)
    sizes = np.array([1, 2, 1, 1, 3, 1, 1, 1, 2, 1, 1, 1], dtype=np.float64)
    sources = torch.zeros(12, 20)
    for token, size in enumerate(sizes):  # a token of size s holds s original patches
        sources[token, token] = 1
        sources[token, 12 : 12 + int(size) - 1] = 1
    image.sources, image.layer = sources, 1
    reducer = create("tome", keep=7)
    reducer.encoder_layers(num_layers=4, feature_layer=2)  # layer 1 of 0..2: spread 5 merges over 2 layers -> 3 here
    selection = reducer.select(image)
    expected = official_tome_round(image.signals[KEYS][0].double().numpy(), image.features.double().numpy(), sizes, 3)
    assert selection.kept.tolist() == sorted(expected)
    np.testing.assert_allclose(selection.apply(image.features).double().numpy(),
                               np.stack([expected[t] for t in sorted(expected)]), rtol=1e-5, atol=1e-6)
    assert selection.apply_sources(sources).sum(1).tolist() == [expected_size for expected_size in
                                                                 _merged_sizes(selection, sizes)]


def _merged_sizes(selection, sizes):
    out = np.zeros(selection.num_kept)
    np.add.at(out, selection.merge_index.numpy(), sizes)
    return out.tolist()


def test_tome_matches_again_when_a_layer_must_remove_more_than_half():
    image = image_tokens(n=16, h=4, w=4)
    image.layer = 0
    reducer = create("tome", keep=3)
    reducer.encoder_layers(num_layers=2, feature_layer=0)
    selection = reducer.select(image)
    assert selection.num_kept == 3 and sorted(set(selection.merge_index.tolist())) == [0, 1, 2]


def test_pool_averages_each_cell_at_its_top_left_token():
    image = image_tokens(n=24, h=4, w=6)
    selection = create("pool", kernel=2).select(image)
    grid = image.features.numpy().reshape(4, 6, -1)
    expected = grid.reshape(2, 2, 3, 2, -1).mean(axis=(1, 3)).reshape(6, -1)
    np.testing.assert_allclose(selection.apply(image.features).numpy(), expected, rtol=1e-6, atol=1e-6)
    assert selection.positions[:, 1:].tolist() == [[h, w] for h in (0, 2) for w in (0, 2, 4)]
    assert create("pool", keep=6).kernel_for(image) == 2 and create("pool", keep=5).kernel_for(image) == 3


# ---- options refused at load ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,options,message", [
    ("visionzip", dict(query="first"), "visionzip query"), ("visionzip", dict(contextual_share=1.5), "contextual_share"),
    ("prumerge+", dict(neighbours=0), "neighbours"), ("divprune", dict(ratio=0), "divprune ratio"),
    ("pool", dict(kernel=0), "pool kernel"),
])
def test_bad_options_are_refused_at_load(spec, options, message):
    with pytest.raises(InputError, match=message):
        tokenomy.load("tiny-llava", spec, keep=8, **options)


def test_cls_reducers_on_qwen_asked_for_the_cls_row_are_refused_at_load():
    with pytest.raises(InputError, match="visionzip needs the CLS attention row"):
        tokenomy.load("tiny-qwen2-vl", "visionzip", keep=8, query="cls")


@pytest.mark.parametrize("family,same_as", [("tiny-llava", "cls"), ("tiny-qwen2-vl", "mean")])
def test_query_auto_reads_the_cls_row_or_else_the_mean_query(family, same_as):
    images = random_images(2)
    kept = [[g.stats["kept_indices"] for g in tokenomy.load(family, spec, keep=5, query=query).generate(
        images, PROMPTS[:2], max_new_tokens=1)] for spec in ("visionzip", "prumerge+") for query in ("auto", same_as)]
    assert kept[0] == kept[1] and kept[2] == kept[3]


def test_every_peer_has_a_description_and_a_paper():
    for name in ("visionzip", "divprune", "prumerge+", "tome", "pool", "downsample"):
        cls = type(create(name))
        assert cls.description and cls.paper and "\n" not in cls.description


# ---- on the tiny families ---------------------------------------------------------------------------------------
CASES = [(spec, family) for spec in ("visionzip", "prumerge+") for family in CLS_FAMILIES + QWEN] \
    + [("divprune", family) for family in CLS_FAMILIES + QWEN] + [("tome", family) for family in CLS_FAMILIES] \
    + [("pool", family) for family in ("tiny-llava", "tiny-qwen2-vl", "composed")]


@pytest.mark.parametrize("spec,family", CASES)
def test_peer_on_family(spec, family, folder):  # noqa: F811
    keep = 6
    pipeline = _load(family, folder, spec, keep=keep)
    generations = check_plan(pipeline)
    for g in generations:
        kept = [len(indices) for indices in g.stats["kept_indices"]]
        if spec == "pool":
            assert all(0 < count <= keep for count in kept)
        elif spec == "tome" and family == "tiny-llava-next":  # the encoder site budgets each crop
            assert g.stats["stages"][0]["layers"] == [0, 1]
        else:
            assert kept == [keep] * len(kept)
        assert g.stats["visual_tokens_per_layer"] == [sum(kept)] * len(pipeline.adapter.decoder_layers)


@pytest.mark.parametrize("family", QWEN)
def test_tome_on_qwen_is_refused_at_load_by_name(family):
    with pytest.raises(InputError, match="tome merges tokens between vision-encoder layers, which the QwenViTEncoder"):
        tokenomy.load(family, "tome", keep=6)


def test_downsample_makes_fewer_tokens_on_qwen_and_less_detail_on_llava():
    images = [image.resize((image.width * 3, image.height * 3)) for image in random_images(3)]
    full = tokenomy.load("tiny-qwen2-vl", "none").generate(images, PROMPTS, max_new_tokens=1)
    pipeline = tokenomy.load("tiny-qwen2-vl", "downsample", keep=20)
    check_plan(pipeline)
    small = pipeline.generate(images, PROMPTS, max_new_tokens=1)
    for before, after in zip(full, small):
        assert before.stats["visual_tokens_in"] > after.stats["visual_tokens_in"] == after.stats["visual_tokens_kept"]
        assert 16 <= after.stats["visual_tokens_kept"] <= 20  # the processor's min_pixels is 16 tokens
    images = random_images(3)
    pipeline = tokenomy.load("tiny-llava", "downsample", keep=9)
    _, _, info = pipeline.prepare(images[:1], PROMPTS[:1])
    _, _, unreduced = tokenomy.load("tiny-llava", "none").prepare(images[:1], PROMPTS[:1])
    assert info["batch"]["pixel_values"].shape == unreduced["batch"]["pixel_values"].shape  # 49 tokens either way
    assert not torch.equal(info["batch"]["pixel_values"], unreduced["batch"]["pixel_values"])


@pytest.mark.parametrize("keep,tokens", [(20, (1, 20)), (4, (16, 20)), (30, (20, 30))])
def test_downsample_image_makes_the_tokens_the_qwen_processor_allows(keep, tokens):
    from PIL import Image

    from tokenomy.reducers.downsample import Downsample
    from tokenomy.vlm.tiny import BUILDERS

    _, processor = BUILDERS["tiny-qwen2-vl"]()
    image = Image.new("RGB", (600, 400), (10, 200, 30))
    small = Downsample(keep=keep).prepare_image(image, processor)
    grid = processor.image_processor(images=[small], return_tensors="pt")["image_grid_thw"][0]
    made = int(grid.prod()) // 4
    assert tokens[0] <= made <= tokens[1] and made == (small.width // 28) * (small.height // 28)
    assert abs(small.width / small.height - 1.5) < 0.5  # the aspect ratio is kept


def test_downsample_never_exceeds_keep_on_a_very_wide_image():
    from PIL import Image

    from tokenomy.reducers.downsample import Downsample

    small = Downsample(keep=4).prepare_image(Image.new("RGB", (2000, 20)), processor=None)
    assert (small.width // 14) * (small.height // 14) <= 4
