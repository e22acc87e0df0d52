"""The Triton twin equals the PyTorch reference: plans, merged tokens, sizes, unmerge, attention.

Without a GPU the kernels run in Triton's CPU interpreter: tests/conftest.py sets TRITON_INTERPRET=1 before
anything imports triton (Triton decides at decoration time). Grids stay tiny because the interpreter is slow.
"""
import pytest
import torch
import triton

import tokenomy.kernels.merge as reference
import tokenomy.kernels.merge_triton as fused
from tokenomy.errors import ShapeError
from tokenomy.kernels import dispatch

if not torch.cuda.is_available() and not triton.knobs.runtime.interpret:
    raise RuntimeError("no GPU and TRITON_INTERPRET is off: run these tests through tests/conftest.py, or set "
                       "TRITON_INTERPRET=1 before triton is imported")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PLAN_INDEX_FIELDS = ("node_idx", "unm_idx", "src_idx", "dst_start", "dst_count", "out_row")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def assert_plans_equal(want, got):
    for field in PLAN_INDEX_FIELDS:
        assert torch.equal(getattr(want, field), getattr(got, field)), field
    torch.testing.assert_close(got.node_max, want.node_max, atol=1e-5, rtol=1e-5)


def assert_twins_agree(metric, x, r, size=None, generator_seed=None, **match_kw):
    """Both twins see the same inputs; a random partition gets a fresh generator with the same seed each."""
    if generator_seed is not None:
        match_kw["generator"] = torch.Generator().manual_seed(generator_seed)
    want_plan = reference.match(metric, r, **match_kw)
    if generator_seed is not None:
        match_kw["generator"] = torch.Generator().manual_seed(generator_seed)
    got_plan = fused.match(metric, r, **match_kw)
    assert_plans_equal(want_plan, got_plan)
    tol = TOLERANCE[x.dtype]
    want_y, want_size = reference.merge(x, want_plan, size)
    got_y, got_size = fused.merge(x, got_plan, size)
    assert got_y.dtype == x.dtype and got_size.dtype == torch.float32
    torch.testing.assert_close(got_y.float(), want_y.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(got_size, want_size, atol=1e-5, rtol=1e-5)
    assert torch.equal(fused.unmerge(want_y, want_plan), reference.unmerge(want_y, want_plan))
    torch.testing.assert_close(fused.unmerge_add(want_y, want_plan, x).float(),
                               reference.unmerge_add(want_y, want_plan, x).float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("batch,n,c,d,r,dtype", [
    (1, 9, 16, 8, 0, torch.float32),     # r = 0
    (2, 13, 40, 24, 6, torch.float32),   # odd N, r = N // 2, channels over one block
    (3, 20, 8, 8, 10, torch.float16),    # r = N / 2: every A row merges
    (2, 17, 12, 40, 5, torch.bfloat16),
    (2, 150, 8, 8, 37, torch.float32),   # N_b > one 64-column tile, N_a > one 64-row tile
])
def test_triton_equals_reference_on_random_shapes(batch, n, c, d, r, dtype):
    gen = torch.Generator().manual_seed(n * 7 + r)
    metric = torch.randn(batch, n, c, generator=gen).to(DEVICE, dtype)
    x = torch.randn(batch, n, d, generator=gen).to(DEVICE, dtype)
    size = (torch.rand(batch, n, generator=gen) + 0.5).to(DEVICE)
    assert_twins_agree(metric, x, r)
    assert_twins_agree(metric, x, r, size)


@pytest.mark.parametrize("match_kw", [
    {"protected": (0,)},
    {"protected": (0, 14, 15), "mode": "kth", "k": 3},
    {"mode": "random2d", "hw": (4, 4), "generator_seed": 1},
])
def test_triton_equals_reference_with_protection_and_partitions(match_kw):
    gen = torch.Generator().manual_seed(5)
    metric = torch.randn(2, 16, 8, generator=gen).to(DEVICE)
    x = torch.randn(2, 16, 8, generator=gen).to(DEVICE)
    assert_twins_agree(metric, x, 3, **match_kw)


def test_exact_similarity_ties_are_broken_the_same_way():
    gen = torch.Generator().manual_seed(2)
    basis = torch.tensor([[1.0, 0, 0, 0], [0, 2, 0, 0], [1, 1, 0, 0], [0, 0, 3, 1]])
    # integer vectors drawn from four: many A rows tie on their best score, many B rows tie as best match
    metric = basis[torch.randint(0, 4, (2, 90), generator=gen)].to(DEVICE)
    x = torch.randn(2, 90, 8, generator=gen).to(DEVICE)
    plan = reference.match(metric, 30)
    assert (plan.node_max[:, :, None] == plan.node_max[:, None, :]).sum() > 2 * 45 * 4  # ties really exist
    assert_twins_agree(metric, x, 30)


def test_triton_r0_round_trip_is_identity():
    x = torch.randn(2, 11, 8).to(DEVICE)
    plan = fused.match(torch.randn(2, 11, 16).to(DEVICE), 0)
    y, size_y = fused.merge(x, plan)
    assert torch.equal(fused.unmerge(y, plan), x)
    assert torch.equal(size_y, torch.ones(2, 11, device=DEVICE))


def test_triton_bad_input_raises_the_reference_errors():
    metric = torch.randn(2, 10, 4).to(DEVICE)
    with pytest.raises(ShapeError, match="r=6"):
        fused.match(metric, 6)
    with pytest.raises(ShapeError, match="contiguous"):
        fused.match(metric.transpose(1, 2).contiguous().transpose(1, 2), 2)
    plan = fused.match(metric, 2)
    with pytest.raises(ShapeError, match="contiguous"):
        fused.merge(torch.randn(2, 4, 10).to(DEVICE).transpose(1, 2), plan)


def test_dispatch_reaches_triton_when_forced(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    metric = torch.randn(1, 9, 4).to(DEVICE)
    plan = dispatch.match(metric, 2)
    assert_plans_equal(reference.match(metric, 2), plan)
    assert dispatch.resolve_backend(metric) == "triton"


@torch.no_grad()
def test_tome_patch_with_triton_kernels_equals_the_reference_patch():
    import timm

    from tokenomy.kernels import tome

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, depth=3, num_classes=5,
                              embed_dim=64, num_heads=2).eval().to(DEVICE)
    pixels = torch.randn(2, 3, 48, 48).to(DEVICE)
    with tome.patch(model, r=2, backend="torch") as handle:
        want, want_source = model(pixels), handle.state.source
    with tome.patch(model, r=2, backend="triton") as handle:
        got, got_source = model(pixels), handle.state.source
    assert handle.state.tokens == [10, 8, 6]
    assert torch.equal(got_source, want_source)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch,heads,n_q,n_kv,head_dim,dtype,with_bias", [
    (2, 2, 9, 9, 16, torch.float32, True),
    (1, 3, 40, 37, 32, torch.float32, True),   # more than one key tile, N_q != N_kv
    (2, 1, 17, 17, 16, torch.float16, True),
    (1, 2, 5, 5, 16, torch.bfloat16, False),
])
def test_triton_attention_with_log_size_bias_equals_reference(batch, heads, n_q, n_kv, head_dim, dtype, with_bias):
    gen = torch.Generator().manual_seed(n_q + n_kv)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=gen).to(DEVICE, dtype)
               for length in (n_q, n_kv, n_kv))
    bias = (torch.rand(batch, n_kv, generator=gen) * 3 + 1).log().to(DEVICE) if with_bias else None
    want = reference.attention(q.float(), k.float(), v.float(), bias)
    if not fused.attention_supported(q):  # fp32 on a GPU: the dispatcher keeps PyTorch's attention
        with pytest.raises(ShapeError, match="fp16/bf16"):
            fused.attention(q, k, v, bias)
        got = dispatch.attention(q, k, v, bias, backend="triton")
    else:
        got = fused.attention(q, k, v, bias)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_triton_attention_reads_strided_heads_and_refuses_what_it_does_not_cover():
    qkv = torch.randn(2, 7, 3, 2, 16).to(DEVICE, torch.float16).permute(2, 0, 3, 1, 4)  # timm's layout: views
    q, k, v = qkv.unbind(0)
    bias = torch.rand(2, 7).to(DEVICE).log()
    want = reference.attention(q.float(), k.float(), v.float(), bias)
    torch.testing.assert_close(fused.attention(q, k, v, bias).float(), want, atol=1e-2, rtol=1e-2)
    with pytest.raises(ShapeError, match="head dim"):
        fused.attention(q[..., :12], k[..., :12], v[..., :12])
    with pytest.raises(ShapeError, match="key_log_size"):
        fused.attention(q, k, v, bias[:, :5])
    odd = torch.randn(1, 1, 4, 12).to(DEVICE)
    torch.testing.assert_close(dispatch.attention(odd, odd, odd, backend="triton"), reference.attention(odd, odd, odd))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal; CUDA tensors are always accepted")
def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ShapeError, match="need CUDA tensors"):
        fused.match(torch.randn(1, 8, 4), 2)
