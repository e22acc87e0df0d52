"""Reducers on hand-made tensors: no model involved."""
import torch

from tokenomy.reducers import ImageTokens, Selection, create
from tokenomy.reducers.base import LAST_TEXT_ATTENTION
from tokenomy.vision.base import CLS_ATTENTION, grid_positions


def image(n=12, signals=None):
    return ImageTokens(torch.randn(n, 8), grid_positions(1, 3, n // 3), signals or {})


def test_vtc_cls_sums_layers_and_keeps_raster_order():
    rows = torch.tensor([[0.1, 0.5, 0.0, 0.2, 0.9, 0.0], [0.3, 0.1, 0.0, 0.6, 0.0, 0.1]])
    selection = create("vtc-cls", keep=3).select(image(6, {CLS_ATTENTION: rows}))
    # sums: 0.4 0.6 0.0 0.8 0.9 0.1 -> top-3 = {4, 3, 1}, returned ascending
    assert selection.kept.tolist() == [1, 3, 4]
    assert selection.positions.tolist() == grid_positions(1, 3, 2)[[1, 3, 4]].tolist()


def test_vtc_cls_layers_clamp_to_shallow_encoders():
    reducer = create("vtc-cls", keep=3)
    assert reducer.layers(24, -2) == tuple(range(16, 23))
    assert reducer.layers(3, -2) == (1,)


def test_fastv_keeps_the_most_attended_tokens():
    scores = torch.tensor([0.05, 0.3, 0.01, 0.2, 0.2, 0.02])
    selection = create("fastv", keep=3).select(image(6, {LAST_TEXT_ATTENTION: scores}))
    assert selection.kept.tolist() == [1, 3, 4]


def test_random_is_seeded_and_budgeted():
    first = create("random", keep=5, seed=1).select(image(12))
    again = create("random", keep=5, seed=1).select(image(12))
    other = create("random", keep=5, seed=2).select(image(12))
    assert first.kept.tolist() == again.kept.tolist() == sorted(first.kept.tolist())
    assert len(set(first.kept.tolist())) == 5
    assert first.kept.tolist() != other.kept.tolist()


def test_none_keeps_everything_and_selection_merge_is_a_weighted_mean():
    tokens = image(6)
    assert create("none", keep=2).select(tokens).kept.tolist() == list(range(6))
    merge = Selection(kept=torch.tensor([0, 3]), positions=tokens.positions[[0, 3]],
                      merge_index=torch.tensor([0, 0, -1, 1, 1, 1]), merge_weight=torch.tensor([1.0, 3.0, 1.0, 1.0, 1.0, 2.0]))
    merged = merge.apply(tokens.features)
    f = tokens.features
    assert torch.allclose(merged[0], (f[0] + 3 * f[1]) / 4)
    assert torch.allclose(merged[1], (f[3] + f[4] + 2 * f[5]) / 4)
