"""tokenomy's ToMe against the official computation, with and without class / distillation tokens.

The reference below is a transcription of facebookresearch/ToMe at commit af95e4b1 (kept here as the reference,
not used by the package):
  - tome/merge.py lines 18-97   bipartite_soft_matching (only `merge` is needed)
  - tome/merge.py lines 210-224 merge_wavg
  - tome/merge.py lines 227-239 merge_source
  - tome/patch/timm.py lines 34-56 ToMeBlock.forward, lines 66-96 ToMeAttention.forward,
    lines 138-143 class_token / distill_token flags taken from the model.
"""
import math
import types

import pytest
import torch

from tokenomy.kernels import tome


# ---- transcription of the official ToMe -------------------------------------------------------------------------
def official_bipartite_soft_matching(metric, r, class_token=False, distill_token=False):
    protected = int(class_token) + int(distill_token)
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return lambda x, mode=None: x
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        if distill_token:
            scores[..., :, 0] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    return merge


def official_merge_wavg(merge, x, size=None):
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def official_merge_source(merge, x, source=None):
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t, device=x.device)[None, ...].expand(n, t, t)
    return merge(source, mode="amax")


def official_attention(attn, x, size):
    batch, n, c = x.shape
    qkv = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = (q @ k.transpose(-2, -1)) * attn.scale
    if size is not None:
        scores = scores + size.log()[:, None, None, :, 0]
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, n, c)
    return attn.proj(out), k.mean(1)


def official_block(block, info, x):
    x_attn, metric = official_attention(block.attn, block.norm1(x), info["size"] if info["prop_attn"] else None)
    x = x + x_attn
    r = info["r"].pop(0)
    if r > 0:
        merge = official_bipartite_soft_matching(metric, r, info["class_token"], info["distill_token"])
        info["source"] = official_merge_source(merge, x, info["source"])
        x, info["size"] = official_merge_wavg(merge, x, info["size"])
    return x + block.mlp(block.norm2(x))


@torch.no_grad()
def official_forward(model, images, r):
    info = {"r": [r] * len(model.blocks) if isinstance(r, int) else list(r), "size": None, "source": None,
            "prop_attn": True, "class_token": model.cls_token is not None,
            "distill_token": getattr(model, "dist_token", None) is not None}
    for block in model.blocks:
        block.forward = types.MethodType(lambda self, x, **_: official_block(self, info, x), block)
    try:
        features = model.forward_features(images)
        logits = model.forward_head(features)
    finally:
        for block in model.blocks:
            del block.forward
    return features, logits, info


# ---- models ---------------------------------------------------------------------------------------------------------
def build(kind):
    import timm

    torch.manual_seed(0)
    common = dict(pretrained=False, img_size=64, depth=4, num_classes=10)
    if kind == "class_token":
        return timm.create_model("vit_tiny_patch16_224", **common).eval()
    if kind == "no_class_token":  # SigLIP-style tower: no CLS, average pooling
        return timm.create_model("vit_tiny_patch16_224", class_token=False, global_pool="avg", **common).eval()
    return timm.create_model("deit_tiny_distilled_patch16_224", **common).eval()  # class + distillation token


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["class_token", "no_class_token", "distilled"])
@pytest.mark.parametrize("r", [0, 3, [8, 0, 5, 100]])
@torch.no_grad()
def test_patched_timm_vit_equals_official_tome(kind, r, images):
    model = build(kind)
    want_features, want_logits, info = official_forward(model, images, r)
    with tome.patch(model, r=r) as handle:
        got_features = model.forward_features(images)
        got_logits = model(images)
    torch.testing.assert_close(got_features, want_features, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got_logits, want_logits, atol=2e-5, rtol=1e-5)
    if info["size"] is None:
        assert handle.state.size is None
        return
    torch.testing.assert_close(handle.state.size, info["size"][..., 0])
    # official source: [B, N_out, N0] one-hot per original token; ours: the output row of every original token
    assert torch.equal(handle.state.source, info["source"].argmax(dim=1))


def test_class_token_free_vit_is_patched_and_merges_in_every_block(images):
    model = build("no_class_token")
    with torch.no_grad(), tome.patch(model, r=3) as handle:
        model(images)
    # 16 patch tokens, no CLS: 16 -> 13 -> 10 -> 7 (ToMe's limit (N - 0) // 2 never binds here)
    assert handle.state.tokens == [16, 13, 10, 7]
    torch.testing.assert_close(handle.state.size.sum(-1), torch.full((2,), 16.0))


@pytest.mark.parametrize("n, protected, r, expected_r", [
    (17, (), 100, 8),        # odd N without a class token: ToMe allows 8, not the 9 rows of set A
    (16, (), 100, 8), (17, (0,), 100, 8), (18, (0, 1), 100, 8), (19, (0, 1), 100, 8),
    (17, (0,), 3, 3), (9, (), 0, 0), (9, (), -2, 0), (1, (), 5, 0),
])
def test_r_limit_is_tomes(n, protected, r, expected_r):
    metric = torch.randn(2, n, 8, generator=torch.Generator().manual_seed(n))
    assert tome.bipartite_soft_matching(metric, r, protected).r == expected_r


@pytest.mark.parametrize("class_token, distill_token, n", [(False, False, 16), (False, False, 17), (True, False, 17),
                                                          (True, False, 18), (True, True, 18), (True, True, 19)])
@pytest.mark.parametrize("r", [0, 1, 4, 100])
def test_plan_merges_like_official_tome(class_token, distill_token, n, r):
    generator = torch.Generator().manual_seed(7 * n + r)
    metric = torch.randn(3, n, 12, generator=generator)
    x = torch.randn(3, n, 20, generator=generator)
    size = torch.rand(3, n, generator=generator) + 0.5
    protected = tuple(range(int(class_token) + int(distill_token)))
    plan = tome.bipartite_soft_matching(metric, r, protected)
    official = official_bipartite_soft_matching(metric, r, class_token, distill_token)
    want_x, want_size = official_merge_wavg(official, x, size[..., None])
    got_x, got_size = tome.merge(x, plan, size)
    torch.testing.assert_close(got_size, want_size[..., 0])
    torch.testing.assert_close(got_x, want_x)  # same tokens in the same order
    want_source = official_merge_source(official, x).argmax(dim=1)
    assert torch.equal(plan.out_row, want_source)
    torch.testing.assert_close(tome.unmerge(got_x, plan), got_x.gather(1, want_source[..., None].expand(-1, -1, 20)))


def test_r0_plan_returns_tokens_unchanged():
    x = torch.randn(2, 9, 4)
    plan = tome.bipartite_soft_matching(torch.randn(2, 9, 8), 0)
    merged, size = tome.merge(x, plan)
    assert torch.equal(merged, x) and torch.equal(size, torch.ones(2, 9))
    assert torch.equal(tome.unmerge(merged, plan), x)


def test_non_contiguous_inputs_are_accepted():
    generator = torch.Generator().manual_seed(3)
    metric = torch.randn(2, 8, 17, generator=generator).transpose(1, 2)  # [2, 17, 8] view
    x = torch.randn(2, 6, 17, generator=generator).transpose(1, 2)
    plan = tome.bipartite_soft_matching(metric, 4, (0,))
    official = official_bipartite_soft_matching(metric.contiguous(), 4, class_token=True)
    torch.testing.assert_close(tome.merge(x.contiguous(), plan)[0], official_merge_wavg(official, x.contiguous())[0])
