"""RandAR and the raster GPT against transcriptions of the official forward passes (ziqipang/RandAR @ d374a72,
FoundationVision/LlamaGen), on tiny models with seeded random weights saved in the official layout.

The transcriptions below follow the official code line by line (only module state turned into arguments); they
never call tokenomy. Cited lines: RandAR/model/randar_gpt.py (R), RandAR/model/llamagen_gpt.py (RL),
RandAR/model/generate.py (RG), RandAR/model/utils.py (RU), RandAR/applications/resolution_extrapolation.py (RX),
LlamaGen autoregressive/models/gpt.py (LG).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tests.test_gen_loaders import _official_randar_state
from tokenomy.generation.base import ARConfig
from tokenomy.generation.loaders import load_randar
from tokenomy.generation.raster_ar import RasterAR
from tokenomy.generation.rope2d import grid_angles, rotations

WIDTH, DEPTH, HEADS, HIDDEN, VOCAB, CLASSES, GRID = 32, 2, 4, 128, 24, 5, 4
N = GRID * GRID


# ---------------------------------------------------------------- official transcription (RandAR / LlamaGen)

def precompute_freqs_cis_2d(grid_size, n_elem, base=10000, cls_token_num=1):  # RL 670-694
    half_dim = n_elem // 2
    freqs = 1.0 / (base ** (torch.arange(0, half_dim, 2)[: (half_dim // 2)].float() / half_dim))
    t = torch.arange(grid_size, device=freqs.device)
    freqs = torch.outer(t, freqs)
    freqs_grid = torch.concat([freqs[:, None, :].expand(-1, grid_size, -1), freqs[None, :, :].expand(grid_size, -1, -1)], dim=-1)
    cache_grid = torch.stack([torch.cos(freqs_grid), torch.sin(freqs_grid)], dim=-1)
    cache = cache_grid.flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, n_elem // 2, 2), cache])


def precompute_freqs_cis_2d_extrapolation(grid_size, n_elem, base=10000, cls_token_num=1, extrapolation_factor=2.0,
                                          ntk_boundary=2):  # RX 17-61
    half_dim = n_elem // 2
    power = torch.arange(0, half_dim, 2)[: (half_dim // 2)].float() / half_dim
    freqs = 1.0 / (base**power)
    freqs_extra = freqs.clone()
    base_max_pos = int(grid_size)
    t = torch.linspace(0, base_max_pos - 1, grid_size)
    freqs_extra = torch.outer(t, freqs_extra)
    base_max_pos = int(grid_size // extrapolation_factor)
    t = torch.linspace(0, base_max_pos - 1, grid_size)
    freqs_inter = torch.outer(t, freqs)
    freqs = freqs_extra.clone()
    freqs[:, ntk_boundary:] = freqs_inter[:, ntk_boundary:]
    freqs_grid = torch.concat([freqs[:, None, :].expand(-1, grid_size, -1), freqs[None, :, :].expand(grid_size, -1, -1)], dim=-1)
    cache = torch.stack([torch.cos(freqs_grid), torch.sin(freqs_grid)], dim=-1).flatten(0, 1)
    return torch.cat((torch.zeros(cls_token_num, n_elem // 2, 2), cache), dim=0)


def batch_apply_rotary_emb(x, freqs_cis):  # R 27-45
    bs, seq_len, n_head, head_dim = x.shape
    xshaped = x.float().reshape(*x.shape[:-1], head_dim // 2, 2)
    freqs_cis = freqs_cis.view(bs, xshaped.size(1), 1, xshaped.size(3), 2)
    x_out2 = torch.stack([xshaped[..., 0] * freqs_cis[..., 0] - xshaped[..., 1] * freqs_cis[..., 1],
                          xshaped[..., 1] * freqs_cis[..., 0] + xshaped[..., 0] * freqs_cis[..., 1]], dim=-1)
    return x_out2.flatten(3).type_as(x)


def rms_norm(x, weight, eps=1e-5):  # RL 164-176
    return (x.float() * torch.rsqrt(torch.mean(x.float() * x.float(), dim=-1, keepdim=True) + eps)).type_as(x) * weight


def attention(s, i, x, freqs_cis, input_pos=None, mask=None, kv_cache=None):  # R 77-137 (n_kv_head = n_head)
    bsz, seqlen, _ = x.shape
    head_dim = WIDTH // HEADS
    xq, xk, xv = F.linear(x, s[f"layers.{i}.attention.wqkv.weight"]).split([WIDTH, WIDTH, WIDTH], dim=-1)
    xq, xk, xv = (t.view(bsz, seqlen, HEADS, head_dim) for t in (xq, xk, xv))
    xq, xk = batch_apply_rotary_emb(xq, freqs_cis), batch_apply_rotary_emb(xk, freqs_cis)
    xq, xk, xv = (t.transpose(1, 2) for t in (xq, xk, xv))
    if kv_cache is not None:
        k_out, v_out = kv_cache  # RL KVCache.update: k_cache[:, :, input_pos] = k
        k_out[:, :, input_pos], v_out[:, :, input_pos] = xk, xv
        max_pos = torch.max(input_pos) + 1
        keys, values = k_out[:, :, :max_pos], v_out[:, :, :max_pos]
        mask = mask[:, :, :, :max_pos]
    else:
        keys, values = xk, xv
    output = F.scaled_dot_product_attention(xq, keys, values, attn_mask=mask, is_causal=mask is None)
    return F.linear(output.transpose(1, 2).contiguous().view(bsz, seqlen, WIDTH), s[f"layers.{i}.attention.wo.weight"])


def layers_forward(s, h, freqs_cis, input_pos=None, mask=None, caches=None):  # R 170-181, 409-416 / 443-448
    for i in range(DEPTH):
        h = h + attention(s, i, rms_norm(h, s[f"layers.{i}.attention_norm.weight"]), freqs_cis, input_pos, mask,
                          None if caches is None else caches[i])
        x = rms_norm(h, s[f"layers.{i}.ffn_norm.weight"])
        h = h + F.linear(F.silu(F.linear(x, s[f"layers.{i}.feed_forward.w1.weight"])) * F.linear(x, s[f"layers.{i}.feed_forward.w3.weight"]),
                         s[f"layers.{i}.feed_forward.w2.weight"])
    return F.linear(rms_norm(h, s["norm.weight"]), s["output.weight"]).float()


def interleave_tokens(seq1, seq2):  # RU 41-46
    result = torch.zeros_like(torch.cat((seq1, seq2), dim=1))
    result[:, ::2] = seq1
    result[:, 1::2] = seq2
    return result


def get_position_instruction_tokens(s, token_order, freqs_cis):  # R 450-458
    bs, block = token_order.shape
    tokens = s["pos_instruct_embeddings"].view(1, 1, HEADS, WIDTH // HEADS).repeat(bs, block, 1, 1)
    tokens = batch_apply_rotary_emb(tokens, freqs_cis[1:].clone()[token_order])
    return tokens.view(bs, block, WIDTH).contiguous()


def official_randar_forward_train(s, idx, cond_idx, token_order, freqs_cis):  # R 350-430, eval (no dropout)
    bs = idx.shape[0]
    idx = torch.gather(idx.unsqueeze(-1), 1, token_order.unsqueeze(-1)).squeeze(-1)
    cond_embeddings = s["cls_embedding.embedding_table.weight"][cond_idx].unsqueeze(1)[:, :1]  # RL 78-83
    token_embeddings = s["tok_embeddings.weight"][idx]
    position_instruction_tokens = get_position_instruction_tokens(s, token_order, freqs_cis)
    h = torch.cat((cond_embeddings, interleave_tokens(position_instruction_tokens, token_embeddings)), dim=1)
    token_freqs_cis = freqs_cis[1:].clone()[token_order]
    freqs = torch.cat((freqs_cis[:1].unsqueeze(0).repeat(bs, 1, 1, 1), interleave_tokens(token_freqs_cis, token_freqs_cis)), dim=1)
    logits = layers_forward(s, h, freqs)
    return logits[:, 1::2]


def top_k_top_p_filtering(logits, top_k=0, top_p=1.0, filter_value=-float("Inf"), min_tokens_to_keep=1):  # RG 20-60
    if top_k > 0:
        top_k = min(max(top_k, min_tokens_to_keep), logits.size(-1))
        logits[logits < torch.topk(logits, top_k)[0][..., -1, None]] = filter_value
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        sorted_indices_to_remove = cumulative_probs > top_p
        sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
        sorted_indices_to_remove[..., 0] = 0
        logits[sorted_indices_to_remove.scatter(1, sorted_indices, sorted_indices_to_remove)] = filter_value
    return logits


def sample(logits, temperature=1.0, top_k=0, top_p=1.0):  # RG 63-88
    logits = logits[:, -1, :] / max(temperature, 1e-5)
    if top_k > 0 or top_p < 1.0:
        logits = top_k_top_p_filtering(logits, top_k=top_k, top_p=top_p)
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


def calculate_num_query_tokens_for_parallel_decoding(cur_step, total_step, block_size, query_idx, num_query):  # RU 49-69
    target = min(int((1.0 - math.cos(math.pi / 2.0 * (cur_step + 1) / total_step)) * block_size + 1), block_size)
    return min(max(target - query_idx - num_query, 1), block_size - query_idx - num_query)


def official_randar_generate(s, cond, cfg_scales=(1.0, 1.0), num_inference_steps=-1, temperature=1.0, top_k=0, top_p=1.0,
                             freqs_cis=None, block_size=N, token_order=None):
    """R 496-649 (token_order drawn with randperm when None); returns tokens and every step's (k, guided logits)."""
    bs = cond.shape[0]
    if token_order is None:
        token_order = torch.arange(block_size).unsqueeze(0).repeat(bs, 1).contiguous()
        for i in range(bs):
            token_order[i] = token_order[i][torch.randperm(block_size)]
    result_indices = torch.zeros((bs, block_size), dtype=torch.long)
    position_instruction_tokens = get_position_instruction_tokens(s, token_order, freqs_cis)
    img_token_freq_cis = freqs_cis[1:].clone()[token_order]
    if cfg_scales[-1] > 1.0:
        cond_combined = torch.cat([cond, torch.ones_like(cond) * CLASSES])
        img_token_freq_cis = torch.cat([img_token_freq_cis, img_token_freq_cis])
        position_instruction_tokens = torch.cat([position_instruction_tokens, position_instruction_tokens])
        bs *= 2
    else:
        cond_combined = cond
    cond_combined_tokens = s["cls_embedding.embedding_table.weight"][cond_combined].unsqueeze(1)
    max_seq_length = 8 * math.ceil((1 + block_size * 2) / 8)  # setup_caches: find_multiple(max_seq_len, 8)
    caches = [(torch.zeros(bs, HEADS, max_seq_length, WIDTH // HEADS), torch.zeros(bs, HEADS, max_seq_length, WIDTH // HEADS)) for _ in range(DEPTH)]
    causal_mask = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool)).unsqueeze(0).repeat(bs, 1, 1)
    if num_inference_steps == -1:
        num_inference_steps = block_size
    cur_inference_step, num_query, query_idx, steps = 0, 1, 0, []
    x = torch.cat([cond_combined_tokens, position_instruction_tokens[:, query_idx : query_idx + num_query]], dim=1)
    cur_freqs_cis = torch.cat([freqs_cis[:1].unsqueeze(0).repeat(bs, 1, 1, 1), img_token_freq_cis[:, query_idx : query_idx + num_query]], dim=1)
    input_pos = torch.arange(0, x.shape[1])
    while query_idx <= block_size - num_query and query_idx <= block_size - 1:
        logits = layers_forward(s, x, cur_freqs_cis, input_pos, causal_mask[:bs, None, input_pos], caches)  # R 441-448
        if cfg_scales[-1] > 1.0:
            cur_cfg_scale = cfg_scales[0] + (cfg_scales[-1] - cfg_scales[0]) * query_idx / block_size
            cond_logits, uncond_logits = torch.chunk(logits, 2, dim=0)
            logits = uncond_logits + cur_cfg_scale * (cond_logits - uncond_logits)
        logits = logits[:, -num_query:]
        steps.append((num_query, logits.clone()))
        indices = torch.zeros(result_indices.shape[0], num_query, dtype=torch.long)
        for i in range(num_query):
            indices[:, i : i + 1] = sample(logits[:, i : i + 1], temperature=temperature, top_k=top_k, top_p=top_p)
        result_indices[:, query_idx : query_idx + num_query] = indices.clone()
        img_tokens = s["tok_embeddings.weight"][indices]
        if cfg_scales[-1] > 1.0:
            img_tokens = torch.cat([img_tokens, img_tokens], dim=0)
        cur_inference_step += 1
        num_next = calculate_num_query_tokens_for_parallel_decoding(cur_inference_step, num_inference_steps, block_size, query_idx, num_query)
        x = torch.zeros(bs, 2 * num_query - 1 + num_next, WIDTH)
        x[:, :1] = img_tokens[:, :1]
        x[:, 1 : 2 * num_query - 1][:, ::2] = position_instruction_tokens[:, query_idx + 1 : query_idx + num_query]
        x[:, 1 : 2 * num_query - 1][:, 1::2] = img_tokens[:, 1:num_query]
        next_idx = query_idx + num_query
        x[:, 2 * num_query - 1 :] = position_instruction_tokens[:, next_idx : next_idx + num_next]
        cur_freqs_cis = torch.zeros((bs, 2 * num_query - 1 + num_next, *freqs_cis.shape[-2:]))
        cur_freqs_cis[:, :1] = img_token_freq_cis[:, query_idx : query_idx + 1]
        cur_query_freq_cis = img_token_freq_cis[:, query_idx + 1 : query_idx + num_query]
        cur_freqs_cis[:, 1 : 2 * num_query - 1][:, ::2] = cur_query_freq_cis
        cur_freqs_cis[:, 1 : 2 * num_query - 1][:, 1::2] = cur_query_freq_cis
        cur_freqs_cis[:, 2 * num_query - 1 :] = img_token_freq_cis[:, next_idx : next_idx + num_next]
        query_idx = next_idx
        if query_idx > block_size:
            break
        last_input_pos = input_pos[input_pos.shape[0] - num_query]
        input_pos = torch.arange(2 * num_query - 1 + num_next, dtype=torch.long) + last_input_pos + 1
        num_query = num_next
    reverse_permutation = torch.argsort(token_order, dim=-1).long().unsqueeze(-1).expand(-1, -1, 1)
    return torch.gather(result_indices.unsqueeze(-1), 1, reverse_permutation).squeeze(-1), steps


def official_llamagen_forward_train(s, idx, cond_idx, freqs_cis):  # LG 332-371 (training branch, no dropout)
    cond_embeddings = s["cls_embedding.embedding_table.weight"][cond_idx].unsqueeze(1)[:, :1]
    h = torch.cat((cond_embeddings, s["tok_embeddings.weight"][idx]), dim=1)
    freqs = freqs_cis[: h.shape[1]]  # LG apply_rotary_emb (420-432) broadcasts one table over the batch
    cls_token_num = 1
    return layers_forward(s, h, freqs[None].expand(h.shape[0], -1, -1, -1))[:, cls_token_num - 1 :]


# ---------------------------------------------------------------- fixtures

def official_randar_state(seed=0):
    return _official_randar_state(WIDTH, DEPTH, VOCAB, CLASSES, HIDDEN, seed=seed, scale=0.3)


@pytest.fixture(scope="module")
def randar(tmp_path_factory):
    state = official_randar_state()
    path = tmp_path_factory.mktemp("randar") / "randar_tiny.safetensors"
    save_file(state, str(path))
    return load_randar(path, heads=HEADS, grid=GRID), state


FREQS = precompute_freqs_cis_2d(GRID, WIDTH // HEADS)


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 3, 4])
    tokens = torch.randint(VOCAB, (3, N), generator=g)
    order = torch.stack([torch.randperm(N, generator=g) for _ in range(3)])
    return labels, tokens, order


# ---------------------------------------------------------------- RandAR

def test_randar_rotary_table_is_the_official_one():
    from tokenomy.generation.rope2d import condition_rotation

    table = torch.cat([condition_rotation("zero", 1, WIDTH // HEADS)[0], rotations(grid_angles(GRID, GRID, WIDTH // HEADS))])
    assert torch.equal(table, FREQS)
    extrapolated = precompute_freqs_cis_2d_extrapolation(2 * GRID, WIDTH // HEADS)
    ours = rotations(grid_angles(2 * GRID, 2 * GRID, WIDTH // HEADS, train_grid=GRID))
    torch.testing.assert_close(ours, extrapolated[1:], rtol=0, atol=1e-6)


def test_randar_teacher_forced_logits_equal_official(randar):
    model, state = randar
    labels, tokens, order = _batch(1)
    expected = official_randar_forward_train(state, tokens, labels, order, FREQS)
    ours = model(labels, tokens.gather(1, order), order)
    assert ours.shape == expected.shape == (3, N, VOCAB)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_randar_old_class_token_rotation_is_caught(randar):
    """The rotary of before the fix (class token at angle 0: cos = 1, sin = 0) is far from the official logits."""
    model, state = randar
    labels, tokens, order = _batch(1)
    expected = official_randar_forward_train(state, tokens, labels, order, FREQS)
    model.config.condition_rope = "identity"
    try:
        old = model(labels, tokens.gather(1, order), order)
    finally:
        model.config.condition_rope = "zero"
    assert (old - expected).abs().max() > 1e-2


@pytest.mark.parametrize("steps,cfg_scales,top_k,top_p", [(-1, (1.0, 1.0), 0, 1.0), (-1, (1.5, 3.0), 0, 1.0),
                                                          (6, (1.0, 4.0), 0, 1.0), (5, (2.0, 2.0), 10, 0.8)])
def test_randar_decoding_equals_official_step_by_step_and_seed_for_seed(randar, steps, cfg_scales, top_k, top_p):
    """Cached one-token decoding (steps -1) and parallel decoding: every step's size, guided logits and sampled
    tokens equal the official loop's, the random order included (global seed, as the official sampler)."""
    model, state = randar
    labels = torch.tensor([1, 4, 0])
    torch.manual_seed(7)
    expected_tokens, expected_steps = official_randar_generate(state, labels, cfg_scales, steps, top_k=top_k, top_p=top_p, freqs_cis=FREQS)
    seen = []
    torch.manual_seed(7)
    tokens = model.generate(labels, steps=0 if steps == -1 else steps, cfg=cfg_scales[1], cfg_start=cfg_scales[0],
                            cfg_schedule="constant" if cfg_scales == (1.0, 1.0) else "linear", top_k=top_k, top_p=top_p,
                            on_step=lambda info: seen.append((info["k"], info["logits"].clone())))
    assert [k for k, _ in seen] == [k for k, _ in expected_steps]
    for (_, ours), (_, official) in zip(seen, expected_steps):
        # a CFG weight w scales float rounding by up to 2w - 1: the rtol leaves room for that, 1e-6 of the logit
        torch.testing.assert_close(ours, official, rtol=1e-6, atol=1e-5)
    assert torch.equal(tokens, expected_tokens)


def test_randar_extrapolated_rotary_equals_official_positions(randar):
    """Decoding a 2x grid uses the official extrapolation table: the first step's logits (class token and one
    instruction query at the first cell) equal a forward built on precompute_freqs_cis_2d_extrapolation."""
    model, state = randar
    big = 2 * GRID
    table = precompute_freqs_cis_2d_extrapolation(big, WIDTH // HEADS)
    seen = []
    model.generate(torch.tensor([2]), steps=big * big, order="raster", grid=(big, big), temperature=0,
                   on_step=lambda info: seen.append(info["logits"].clone()) if not seen else None)
    order = torch.arange(big * big)[None]
    h = torch.cat([state["cls_embedding.embedding_table.weight"][torch.tensor([2])].unsqueeze(1),
                   get_position_instruction_tokens(state, order, table)[:, :1]], 1)
    freqs = torch.cat([table[:1], table[1:][order[0, :1]]])[None]
    torch.testing.assert_close(seen[0], layers_forward(state, h, freqs)[:, -1:], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- raster GPT (LlamaGen layout)

def _raster_as_llamagen_state(model):
    """Our raster GPT's weights under LlamaGen's key names (gpt.py Transformer: same trunk as RandAR's minus p)."""
    ours = model.state_dict()
    state = {"tok_embeddings.weight": ours["token_embed.weight"], "cls_embedding.embedding_table.weight": ours["class_embed.weight"],
             "norm.weight": ours["trunk.norm.weight"], "output.weight": ours["trunk.head.weight"]}
    names = {"attention.wqkv": "attention.qkv", "attention.wo": "attention.proj", "feed_forward.w1": "ffn.gate",
             "feed_forward.w3": "ffn.up", "feed_forward.w2": "ffn.down", "attention_norm": "attention_norm", "ffn_norm": "ffn_norm"}
    for i in range(DEPTH):
        state.update({f"layers.{i}.{official}.weight": ours[f"trunk.blocks.{i}.{mine}.weight"] for official, mine in names.items()})
    return state


@pytest.fixture(scope="module")
def raster():
    torch.manual_seed(3)
    model = RasterAR(ARConfig(vocab_size=VOCAB, num_classes=CLASSES, grid_rows=GRID, grid_cols=GRID, width=WIDTH, depth=DEPTH,
                              heads=HEADS, ffn_multiple_of=64)).eval()
    torch.nn.init.normal_(model.trunk.head.weight, std=0.5)
    return model, _raster_as_llamagen_state(model)


def test_raster_teacher_forced_and_cached_logits_equal_llamagen(raster):
    model, state = raster
    labels, tokens, _ = _batch(2)
    expected = official_llamagen_forward_train(state, tokens[:, :-1], labels, FREQS)
    torch.testing.assert_close(model(labels, tokens[:, :-1]), expected, rtol=0, atol=1e-5)
    sampled, step_logits = model.generate(labels, generator=torch.Generator().manual_seed(0), return_logits=True)
    torch.testing.assert_close(step_logits, official_llamagen_forward_train(state, sampled[:, :-1], labels, FREQS), rtol=0, atol=1e-5)
    model.config.condition_rope = "identity"
    try:
        assert (model(labels, tokens[:, :-1]) - expected).abs().max() > 1e-2
    finally:
        model.config.condition_rope = "zero"
