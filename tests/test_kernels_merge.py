"""The PyTorch reference of bipartite soft matching: invariants, a brute-force cross-check, bad input, dispatch."""
import pytest
import torch

from tokenomy.errors import ShapeError, UnknownNameError
from tokenomy.kernels.dispatch import (attention, log_size_bias, match, merge, partition, resolve_backend, unmerge,
                                       unmerge_add)
import tokenomy.kernels.merge as reference


def brute_force_merge(metric, x, r, size):
    """ToMe step by step with Python loops over one sample, alternate partition, canonical output order."""
    n = metric.shape[0]
    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
    unit = metric.double() / metric.double().norm(dim=-1, keepdim=True)
    best = []
    for i in a_pos:
        scores = [float(unit[i] @ unit[j]) for j in b_pos]
        best.append((max(scores), scores.index(max(scores))))
    ranked = sorted(range(len(a_pos)), key=lambda p: (-best[p][0], p))
    src = set(ranked[:r])
    rows, sizes = [], []
    for p in range(len(a_pos)):
        if p not in src:
            rows.append(x[a_pos[p]].double())
            sizes.append(float(size[a_pos[p]]))
    for jb, j in enumerate(b_pos):
        members = [j] + [a_pos[p] for p in sorted(src) if best[p][1] == jb]
        weights = torch.tensor([float(size[t]) for t in members], dtype=torch.float64)
        rows.append((weights[:, None] * x[members].double()).sum(0) / weights.sum())
        sizes.append(float(weights.sum()))
    return torch.stack(rows), torch.tensor(sizes, dtype=torch.float64)


@pytest.mark.parametrize("n,r", [(9, 0), (9, 3), (10, 5), (16, 8), (7, 4)])
def test_reference_equals_brute_force(n, r):
    gen = torch.Generator().manual_seed(n * 31 + r)
    metric, x = torch.randn(2, n, 6, generator=gen), torch.randn(2, n, 5, generator=gen)
    size = torch.rand(2, n, generator=gen) + 0.5
    plan = match(metric, r)
    y, size_y = merge(x, plan, size)
    for b in range(2):
        want_y, want_size = brute_force_merge(metric[b], x[b], r, size[b])
        torch.testing.assert_close(y[b].double(), want_y, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(size_y[b].double(), want_size, atol=1e-5, rtol=1e-5)


def test_r0_merge_then_unmerge_is_identity():
    x = torch.randn(3, 11, 7)
    plan = match(torch.randn(3, 11, 4), 0)
    y, size_y = merge(x, plan)
    assert torch.equal(unmerge(y, plan), x)
    assert torch.equal(size_y, torch.ones(3, 11))


@pytest.mark.parametrize("mode,kw", [("alternate", {}), ("kth", {"k": 3}), ("random2d", {"hw": (4, 6)}),
                                     ("random2d", {"hw": (5, 5), "generator": torch.Generator().manual_seed(3)})])
def test_sizes_always_sum_to_n(mode, kw):
    n = kw["hw"][0] * kw["hw"][1] if "hw" in kw else 23
    metric = torch.randn(2, n, 8)
    a_idx, b_idx, _ = partition(n, (), mode, **kw)
    assert sorted(torch.cat([a_idx, b_idx]).tolist()) == list(range(n))
    size = None
    for r in (0, 1, min(a_idx.numel(), b_idx.numel())):
        plan = match(metric, r, mode=mode, **kw)
        _, size_y = merge(torch.randn(2, n, 3), plan, size)
        torch.testing.assert_close(size_y.sum(-1), torch.full((2,), float(n)))
        assert size_y.shape == (2, n - r)


def test_unmerge_keeps_kept_tokens_and_copies_destinations_to_sources():
    x = torch.randn(2, 14, 5)
    plan = match(torch.randn(2, 14, 6), 4)
    y, _ = merge(x, plan)
    full = unmerge(y, plan)
    for b in range(2):
        kept = plan.a_idx[plan.unm_idx[b]]
        assert torch.equal(full[b, kept], x[b, kept])
        src_tokens = plan.a_idx[plan.src_idx[b]]
        dst_tokens = plan.b_idx[plan.node_idx[b, plan.src_idx[b]]]
        assert torch.equal(full[b, src_tokens], full[b, dst_tokens])
    torch.testing.assert_close(unmerge_add(y, plan, x), x + full)


def test_protected_tokens_are_never_merged_and_stay_first():
    metric = torch.randn(2, 12, 4)
    metric[:, 0] = metric[:, 1]  # the CLS token is a perfect match of token 1, still it must not merge
    plan = match(metric, 5, protected=torch.tensor([11, 0]))
    assert plan.a_idx[:2].tolist() == [0, 11] and 11 not in plan.b_idx.tolist()
    assert torch.all(plan.unm_idx[:, :2] == torch.tensor([0, 1]))
    assert not torch.isin(plan.src_idx, torch.tensor([0, 1])).any()
    assert torch.all(plan.out_row[:, 0] == 0) and torch.all(plan.out_row[:, 11] == 1)


def test_exact_ties_go_to_the_lowest_position():
    basis = torch.eye(3)
    metric = basis[torch.tensor([0, 1, 0, 1, 0, 2, 1, 1])][None]  # A = 0,0,0,1 ; B = 1,1,2,1
    plan = match(metric, 2)
    # the e0 rows of A score 0 against every B row, the e1 row scores 1 against three: first B row wins
    assert plan.node_idx[0].tolist() == [0, 0, 0, 0]
    assert plan.node_max[0].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert sorted(plan.src_idx[0].tolist()) == [0, 3]  # score 1 first, then the lowest position among the zeros


def test_merged_row_is_size_weighted_mean():
    x, size = torch.randn(1, 10, 4), torch.rand(1, 10) + 0.1
    plan = match(torch.randn(1, 10, 3), 5)  # every A row merges
    y, size_y = merge(x, plan, size)
    for j in range(plan.b_idx.numel()):
        start, count = plan.dst_start[0, j], plan.dst_count[0, j]
        members = [int(plan.b_idx[j])] + plan.a_idx[plan.src_idx[0, start:start + count]].tolist()
        w = size[0, members]
        torch.testing.assert_close(y[0, j], (w[:, None] * x[0, members]).sum(0) / w.sum())
        torch.testing.assert_close(size_y[0, j], w.sum())


def test_proportional_attention_over_merged_duplicates_equals_full_attention():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, 6, 16, generator=gen)
    tokens = base.repeat_interleave(2, dim=1)  # every A token (even) duplicates its right neighbour (odd)
    plan = match(tokens.contiguous(), 4)
    merged, size = merge(tokens.contiguous(), plan)
    q = torch.randn(2, 2, 12, 8, generator=gen)
    kv_full = tokens.view(2, 12, 2, 8).transpose(1, 2)
    kv_merged = merged.view(2, 8, 2, 8).transpose(1, 2)
    want = attention(q, kv_full, kv_full)
    got = attention(q, kv_merged, kv_merged, key_log_size=log_size_bias(size))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    wrong = attention(q, kv_merged, kv_merged)
    assert (wrong - want).abs().max() > 1e-3  # without the bias the merged keys are under-weighted


@pytest.mark.parametrize("call,message", [
    (lambda: match(torch.randn(2, 10, 4), 6), "r=6"),
    (lambda: match(torch.randn(2, 10, 4), 5, protected=(0,)), "protected"),
    (lambda: match(torch.randn(2, 10, 4), -1), "r=-1"),
    (lambda: match(torch.randn(2, 4, 10).transpose(1, 2), 2), "contiguous"),
    (lambda: match(torch.randn(10, 4), 2), r"\[B, N, C\]"),
    (lambda: match(torch.randint(0, 3, (2, 10, 4)), 2), "floating"),
    (lambda: match(torch.randn(2, 10, 4), 2, mode="random2d", hw=(3, 3)), "hw"),
    (lambda: match(torch.randn(2, 10, 4), 2, protected=(10,)), "protected"),
])
def test_bad_match_input_raises(call, message):
    with pytest.raises(ShapeError, match=message):
        call()


def test_unknown_partition_mode_lists_the_known_ones():
    with pytest.raises(UnknownNameError, match="random2d"):
        match(torch.randn(2, 10, 4), 2, mode="checker")


def test_bad_merge_input_raises():
    plan = match(torch.randn(2, 10, 4), 3)
    with pytest.raises(ShapeError, match="x must be"):
        merge(torch.randn(2, 9, 4), plan)
    with pytest.raises(ShapeError, match="contiguous"):
        merge(torch.randn(2, 4, 10).transpose(1, 2), plan)
    with pytest.raises(ShapeError, match="float32"):
        merge(torch.randn(2, 10, 4), plan, torch.ones(2, 10, dtype=torch.float64))
    with pytest.raises(ShapeError, match="size must be"):
        merge(torch.randn(2, 10, 4), plan, torch.ones(2, 10, 1))
    y, _ = merge(torch.randn(2, 10, 4), plan)
    with pytest.raises(ShapeError, match="y must be"):
        unmerge(torch.randn(2, 10, 4), plan)
    with pytest.raises(ShapeError, match="residual is torch.float16"):
        unmerge_add(y, plan, torch.randn(2, 10, 4, dtype=torch.float16))
    with pytest.raises(ShapeError, match="residual must be"):
        unmerge_add(y, plan, torch.randn(2, 10, 5))


def test_dispatch_precedence(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("TOKENOMY_MERGE_BACKEND", raising=False)
    assert resolve_backend(cpu) == "torch"
    monkeypatch.setenv("TOKENOMY_MERGE_BACKEND", "triton")
    assert resolve_backend(cpu) == "triton"
    assert resolve_backend(cpu, "torch") == "torch"
    monkeypatch.setenv("TOKENOMY_MERGE_BACKEND", "cuda")
    with pytest.raises(UnknownNameError, match="triton"):
        resolve_backend(cpu)


def test_reference_functions_are_what_the_dispatcher_calls_on_cpu(monkeypatch):
    monkeypatch.delenv("TOKENOMY_MERGE_BACKEND", raising=False)
    metric = torch.randn(2, 9, 4)
    assert torch.equal(match(metric, 3).out_row, reference.match(metric, 3).out_row)


def test_calls_that_need_gradients_take_the_reference_even_when_triton_is_forced(monkeypatch):
    monkeypatch.setenv("TOKENOMY_MERGE_BACKEND", "triton")
    x = torch.randn(2, 10, 4, requires_grad=True)
    plan = reference.match(x.detach(), 3)
    y, _ = merge(x, plan)
    unmerge_add(y, plan, x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
