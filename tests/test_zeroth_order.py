"""Zeroth-order sensitivity pruning (reducers.md §3, our reconstruction) against NumPy, and on every family."""
import numpy as np
import pytest
import torch

import tokenomy
from tests.conftest import random_images
from tests.test_composed_pipeline import folder  # noqa: F401  the composed-model fixture
from tests.test_ops import numpy_max_min
from tests.test_reduction_plans import PROMPTS, TINY, _load, check_plan
from tokenomy.errors import InputError
from tokenomy.reducers import ImageTokens, create
from tokenomy.vision.base import grid_positions


def np_projector(weights):
    first, bias1, second, bias2 = weights

    def project(x):
        hidden = x @ first.T + bias1
        hidden = 0.5 * hidden * (1 + np.tanh(np.sqrt(2 / np.pi) * (hidden + 0.044715 * hidden ** 3)))  # GELU (tanh)
        return hidden @ second.T + bias2

    return project


def np_zeroth_order(x, project, directions, k, mu_scale, gamma):
    """The spec's estimator and hybrid greedy selection, in float64: z_i = mean_s ||f(x_i + mu u) - f(x_i)|| / mu."""
    mu = mu_scale * np.sqrt((x ** 2).mean())
    base = project(x)
    z = np.mean([np.linalg.norm(project(x + mu * u) - base, axis=1) for u in directions], axis=0) / mu
    return numpy_max_min(base, k, (z / z.max()) ** gamma), z


def test_selection_matches_numpy_for_a_fixed_seed():
    torch.manual_seed(0)
    n, d, hidden, k = 30, 12, 24, 9
    mlp = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(hidden, 16))
    x = torch.randn(n, d) * torch.linspace(0.2, 3.0, n)[:, None]
    weights = [p.detach().double().numpy() for p in (mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias)]
    for samples, mu, gamma, seed in [(8, 1e-2, 1.0, 0), (3, 5e-2, 2.0, 7)]:
        reducer = create("zeroth-order", keep=k, samples=samples, mu=mu, gamma=gamma, seed=seed)
        image = ImageTokens(x, grid_positions(1, 5, 6), project=mlp)
        kept = reducer.select(image).kept.tolist()
        # The reducer's noise: `samples` draws of [n, d] from a CPU generator seeded with `seed`.
        directions = torch.randn(samples, n, d, generator=torch.Generator().manual_seed(seed)).double().numpy()
        expected, _ = np_zeroth_order(x.double().numpy(), np_projector(weights), directions, k, mu, gamma)
        assert kept == expected
        assert len(set(kept)) == k and kept == sorted(kept)
        assert kept != numpy_max_min(np_projector(weights)(x.double().numpy()), k), \
            "the sensitivity weights should change the plain max-min choice on these tokens"


def test_a_linear_projector_has_the_sensitivity_of_its_jacobian():
    """f(x) = g_i P x (P keeps 3 coordinates): z_i = g_i E||u|| for u ~ N(0, I_3), i.e. g_i * 2 sqrt(2 / pi)."""
    torch.manual_seed(1)
    scale = torch.tensor([1.0, 4.0, 1.0, 0.5])
    project = lambda x: (x @ torch.eye(3, 5)) * scale.repeat(x.shape[0] // 4)[:, None]  # noqa: E731
    from tokenomy.reducers.zeroth_order import sensitivity

    z, _ = sensitivity(project, torch.randn(4, 3), samples=4096, mu_scale=1e-2, seed=0)
    expected = scale * 2 * np.sqrt(2 / np.pi)  # the mean of a chi distribution with 3 degrees of freedom
    assert torch.allclose(z, expected, rtol=0.05)


def test_options_are_checked_at_creation():
    for options, name in [({"samples": 0}, "samples"), ({"samples": 2.5}, "samples"), ({"mu": -1.0}, "mu"),
                          ({"gamma": float("nan")}, "gamma"), ({"seed": "x"}, "seed")]:
        with pytest.raises(InputError, match=f"zeroth-order {name}"):
            create("zeroth-order", keep=4, **options)


def test_nan_features_do_not_break_selection():
    features = torch.randn(10, 4)
    features[3] = float("nan")
    image = ImageTokens(features, grid_positions(1, 2, 5), project=torch.nn.Linear(4, 6))
    kept = create("zeroth-order", keep=4).select(image).kept
    assert len(kept) == 4 and kept.unique().numel() == 4


@pytest.mark.parametrize("family", TINY + ["composed"])
def test_zeroth_order_on_every_family(family, folder):  # noqa: F811
    keep = 6
    generations = check_plan(_load(family, folder, "zeroth-order", keep=keep))
    for g in generations:
        assert g.stats["stages"][0]["site"] == "pre_projector"
        assert g.stats["visual_tokens_per_layer"] == [keep] * len(g.stats["visual_tokens_per_layer"])


def test_qwen_perturbs_whole_merge_units():
    """On Qwen a token is a 2x2 unit: the merger sees 4 patches of width D, the reducer perturbs all 4*D inputs."""
    pipeline = tokenomy.load("tiny-qwen2-vl", "zeroth-order", keep=5)
    widths = []
    merger = pipeline.model.model.visual.merger
    handle = merger.register_forward_pre_hook(lambda module, args: widths.append(tuple(args[0].shape)))
    try:
        _, _, info = pipeline.prepare(random_images(1), PROMPTS[:1])
    finally:
        handle.remove()
    units = info["encoded"][0].tokens.num_tokens
    width = pipeline.model.config.vision_config.embed_dim
    assert widths[0] == ((1 + 8) * units * 4, width)  # the image and 8 perturbed copies, in one call
    assert info["final"][0].num_tokens == 5


@pytest.mark.parametrize("family", ["tiny-qwen2.5-vl", "tiny-llava"])
def test_keep_all_equals_none(family):
    images = random_images(2)
    none = tokenomy.load(family, "none").forward(images, PROMPTS[:2])
    everything = tokenomy.load(family, "zeroth-order", keep=10_000).forward(images, PROMPTS[:2])
    assert (everything - none).abs().max().item() <= 1e-5
