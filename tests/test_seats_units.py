"""SEATS as pure tensor functions (tokenomy/reducers/seats.py) against NumPy transcriptions of the official code,
xxayt/SEATS at c553732: seats/ratio_decay_scheduler.py lines 55-131, seats/pre_llm_units.py lines 9-49 and
seats/inner_llm_units.py lines 149-300 (budget allocation) with _windowed_rank at 360."""
import math

import numpy as np
import pytest
import torch

from tokenomy.errors import InputError
from tokenomy.ops import window_attention_received
from tokenomy.reducers import seats


# ---- reference transcriptions (NumPy / plain Python) ---------------------------------------------------------------

def fixed_windows(length, window):
    """baselines/utils.py get_window_idx_tensor: consecutive windows of `window` tokens, the last one shorter."""
    return [(start, min(start + window, length)) for start in range(0, length, window)]


def official_keep_ratios(target, enc, num_layers, drops, late_block_layer):
    """ratio_decay_scheduler.py `_solve_with_remove`: bisection (50 steps), ratios rounded to 4 decimals."""
    remove = min(late_block_layer - 1, num_layers)
    drops = [d for d in sorted(drops) if d < remove]
    bounds = [0] + drops + [remove]
    segs = [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]
    w = [math.exp(i) for i in range(len(drops))]
    norm = [x / sum(w) for x in w]

    def weighted(frac):
        remaining, s = enc, segs[0] * enc
        for i in range(len(drops)):
            remaining = max(remaining - frac * enc * norm[i], 0.0)
            s += segs[i + 1] * remaining
        return s

    goal = target * num_layers
    if goal >= weighted(0.0):
        frac = 0.0
    elif goal <= weighted(1.0):
        frac = 1.0
    else:
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if weighted(mid) > goal else (lo, mid)
        frac = (lo + hi) / 2
    levels, remaining = [enc], enc
    for i in range(len(drops)):
        remaining = max(remaining - frac * enc * norm[i], 1e-12)
        levels.append(remaining)
    return [round(levels[i + 1] / levels[i], 4) for i in range(len(drops))]


def official_window_mmd(features, weights, keep):
    """pre_llm_units.py `weighted_MMD_batch` for one window (weights scaled by 1e6 as there)."""
    unit = features / (np.linalg.norm(features, axis=-1, keepdims=True) + 1e-8)
    dist = 1.0 - unit @ unit.T
    if weights is not None:
        dist = dist * (weights * 1e6)[None, :]
    first = int(np.argmax(np.sort(dist, axis=0)[1]))
    picked = [first]
    closest = dist[first].copy()
    closest[first] = -1.0
    for _ in range(1, keep):
        new = int(np.argmax(closest))
        picked.append(new)
        closest = np.minimum(closest, dist[new])
        closest[new] = -1.0
    return sorted(picked)


def official_stage2(scores, video_mask, audio_mask, v_ratio, a_ratio, temp=0.1):
    """inner_llm_units.py `top_down_token_selection`, keep mask only (windows, budgets, windowed top-k)."""
    def segments(mask):
        pos = np.where(mask)[0]
        if len(pos) == 0:
            return []
        breaks = np.where(np.diff(pos) > 1)[0] + 1
        return list(zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(pos)]])))

    vs, as_ = segments(video_mask), segments(audio_mask)
    n = min(len(vs), len(as_))
    windows = [(vs[i], as_[i]) for i in range(n)] + [(v, None) for v in vs[n:]] + [(None, a) for a in as_[n:]]
    nv, na = int(video_mask.sum()), int(audio_mask.sum())
    vsc, asc = scores[video_mask], scores[audio_mask]
    tv = max(1, round(v_ratio * nv)) if nv else 0
    ta = max(1, round(a_ratio * na)) if na else 0
    keep = np.ones(len(scores), bool)
    if not (len(windows) > 1 and nv and na):
        for mask, sc, total in ((video_mask, vsc, tv), (audio_mask, asc, ta)):
            if total:
                local = np.zeros(len(sc), bool)
                local[np.argsort(-sc, kind="stable")[:total]] = True
                keep[np.where(mask)[0][~local]] = False
        return keep
    W = len(windows)
    vid, aid = np.zeros(nv, int), np.zeros(na, int)
    vsz, asz = np.zeros(W, int), np.zeros(W, int)
    for i, (v, a) in enumerate(windows):
        if v is not None:
            vid[v[0]:v[1]] = i
            vsz[i] = v[1] - v[0]
        if a is not None:
            aid[a[0]:a[1]] = i
            asz[i] = a[1] - a[0]
    vimp = np.bincount(vid, vsc, W) / np.maximum(vsz, 1)
    aimp = np.bincount(aid, asc, W) / np.maximum(asz, 1)

    def softmax(x):
        e = np.exp((x - x.max()) / temp)
        return e / e.sum()

    wv, wa = softmax(vimp / 1.0), softmax(aimp / 1.0)
    cap = vsz + asz
    budget = np.minimum(np.maximum(np.round((wv + wa) / 2 * (tv + ta)).astype(int), 1), cap)
    diff = budget.sum() - (tv + ta)
    while diff != 0:
        if diff > 0:
            room = budget > 1
            if not room.any():
                break
            budget[np.argmax(np.where(room, budget, -1))] -= 1
        else:
            room = budget < cap
            if not room.any():
                break
            budget[np.argmin(np.where(room, budget, cap.max() + 1))] += 1
        diff = budget.sum() - (tv + ta)
    vshare, ashare = wv * tv, wa * ta
    vfrac = vshare / (vshare + ashare + 1e-12)
    vb = np.minimum(np.maximum(np.round(budget * vfrac).astype(int), 0), vsz)
    ab = np.minimum(np.maximum(budget - vb, 0), asz)
    rem = budget - vb - ab
    ev = np.minimum(np.maximum(rem, 0), np.maximum(vsz - vb, 0))
    vb, rem = vb + ev, rem - ev
    ab = ab + np.minimum(np.maximum(rem, 0), np.maximum(asz - ab, 0))
    fix_v = (vsz > 0) & (vb < 1)
    vb = np.where(fix_v, 1, vb)
    ab = np.where(fix_v & (ab > 1), np.maximum(np.minimum(asz, np.maximum(budget - vb, 0)), 1), ab)
    fix_a = (asz > 0) & (ab < 1)
    ab = np.where(fix_a, 1, ab)
    vb = np.where(fix_a & (vb > 1), np.maximum(np.minimum(vsz, np.maximum(budget - ab, 0)), 1), vb)
    for mask, sc, ids, b in ((video_mask, vsc, vid, vb), (audio_mask, asc, aid, ab)):
        order = np.argsort(-sc, kind="stable")
        rank = np.zeros(len(sc), int)
        seen = np.zeros(W, int)
        for o in order:
            rank[o] = seen[ids[o]]
            seen[ids[o]] += 1
        local = rank < b[ids]
        keep[np.where(mask)[0][~local]] = False
    return keep


def interleaved(rng, chunks, video_per_chunk, audio_per_chunk, text_before=3, text_after=4, drop_last_audio=False):
    kinds = [0] * text_before
    for c in range(chunks):
        kinds += [1] * video_per_chunk
        if not (drop_last_audio and c == chunks - 1):
            kinds += [2] * audio_per_chunk
    kinds += [0] * text_after
    kinds = torch.tensor(kinds)
    return kinds == 1, kinds == 2


# ---- the scheduler -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [0.06, 0.1, 0.3, 0.45, 0.65])
def test_schedule_of_qwen25_omni_7b(target):
    schedule = seats.retention_schedule(target, num_layers=28, drop_layers=[16, 18, 20], late_block_layer=24)
    assert [round(k, 4) for k in schedule.keep_ratios] == [0.9298, 0.7949, 0.2986]  # reducers.md §5.5
    assert schedule.average == pytest.approx(target, abs=1e-12)
    assert schedule.encoder_ratio == pytest.approx(1.4 * target)
    levels = [schedule.layer_retention[i] / target for i in (0, 15, 16, 18, 20, 22, 23, 27)]
    assert levels == pytest.approx([1.4, 1.4, 1.302, 1.035, 0.309, 0.309, 0.0, 0.0], abs=5e-4)
    assert schedule.keep_ratios == pytest.approx(official_keep_ratios(target, 1.4 * target, 28, [16, 18, 20], 24), abs=1e-4)


@pytest.mark.parametrize("layers, drops, late", [(48, [27, 31, 35], 40), (36, [10, 20], 30), (28, [16, 18, 20], None),
                                                 (28, [8], 24), (28, [16, 18, 20, 26], 24)])
@pytest.mark.parametrize("target", [0.1, 0.35, 0.55])
def test_schedule_equals_the_official_solver_and_averages_to_target(layers, drops, late, target):
    schedule = seats.retention_schedule(target, layers, drops, late)
    official = official_keep_ratios(target, 1.4 * target, layers, drops, late if late else layers + 1)
    assert schedule.keep_ratios == pytest.approx(official, abs=1e-4)
    assert schedule.average == pytest.approx(target, abs=1e-12)
    assert len(schedule.layer_retention) == layers


def test_schedule_above_the_reachable_average_drops_nothing_and_says_so():
    clipped = seats.retention_schedule(0.8, 28, [16, 18, 20], 24)  # 1.4 * 0.8 > 1: Stage I keeps everything
    assert clipped.encoder_ratio == 1.0 and clipped.average == pytest.approx(0.8)
    unreachable = seats.retention_schedule(0.9, 28, [16, 18, 20], 24)  # Stage III leaves at most 23/28
    assert unreachable.keep_ratios == (1.0, 1.0, 1.0) and unreachable.average == pytest.approx(23 / 28)


def test_schedule_errors_name_the_option():
    with pytest.raises(InputError, match="target retention"):
        seats.retention_schedule(0.0, 28, [16], 24)
    with pytest.raises(InputError, match="drop layers must be in 1..27"):
        seats.retention_schedule(0.3, 28, [0, 16], 24)
    with pytest.raises(InputError, match="late_block_layer"):
        seats.retention_schedule(0.3, 28, [16], 1)


# ---- Stage I -------------------------------------------------------------------------------------------------------

def test_window_attention_received_equals_numpy():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 3, 10, 4)).astype(np.float32)
    got = window_attention_received(torch.from_numpy(q), torch.from_numpy(k), fixed_windows(10, 4), scale=0.5)
    want = np.zeros(10)
    for s in (0, 4, 8):
        logits = np.einsum("hqd,hkd->hqk", q[:, s:s + 4], k[:, s:s + 4]) * 0.5
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        want[s:s + 4] = p.mean(0).sum(0)
    assert np.allclose(got.numpy(), want, atol=1e-5)
    assert got.sum().item() == pytest.approx(10.0, abs=1e-4)  # every query row sums to one inside its window


@pytest.mark.parametrize("ratio, window, weighted", [(0.42, 8, True), (0.25, 6, True), (0.5, 8, False), (0.05, 8, True),
                                                     (1.0, 8, True)])
def test_window_diversity_keep_equals_the_official_selection(ratio, window, weighted):
    rng = np.random.default_rng(1)
    features = rng.normal(size=(29, 16)).astype(np.float32)  # 29 = 3 full windows of 8 and a short one of 5
    weights = rng.uniform(0.1, 2.0, size=29).astype(np.float32) if weighted else None
    got = seats.window_diversity_keep(torch.from_numpy(features), None if weights is None else torch.from_numpy(weights),
                                      fixed_windows(29, window), ratio)
    want = []
    for start in range(0, 29, window):
        end = min(start + window, 29)
        count = max(1, min(end - start, round(ratio * (end - start))))
        if count >= end - start:
            want += list(range(start, end))
        else:
            want += [start + i for i in official_window_mmd(features[start:end], None if weights is None else weights[start:end], count)]
    assert got.tolist() == want
    assert all(got.tolist().count(i) == 1 for i in got.tolist())


def test_window_diversity_keep_is_window_local():
    """Changing one window's tokens never changes what another window keeps (window-local statistics only)."""
    torch.manual_seed(0)
    features, weights = torch.randn(24, 8), torch.rand(24)
    before = seats.window_diversity_keep(features, weights, fixed_windows(24, 8), 0.4)
    features[16:] = torch.randn(8, 8)
    after = seats.window_diversity_keep(features, weights, fixed_windows(24, 8), 0.4)
    assert before[before < 16].tolist() == after[after < 16].tolist()


# ---- Stage II / III ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed, chunks, v, a, ratios, drop_last_audio", [
    (0, 4, 12, 5, (0.93, 0.93), False), (1, 5, 8, 4, (0.3, 0.8), False), (2, 3, 16, 2, (0.1, 0.5), False),
    (3, 4, 6, 6, (0.7949, 0.2986), True), (4, 1, 10, 6, (0.5, 0.5), False), (5, 6, 4, 3, (0.05, 0.05), False)])
def test_inner_llm_keep_equals_the_official_allocation(seed, chunks, v, a, ratios, drop_last_audio):
    rng = np.random.default_rng(seed)
    video_mask, audio_mask = interleaved(rng, chunks, v, a, drop_last_audio=drop_last_audio)
    relevance = rng.dirichlet(np.ones(len(video_mask)) * 0.3).astype(np.float32)
    keep = seats.inner_llm_keep(torch.from_numpy(relevance), video_mask, audio_mask, *ratios)
    want = official_stage2(relevance, video_mask.numpy(), audio_mask.numpy(), *ratios)
    assert keep.tolist() == want.tolist()
    text = ~(video_mask | audio_mask)
    assert bool(keep[text].all())
    budget = max(1, round(ratios[0] * int(video_mask.sum()))) + max(1, round(ratios[1] * int(audio_mask.sum())))
    present = len(seats.temporal_windows(video_mask, audio_mask)) * 2 - int(drop_last_audio)
    # The budget is exact once it covers one token per window and modality; below that each keeps one (official).
    assert int(keep[~text].sum()) == (budget if budget >= present or chunks == 1 else present)


def test_inner_llm_keep_single_modality_is_global_top_k():
    relevance = torch.tensor([9.0, 0.1, 0.5, 0.2, 0.9, 0.3, 0.8, 9.0])
    video = torch.tensor([False, True, True, True, True, True, True, False])
    keep = seats.inner_llm_keep(relevance, video, torch.zeros(8, dtype=torch.bool), 0.5, 0.5)
    assert keep.tolist() == [True, False, True, False, True, False, True, True]


def test_relevance_moves_budget_to_the_relevant_window():
    video_mask, audio_mask = interleaved(None, 3, 10, 5)
    relevance = torch.full((len(video_mask),), 0.01)
    window_one = torch.nonzero(video_mask).squeeze(1)[10:20]
    relevance[window_one] = 0.5  # the second video chunk is what the question is about
    keep = seats.inner_llm_keep(relevance, video_mask, audio_mask, 0.4, 0.4)
    assert bool(keep[window_one].all()) and int(keep[video_mask].sum()) <= 12 + 2


def test_nan_relevance_ranks_last_and_text_only_drops_every_modality_token():
    video_mask, audio_mask = interleaved(None, 2, 4, 2)
    relevance = torch.rand(len(video_mask))
    relevance[torch.nonzero(video_mask).squeeze(1)[0]] = float("nan")
    keep = seats.inner_llm_keep(relevance, video_mask, audio_mask, 0.5, 0.5)
    assert not bool(keep[torch.nonzero(video_mask).squeeze(1)[0]])
    text_only = seats.text_only_keep(video_mask, audio_mask)
    assert text_only.tolist() == (~(video_mask | audio_mask)).tolist()
