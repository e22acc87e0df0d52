"""RAR loader: official `rar_*.bin` layout, written from a tiny random state dict, loads strictly and runs."""
import pytest
import torch
import torch.nn.functional as F

from tokenomy.errors import ModelLoadError
from tokenomy.generation.rar import POSITION_SPARE_ROWS, STEP_SPARE_ROWS, load_rar

WIDTH, DEPTH, HEADS, HIDDEN, CODES, CLASSES, SEQ = 32, 2, 4, 64, 24, 5, 9


def official_rar_state(seed=0, zero_block_modulation=False):
    """Official key names and shapes (modeling/rar.py) for a tiny config, random values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.3
    head_dim = WIDTH // HEADS
    state = {"cls_token": r(1, 1, WIDTH), "embeddings.weight": r(CODES + 1 + CLASSES + 1, WIDTH),
             "pos_embed": r(1, SEQ + POSITION_SPARE_ROWS, WIDTH), "target_aware_pos_embed": r(1, SEQ + POSITION_SPARE_ROWS, WIDTH),
             "timesteps_embeddings": r(1, SEQ + STEP_SPARE_ROWS, WIDTH),
             "adaln_before_head.adaLN_modulation.1.weight": r(2 * WIDTH, WIDTH), "adaln_before_head.adaLN_modulation.1.bias": r(2 * WIDTH),
             "lm_head.weight": r(CODES, WIDTH), "lm_head.bias": r(CODES)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        state.update({b + "norm1.weight": 1 + r(WIDTH), b + "norm1.bias": r(WIDTH), b + "norm2.weight": 1 + r(WIDTH), b + "norm2.bias": r(WIDTH),
                      b + "attn.qkv.weight": r(3 * WIDTH, WIDTH), b + "attn.qkv.bias": r(3 * WIDTH),
                      b + "attn.q_norm.weight": 1 + r(head_dim), b + "attn.q_norm.bias": r(head_dim),
                      b + "attn.k_norm.weight": 1 + r(head_dim), b + "attn.k_norm.bias": r(head_dim),
                      b + "attn.proj.weight": r(WIDTH, WIDTH), b + "attn.proj.bias": r(WIDTH),
                      b + "mlp.fc1.weight": r(HIDDEN, WIDTH), b + "mlp.fc1.bias": r(HIDDEN),
                      b + "mlp.fc2.weight": r(WIDTH, HIDDEN), b + "mlp.fc2.bias": r(WIDTH),
                      b + "adaLN_modulation.1.weight": r(6 * WIDTH, WIDTH), b + "adaLN_modulation.1.bias": r(6 * WIDTH)})
        if zero_block_modulation:  # the official adaLN-zero init: every block is the identity
            state[b + "adaLN_modulation.1.weight"].zero_()
            state[b + "adaLN_modulation.1.bias"].zero_()
    return state


@pytest.fixture
def rar_file(tmp_path):
    state = official_rar_state()
    torch.save(state, tmp_path / "rar_tiny.bin")  # the released files are raw state dicts
    return tmp_path / "rar_tiny.bin", state


def test_rar_loads_with_config_inferred_and_parameters_equal(rar_file):
    path, state = rar_file
    model = load_rar(path)
    c = model.config
    assert (c.codebook_size, c.num_classes, c.image_seq_len, c.width, c.depth, c.heads, c.mlp_hidden) == (CODES, CLASSES, SEQ, WIDTH, DEPTH, HEADS, HIDDEN)
    ours = model.state_dict()
    assert torch.equal(ours["target_pos_embed"], state["target_aware_pos_embed"])
    assert torch.equal(ours["blocks.1.mlp.2.weight"], state["blocks.1.mlp.fc2.weight"])
    assert torch.equal(ours["blocks.0.modulation.1.bias"], state["blocks.0.adaLN_modulation.1.bias"])
    assert torch.equal(ours["head.bias"], state["lm_head.bias"])
    assert len(ours) == len(state)


def test_rar_target_aware_embedding_is_next_cell(rar_file):
    """Spec 11.3 item 4: the input x_pi(i) carries T[2 + pi(i+1)]; c carries T[2 + pi(0)]; CLS and the last none."""
    path, state = rar_file
    model = load_rar(path)
    order = torch.randperm(SEQ, generator=torch.Generator().manual_seed(3))[None]
    tokens = torch.randint(0, CODES, (1, SEQ), generator=torch.Generator().manual_seed(4))
    label = torch.tensor([2])
    x, _ = model.input_embeddings(label, tokens, order)
    emb, P, T = state["embeddings.weight"], state["pos_embed"][0], state["target_aware_pos_embed"][0]
    torch.testing.assert_close(x[0, 0], state["cls_token"][0, 0] + P[0])
    torch.testing.assert_close(x[0, 1], emb[CODES + 1 + 2] + P[1] + T[2 + order[0, 0]])
    for i in range(SEQ):
        target = T[2 + order[0, i + 1]] if i + 1 < SEQ else 0
        torch.testing.assert_close(x[0, 2 + i], emb[tokens[0, i]] + P[2 + order[0, i]] + target)


def test_rar_logits_match_hand_written_official_head(tmp_path):
    """With the adaLN-zero blocks at identity, logits = lm_head(LN(x)(1 + scale) + shift), (scale, shift) in that order."""
    state = official_rar_state(seed=1, zero_block_modulation=True)
    torch.save({"model": state}, tmp_path / "wrapped.bin")
    model = load_rar(tmp_path / "wrapped.bin")
    tokens = torch.randint(0, CODES, (2, 4), generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([0, CLASSES])  # a class and the null class
    logits = model(labels, tokens)
    assert logits.shape == (2, 5, CODES)
    emb, P, T, steps = state["embeddings.weight"], state["pos_embed"][0], state["target_aware_pos_embed"][0], state["timesteps_embeddings"][0]
    cond = emb[CODES + 1 + labels]
    x = torch.cat([emb[CODES + 1 + labels][:, None], emb[tokens]], 1) + P[1:6] + T[2:7]  # raster: next cell of slot i is i
    c = cond[:, None] + steps[1:6]
    scale, shift = F.linear(F.silu(c), state["adaln_before_head.adaLN_modulation.1.weight"], state["adaln_before_head.adaLN_modulation.1.bias"]).chunk(2, -1)
    expected = F.linear(F.layer_norm(x, (WIDTH,), eps=1e-6) * (1 + scale) + shift, state["lm_head.weight"], state["lm_head.bias"])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_rar_cached_generation_equals_uncached_and_is_causal(rar_file):
    model = load_rar(rar_file[0])
    labels = torch.tensor([1, 3])
    kwargs = dict(cfg=3.0, cfg_power=2.0, temperature=1.0)
    cached = model.generate(labels, generator=torch.Generator().manual_seed(0), **kwargs)
    uncached = model.generate(labels, generator=torch.Generator().manual_seed(0), use_cache=False, **kwargs)
    assert cached.shape == (2, SEQ) and cached.max() < CODES
    assert torch.equal(cached, uncached)
    order = torch.stack([torch.randperm(SEQ, generator=torch.Generator().manual_seed(s)) for s in (8, 9)])
    shuffled = [model.generate(labels, order=order, generator=torch.Generator().manual_seed(0), use_cache=c, **kwargs) for c in (True, False)]
    assert torch.equal(shuffled[0], shuffled[1])
    tokens = torch.randint(0, CODES, (1, SEQ), generator=torch.Generator().manual_seed(6))
    changed = tokens.clone()
    changed[0, 5] = (changed[0, 5] + 1) % CODES
    a, b = model(torch.tensor([1]), tokens), model(torch.tensor([1]), changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])  # outputs up to x_4 never see x_5
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_rar_bad_checkpoints_name_the_culprit(rar_file, tmp_path):
    path, state = rar_file
    missing = {k: v for k, v in state.items() if k != "blocks.1.attn.proj.bias"}
    torch.save(missing, tmp_path / "missing.bin")
    with pytest.raises(ModelLoadError, match=r"missing keys \['blocks.1.attn.proj.bias'\]"):
        load_rar(tmp_path / "missing.bin")
    torch.save({**state, "blocks.0.attn.extra": torch.zeros(1)}, tmp_path / "extra.bin")
    with pytest.raises(ModelLoadError, match="unexpected keys.*blocks.0.attn.extra"):
        load_rar(tmp_path / "extra.bin")
    torch.save({**state, "blocks.0.mlp.fc2.weight": torch.zeros(WIDTH, HIDDEN + 1)}, tmp_path / "shape.bin")
    with pytest.raises(ModelLoadError, match=r"shape mismatch for \['blocks.0.mlp.fc2.weight: \(32, 65\)"):
        load_rar(tmp_path / "shape.bin")
    with pytest.raises(ModelLoadError, match="yucornetto/RAR.*hub id"):
        load_rar("yucornetto/RAR")
