"""RAR against a transcription of the official forward pass and sampler (bytedance/1d-tokenizer @ 942a96f,
modeling/rar.py, cited as R with line numbers), tiny model, seeded random weights in the official `rar_*.bin` layout.

The transcription follows the official code (module state turned into arguments) and never calls tokenomy.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from tests.test_gen_official_rar import CLASSES, CODES, DEPTH, HEADS, SEQ, WIDTH, official_rar_state
from tokenomy.generation.rar import load_rar


def layer_norm(x, s, name, eps=1e-6):  # partial(nn.LayerNorm, eps=1e-6), R 205
    return F.layer_norm(x, x.shape[-1:], s.get(name + ".weight"), s.get(name + ".bias"), eps)


def attention(s, b, x, attn_mask, cache):  # R 90-117 (qkv_bias, qk_norm)
    B, N, C = x.shape
    qkv = F.linear(x, s[b + "attn.qkv.weight"], s[b + "attn.qkv.bias"]).reshape(B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = layer_norm(q, s, b + "attn.q_norm"), layer_norm(k, s, b + "attn.k_norm")
    if cache is not None:
        if b in cache:
            k, v = torch.cat([cache[b][0], k], dim=-2), torch.cat([cache[b][1], v], dim=-2)
        cache[b] = (k, v)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return F.linear(x.transpose(1, 2).reshape(B, N, C), s[b + "attn.proj.weight"], s[b + "attn.proj.bias"])


def block(s, i, x, attn_mask, c, cache):  # R 179-184; Mlp = timm fc1, GELU, fc2
    b = f"blocks.{i}."
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = F.linear(F.silu(c), s[b + "adaLN_modulation.1.weight"],
                                                                               s[b + "adaLN_modulation.1.bias"]).chunk(6, dim=-1)
    x = x + gate_msa * attention(s, b, layer_norm(x, s, b + "norm1") * (1 + scale_msa) + shift_msa, attn_mask, cache)
    h = layer_norm(x, s, b + "norm2") * (1 + scale_mlp) + shift_mlp
    return x + gate_mlp * F.linear(F.gelu(F.linear(h, s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"])), s[b + "mlp.fc2.weight"], s[b + "mlp.fc2.bias"])


def shuffle(x, orders):  # R 289-293
    batch_indices = torch.arange(x.shape[0]).unsqueeze(1).expand(-1, x.shape[1])
    return x[batch_indices, orders]


def official_forward_fn(s, input_ids, condition, orders=None, is_sampling=False, cache=None):  # R 319-405
    if orders is None:
        orders = torch.arange(SEQ).expand(input_ids.shape[0], -1)
    input_ids = torch.cat([condition.view(condition.shape[0], -1), input_ids.view(input_ids.shape[0], -1)], dim=1)
    embeddings = s["embeddings.weight"][input_ids]
    condition_token = embeddings[:, 0]
    pos_embed = s["pos_embed"].repeat(input_ids.shape[0], 1, 1)
    prefix = 2
    pos_embed_postfix = shuffle(pos_embed[:, prefix : prefix + SEQ], orders)
    target_aware_pos_embed_postfix = shuffle(s["target_aware_pos_embed"].repeat(input_ids.shape[0], 1, 1)[:, prefix : prefix + SEQ], orders)
    if not is_sampling:
        embeddings = torch.cat([embeddings[:, :1], shuffle(embeddings[:, 1:], orders)], dim=1)
    x = torch.cat((s["cls_token"].expand(embeddings.shape[0], -1, -1), embeddings), dim=1)
    x = x + torch.cat([pos_embed[:, :prefix], pos_embed_postfix], dim=1)[:, : x.shape[1]]
    x = x + torch.cat([torch.zeros_like(x[:, : prefix - 1]), target_aware_pos_embed_postfix, torch.zeros_like(x[:, -1:])], dim=1)[:, : x.shape[1]]
    attn_mask = torch.empty(SEQ + 1024, SEQ + 1024).fill_(float("-inf")).triu_(1)[: x.shape[1], : x.shape[1]]  # R 34-38
    condition_token = condition_token.unsqueeze(1) + s["timesteps_embeddings"][:, : x.shape[1]]
    if cache is not None and cache:
        x, attn_mask, condition_token = x[:, -1:], None, condition_token[:, -1:]
    for i in range(DEPTH):
        x = block(s, i, x, attn_mask, condition_token, cache)
    if cache is None:
        x, condition_token = x[:, prefix - 1 :], condition_token[:, prefix - 1 :]
    scale, shift = F.linear(F.silu(condition_token), s["adaln_before_head.adaLN_modulation.1.weight"],
                            s["adaln_before_head.adaLN_modulation.1.bias"]).chunk(2, dim=-1)  # R 131-134
    x = layer_norm(x, {}, "") * (1 + scale) + shift
    return F.linear(x, s["lm_head.weight"], s["lm_head.bias"])


def official_generate(s, condition, guidance_scale, randomize_temperature, guidance_scale_pow):  # R 408-458, kv_cache=True
    condition = condition + CODES + 1
    num_samples = condition.shape[0]
    ids = torch.full((num_samples, 0), -1)
    cache, steps = {}, []
    for step in range(SEQ):
        scale_pow = torch.ones(1) * guidance_scale_pow
        scale_step = (1 - torch.cos(((step / SEQ) ** scale_pow) * torch.pi)) * 1 / 2
        cfg_scale = (guidance_scale - 1) * scale_step + 1
        logits = official_forward_fn(s, torch.cat([ids, ids], dim=0), torch.cat([condition, torch.full_like(condition, CODES + CLASSES + 1)], dim=0),
                                     is_sampling=True, cache=cache)
        cond_logits, uncond_logits = logits[:num_samples], logits[num_samples:]
        logits = (uncond_logits + (cond_logits - uncond_logits) * cfg_scale)[:, -1] / randomize_temperature
        steps.append(logits.clone())
        ids = torch.cat((ids, torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)), dim=-1)
    return ids, torch.stack(steps, 1)


@pytest.fixture(scope="module")
def rar(tmp_path_factory):
    state = official_rar_state()
    path = tmp_path_factory.mktemp("rar") / "rar_tiny.bin"
    torch.save(state, path)
    return load_rar(path), state


def test_rar_teacher_forced_logits_equal_official_in_any_order(rar):
    model, state = rar
    g = torch.Generator().manual_seed(5)
    labels, tokens = torch.tensor([0, 4, 2]), torch.randint(CODES, (3, SEQ), generator=g)
    orders = torch.stack([torch.randperm(SEQ, generator=g) for _ in range(3)])
    expected = official_forward_fn(state, tokens, labels + CODES + 1, orders)
    torch.testing.assert_close(model(labels, tokens.gather(1, orders), orders), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cfg,power,temperature", [(1.0, 1.0, 1.0), (4.0, 2.5, 1.02)])
def test_rar_cached_sampling_equals_official_seed_for_seed(rar, cfg, power, temperature):
    """The official sampler always runs [cond; null] (CFG weight 1 included): every token equals ours for the
    same global seed, and its per-step guided logits equal our teacher-forced ones on those tokens."""
    model, state = rar
    labels = torch.tensor([1, 3])
    torch.manual_seed(2)
    expected_tokens, expected_logits = official_generate(state, labels, cfg, temperature, power)
    torch.manual_seed(2)
    tokens = model.generate(labels, cfg=cfg, cfg_power=power, temperature=temperature)
    assert torch.equal(tokens, expected_tokens)
    full = lambda lab: model(lab, tokens[:, :-1])
    weights = torch.tensor([(cfg - 1) * (1 - math.cos(math.pi * (j / SEQ) ** power)) / 2 + 1 for j in range(SEQ)])[None, :, None]
    uncond = full(torch.full_like(labels, CLASSES))
    torch.testing.assert_close((uncond + weights * (full(labels) - uncond)) / temperature, expected_logits, rtol=1e-6, atol=1e-5)
