"""Shared primitives against independent NumPy computations of the spec's formulas (reducers.md §0.3, §1.3)."""
import math

import numpy as np
import torch

from tokenomy.ops import cosine_distance, max_min_diversity, normalized_entropy


def numpy_max_min(features, k, weights=None):
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    distance = 1.0 - unit @ unit.T
    if weights is not None:
        distance = distance * weights[None, :]
    n = len(features)
    off_diagonal = distance + np.diag(np.full(n, np.inf))
    picked = [int(np.argmax(off_diagonal.min(axis=0)))]
    while len(picked) < k:
        closest = distance[picked].min(axis=0)
        closest[picked] = -1
        picked.append(int(np.argmax(closest)))
    return sorted(picked)


def test_max_min_diversity_matches_the_spec_with_and_without_weights():
    rng = np.random.RandomState(0)
    for n, k in [(12, 4), (30, 9), (7, 7)]:
        features = rng.randn(n, 5)
        weights = rng.rand(n)
        distance = cosine_distance(torch.tensor(features))
        assert max_min_diversity(distance, k).tolist() == numpy_max_min(features, k)
        assert max_min_diversity(distance, k, torch.tensor(weights)).tolist() == numpy_max_min(features, k, weights)


def test_max_min_diversity_batches_windows_independently():
    features = torch.randn(3, 10, 4)
    together = max_min_diversity(cosine_distance(features), 4)
    for window in range(3):
        assert together[window].tolist() == max_min_diversity(cosine_distance(features[window]), 4).tolist()


def test_normalized_entropy():
    uniform = torch.full((8,), 1 / 8)
    assert abs(normalized_entropy(uniform).item() - 1.0) < 1e-5
    peaked = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert abs(normalized_entropy(peaked).item()) < 1e-5
    p = np.array([0.5, 0.25, 0.25])
    assert abs(normalized_entropy(torch.tensor(p)).item() - (-(p * np.log(p)).sum() / math.log(3))) < 1e-6
