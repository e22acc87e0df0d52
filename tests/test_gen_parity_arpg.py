"""ARPG against a transcription of the official forward pass and sampler (hp-l33/ARPG, models/arpg.py, cited as A
with line numbers), on a tiny model with seeded random weights saved in the official `arpg_*.pt` layout.

The transcription follows the official code (module state turned into arguments) and never calls tokenomy.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.test_gen_official_arpg import CLASSES, CODES, GRID, HEADS, LAYERS, WIDTH, official_arpg_state
from tokenomy.generation.arpg import load_arpg

N = GRID * GRID


def precompute_freqs_cis_2d(grid_size, n_elem, base=10000, cls_token_num=1):  # A 556-569
    half_dim = n_elem // 2
    freqs = 1.0 / (base ** (torch.arange(0, half_dim, 2)[: (half_dim // 2)].float() / half_dim))
    freqs = torch.outer(torch.arange(grid_size), freqs)
    freqs_grid = torch.concat([freqs[:, None, :].expand(-1, grid_size, -1), freqs[None, :, :].expand(grid_size, -1, -1)], dim=-1)
    cache = torch.stack([torch.cos(freqs_grid), torch.sin(freqs_grid)], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, n_elem // 2, 2), cache])


def apply_rotary_emb(x, freqs_cis):  # A 572-582
    xshaped = x.float().reshape(*x.shape[:-1], -1, 2)
    freqs_cis = freqs_cis.view(-1, xshaped.size(1), 1, xshaped.size(3), 2)
    x_out2 = torch.stack([xshaped[..., 0] * freqs_cis[..., 0] - xshaped[..., 1] * freqs_cis[..., 1],
                          xshaped[..., 1] * freqs_cis[..., 0] + xshaped[..., 0] * freqs_cis[..., 1]], dim=-1)
    return x_out2.flatten(3).type_as(x)


def rms_norm(x, weight, eps=1e-5):  # A 83-94
    return (x.float() * torch.rsqrt(torch.mean(x.float() * x.float(), dim=-1, keepdim=True) + eps)).type_as(x) * weight


def heads(t):  # rearrange 'b n (h d) -> b n h d'
    return t.view(t.shape[0], t.shape[1], HEADS, -1)


def feed_forward(s, b, x):  # A 97-113
    return F.linear(F.silu(F.linear(x, s[b + "ffn.w1.weight"])) * F.linear(x, s[b + "ffn.w3.weight"]), s[b + "ffn.w2.weight"])


def attend(q, k, v, training):  # A 171-178 / 236-243
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=training)
    return out.transpose(1, 2).flatten(2)


def decoder_decoder(s, x, q, freqs_cis, training, cache):  # A 323-345 with SelfDecoder 256-264, CrossDecoder 276-286
    for i in range(LAYERS // 2):
        b = f"layers.self_dec.{i}."
        h = rms_norm(x, s[b + "attn_norm.weight"])
        fc = freqs_cis[:, : x.shape[1]]
        qq, kk, vv = (heads(F.linear(h, s[b + f"attn.{p}.weight"])) for p in ("to_q", "to_k", "to_v"))
        qq, kk = apply_rotary_emb(qq, fc), apply_rotary_emb(kk, fc)
        qq, kk, vv = (t.transpose(1, 2) for t in (qq, kk, vv))
        if cache is not None:  # A 141-152: concatenated along the sequence
            if f"self{i}" in cache:
                kk, vv = torch.cat([cache[f"self{i}"][0], kk], -2), torch.cat([cache[f"self{i}"][1], vv], -2)
            cache[f"self{i}"] = (kk, vv)
        x = x + F.linear(attend(qq, kk, vv, training), s[b + "attn.proj.weight"])
        x = x + feed_forward(s, b, rms_norm(x, s[b + "ffn_norm.weight"]))
    x_norm = rms_norm(x, s["layers.norm.weight"])
    k, v = heads(F.linear(x_norm, s["layers.to_k.weight"])), heads(F.linear(x_norm, s["layers.to_v.weight"]))
    k = apply_rotary_emb(k, freqs_cis[:, : k.shape[1]])
    if cache is not None:  # A 308-321, sequence dim 1 (before the heads move)
        if "shared" in cache:
            k, v = torch.cat([cache["shared"][0], k], 1), torch.cat([cache["shared"][1], v], 1)
        cache["shared"] = (k, v)
    for i in range(LAYERS // 2):
        b = f"layers.cross_dec.{i}."
        qq = apply_rotary_emb(heads(F.linear(rms_norm(q, s[b + "attn_norm.weight"]), s[b + "attn.to_q.weight"])), freqs_cis[:, -q.shape[1]:])
        q = q + F.linear(attend(qq.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), training), s[b + "attn.proj.weight"])
        q = q + feed_forward(s, b, rms_norm(q, s[b + "ffn_norm.weight"]))
    return q


def forward_shared(s, input_ids, freqs_cis, num_query=None, training=False, cache=None):  # A 418-428
    x = s["embeddings.weight"][input_ids]
    num_query = input_ids.shape[-1] if num_query is None else num_query
    queries = s["embeddings.weight"][torch.full((input_ids.shape[0], num_query), CODES)]
    x = decoder_decoder(s, x, queries, freqs_cis, training, cache)
    return F.linear(rms_norm(x, s["norm.weight"]), s["head.weight"]).float()


def official_arpg_forward(s, input_ids, condition, orders, freqs_table):  # A 430-451, orders given, no dropout
    condition = (condition + CODES + 1).unsqueeze(-1)
    shuffled_ids = torch.gather(input_ids, 1, orders)
    freqs_cis = freqs_table.unsqueeze(0).repeat(input_ids.shape[0], 1, 1, 1)
    shuffled = torch.gather(freqs_cis[:, 1:], 1, orders.view(*orders.shape, 1, 1).expand(*freqs_cis[:, 1:].shape))
    freqs_cis = torch.cat([freqs_cis[:, :1], shuffled], dim=1)
    return forward_shared(s, torch.cat([condition, shuffled_ids[:, :-1]], dim=-1), freqs_cis, training=True)


def official_arpg_generate(s, condition, freqs_table, guidance_scale=4.0, cfg_schedule="linear", sample_schedule="arccos",
                           temperature=1.0, top_k=0, seq_len=N, num_iter=4):  # A 453-542 (top-p left out: see below)
    num_samples = condition.shape[0]
    freqs_cis_ = freqs_table.unsqueeze(0)
    condition = (condition + CODES + 1).unsqueeze(-1)
    orders = torch.rand(seq_len).argsort(dim=0) + 1
    last_pos, last_range, sequences, steps, cache = 0, range(0, 1), [], [], {}
    for step in range(num_iter):
        if sample_schedule == "arccos":
            mask_ratio = np.arccos(1.0 * (step + 1) / num_iter) / (math.pi * 0.5)
        else:
            mask_ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)
        mask_len = max(1, min(seq_len - last_pos - 1, int(seq_len * mask_ratio)))
        num_pred = seq_len - last_pos - mask_len
        if step == num_iter - 1:
            num_pred = seq_len - last_pos
        next_range = orders[range(last_pos, last_pos + num_pred)]
        last_pos += num_pred
        cfg_scale = 1.0 + (guidance_scale - 1.0) * last_pos / seq_len if cfg_schedule == "linear" else guidance_scale
        freqs_cis = torch.cat([freqs_cis_[:, last_range, ...], freqs_cis_[:, next_range, ...]], dim=1)
        if step == 0:
            input_ids = torch.cat([condition, torch.full_like(condition, CODES + CLASSES + 1)], dim=0)
        else:
            input_ids = torch.cat([sequences[-1], sequences[-1]], dim=0)
        logits = forward_shared(s, input_ids, freqs_cis, num_pred, cache=cache)
        cond_logits, uncond_logits = logits[:num_samples], logits[num_samples:]
        logits = uncond_logits + (cond_logits - uncond_logits) * cfg_scale
        logits = logits[:, -num_pred:] / max(temperature, 1e-5)
        steps.append(logits.clone())
        if top_k > 0:  # A 601-605
            logits[logits < torch.topk(logits, top_k)[0][..., -1, None]] = -float("Inf")
        probs = F.softmax(logits, dim=-1)
        sequences.append(torch.multinomial(probs.flatten(0, 1), num_samples=1).reshape(num_samples, -1))
        last_range = next_range
    sequences = torch.cat(sequences, dim=-1)
    return sequences[:, orders.argsort(dim=0)], steps


FREQS = precompute_freqs_cis_2d(GRID, WIDTH // HEADS)


@pytest.fixture(scope="module")
def arpg(tmp_path_factory):
    state = official_arpg_state()
    path = tmp_path_factory.mktemp("arpg") / "arpg_tiny.pt"
    torch.save({"model": state}, path)
    return load_arpg(path, heads=HEADS, grid=GRID), state


def test_arpg_teacher_forced_logits_equal_official_and_old_condition_rotary_is_caught(arpg):
    model, state = arpg
    g = torch.Generator().manual_seed(3)
    labels, tokens = torch.tensor([0, 2, 1]), torch.randint(CODES, (3, N), generator=g)
    orders = torch.stack([torch.randperm(N, generator=g) for _ in range(3)])
    expected = official_arpg_forward(state, tokens, labels, orders, FREQS)
    ours = model(labels, tokens.gather(1, orders)[:, :-1], orders)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    # the condition token at angle 0 (cos = 1) keeps its q and k: the official logits are missed by far
    model.condition_rotation = lambda batch: torch.stack([torch.ones(batch, 1, WIDTH // HEADS // 2), torch.zeros(batch, 1, WIDTH // HEADS // 2)], -1)
    try:
        assert (model(labels, tokens.gather(1, orders)[:, :-1], orders) - expected).abs().max() > 1e-2
    finally:
        del model.condition_rotation


@pytest.mark.parametrize("num_iter,schedule,cfg_schedule,top_k", [(N, "arccos", "linear", 0), (4, "arccos", "linear", 0),
                                                                   (3, "cosine", "constant", 6)])
def test_arpg_decoding_equals_official_step_by_step_and_seed_for_seed(arpg, num_iter, schedule, cfg_schedule, top_k):
    """Cached decoding (one token per step and several): each step's guided logits and the sampled tokens equal the
    official sampler's for the same global seed (its one batch-wide order, its one draw over all rows)."""
    model, state = arpg
    labels = torch.tensor([2, 0])
    torch.manual_seed(11)
    expected_tokens, expected_steps = official_arpg_generate(state, labels, FREQS, 3.0, cfg_schedule, schedule, top_k=top_k, num_iter=num_iter)
    torch.manual_seed(11)
    tokens, logits = model.generate(labels, steps=num_iter, schedule=schedule, cfg=3.0, cfg_schedule=cfg_schedule, top_k=top_k,
                                    return_logits=True)
    torch.testing.assert_close(logits, torch.cat(expected_steps, 1), rtol=1e-6, atol=1e-5)
    assert torch.equal(tokens, expected_tokens)
