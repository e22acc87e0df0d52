"""ARPG loader: official `arpg_*.pt` layout, written from a tiny random state dict, loads strictly and runs."""
import pytest
import torch
import torch.nn.functional as F

from tokenomy.errors import ModelLoadError
from tokenomy.generation.arpg import arpg_step_sizes, load_arpg

WIDTH, LAYERS, HEADS, HIDDEN, CODES, CLASSES, GRID = 32, 4, 4, 128, 20, 3, 3  # hidden: LlamaGen rounding of 2/3*4*32 to 128


def official_arpg_state(seed=0):
    """Official key names and shapes (models/arpg.py) for a tiny config, random values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.3
    state = {"embeddings.weight": r(CODES + 1 + CLASSES + 2, WIDTH), "layers.norm.weight": 1 + r(WIDTH),
             "layers.to_k.weight": r(WIDTH, WIDTH), "layers.to_v.weight": r(WIDTH, WIDTH), "norm.weight": 1 + r(WIDTH),
             "head.weight": r(CODES, WIDTH)}
    for part in ("self_dec", "cross_dec"):
        for i in range(LAYERS // 2):
            b = f"layers.{part}.{i}."
            projections = ("to_q", "to_k", "to_v", "proj") if part == "self_dec" else ("to_q", "proj")
            state.update({b + f"attn.{p}.weight": r(WIDTH, WIDTH) for p in projections})
            state.update({b + "attn_norm.weight": 1 + r(WIDTH), b + "ffn_norm.weight": 1 + r(WIDTH),
                          b + "ffn.w1.weight": r(HIDDEN, WIDTH), b + "ffn.w3.weight": r(HIDDEN, WIDTH), b + "ffn.w2.weight": r(WIDTH, HIDDEN)})
    return state


@pytest.fixture
def arpg_file(tmp_path):
    state = official_arpg_state()
    # the way train_c2i.py saves: weights under "model" next to optimizer state and the step count
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "steps": 100}, tmp_path / "arpg_tiny.pt")
    return tmp_path / "arpg_tiny.pt", state


def test_arpg_loads_with_config_inferred_and_parameters_equal(arpg_file):
    path, state = arpg_file
    model = load_arpg(path, heads=HEADS, grid=GRID)
    c = model.config
    assert (c.vocab_size, c.num_classes, c.width, c.depth, c.heads, c.grid) == (CODES, CLASSES, WIDTH, LAYERS, HEADS, GRID)
    ours = model.state_dict()
    assert len(ours) == len(state)
    assert torch.equal(ours["self_blocks.1.attention.k.weight"], state["layers.self_dec.1.attn.to_k.weight"])
    assert torch.equal(ours["cross_blocks.0.ffn.up.weight"], state["layers.cross_dec.0.ffn.w3.weight"])
    assert torch.equal(ours["context_v.weight"], state["layers.to_v.weight"])


def test_arpg_first_step_matches_hand_written_official_computation(arpg_file):
    """Step 0 has one context entry (the class token), so every attention returns its value: the official
    computation reduces to projections, SwiGLUs and RMSNorms of the class and mask embeddings, for any target cell."""
    path, state = arpg_file
    model = load_arpg(path, heads=HEADS, grid=GRID)
    rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    ffn = lambda x, b: F.linear(F.silu(F.linear(x, state[b + "ffn.w1.weight"])) * F.linear(x, state[b + "ffn.w3.weight"]), state[b + "ffn.w2.weight"])
    label = 2
    h = state["embeddings.weight"][CODES + 1 + label]
    for i in range(LAYERS // 2):
        b = f"layers.self_dec.{i}."
        h = h + F.linear(F.linear(rms(h, state[b + "attn_norm.weight"]), state[b + "attn.to_v.weight"]), state[b + "attn.proj.weight"])
        h = h + ffn(rms(h, state[b + "ffn_norm.weight"]), b)
    value = F.linear(rms(h, state["layers.norm.weight"]), state["layers.to_v.weight"])
    q = state["embeddings.weight"][CODES]  # the mask token
    for i in range(LAYERS // 2):
        b = f"layers.cross_dec.{i}."
        q = q + F.linear(value, state[b + "attn.proj.weight"])
        q = q + ffn(rms(q, state[b + "ffn_norm.weight"]), b)
    expected = F.linear(rms(q, state["norm.weight"]), state["head.weight"])
    order = torch.tensor([[4, 0, 8, 1, 2, 3, 5, 6, 7]])
    logits = model(torch.tensor([label]), torch.zeros(1, 0, dtype=torch.long), order[:, :1])
    torch.testing.assert_close(logits[0, 0], expected, rtol=1e-4, atol=1e-4)


def test_arpg_cached_one_per_step_equals_training_layout_and_queries_are_independent(arpg_file):
    model = load_arpg(arpg_file[0], heads=HEADS, grid=GRID)
    order = torch.randperm(GRID**2, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2])
    tokens, logits = model.generate(labels, steps=GRID**2, order=order, cfg=2.5, cfg_schedule="linear", temperature=0,
                                    return_logits=True)
    assert tokens.shape == (2, GRID**2) and logits.shape == (2, GRID**2, CODES)
    in_order = tokens[:, order]
    orders = order.expand(2, -1)
    full = lambda lab: model(lab, in_order[:, :-1], orders)
    weights = torch.tensor([1 + 1.5 * (j + 1) / GRID**2 for j in range(GRID**2)])[None, :, None]
    uncond = full(torch.full_like(labels, CLASSES))
    torch.testing.assert_close(logits, uncond + weights * (full(labels) - uncond), rtol=1e-4, atol=1e-4)
    # a query's prediction depends on its context and its own cell, never on the other queries of the step
    few = model(labels, in_order[:, :3], orders[:, :4])
    swapped = model(labels, in_order[:, :3], torch.cat([orders[:, :3], orders[:, 7:8]], 1))
    torch.testing.assert_close(few[:, :3], swapped[:, :3])
    parallel = model.generate(labels, steps=4, order=order, cfg=2.5, generator=torch.Generator().manual_seed(0))
    assert parallel.shape == (2, GRID**2) and parallel.max() < CODES


def test_arpg_step_schedule_matches_official_sizes():
    sizes = arpg_step_sizes(256, 64)
    assert len(sizes) == 64 and sum(sizes) == 256 and sizes[:4] == [3, 3, 2, 3] and sizes[-3:] == [10, 12, 28]
    assert sum(arpg_step_sizes(256, 64, "cosine")) == 256 and arpg_step_sizes(9, 9) == [1] * 9


def test_arpg_bad_checkpoints_name_the_culprit(arpg_file, tmp_path):
    path, state = arpg_file
    torch.save({"model": {k: v for k, v in state.items() if k != "layers.cross_dec.1.attn.to_q.weight"}}, tmp_path / "missing.pt")
    with pytest.raises(ModelLoadError, match=r"missing keys \['layers.cross_dec.1.attn.to_q.weight'\]"):
        load_arpg(tmp_path / "missing.pt", heads=HEADS, grid=GRID)
    torch.save({"module": {**state, "layers.cross_dec.0.attn.to_k.weight": torch.zeros(WIDTH, WIDTH)}}, tmp_path / "extra.pt")
    with pytest.raises(ModelLoadError, match="unexpected keys.*layers.cross_dec.0.attn.to_k.weight"):
        load_arpg(tmp_path / "extra.pt", heads=HEADS, grid=GRID)
    torch.save({**state, "layers.to_k.weight": torch.zeros(WIDTH, WIDTH + 2)}, tmp_path / "shape.pt")
    with pytest.raises(ModelLoadError, match="shape mismatch for.*layers.to_k.weight"):
        load_arpg(tmp_path / "shape.pt", heads=HEADS, grid=GRID)
    with pytest.raises(ModelLoadError, match="heads="):
        load_arpg(path)
    with pytest.raises(ModelLoadError, match="hp-l33/ARPG.*hub id"):
        load_arpg("hp-l33/ARPG")
