"""Official-format loaders, exercised on randomly initialised state dicts saved in those layouts."""
import pytest
import torch
from safetensors.torch import save_file

from tokenomy.errors import ModelLoadError
from tokenomy.generation.loaders import flextok_hyperparameters, load_randar, load_torch_state_dict, read_flextok_config


def _official_randar_state(width=64, depth=2, vocab=40, classes=5, hidden=256, seed=0, scale=0.05):
    """Random weights under the official RandAR parameter names (ziqipang/RandAR llamagen_gpt.py)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * scale
    state = {"tok_embeddings.weight": r(vocab, width), "cls_embedding.embedding_table.weight": r(classes + 1, width),
             "norm.weight": 1 + r(width), "output.weight": r(vocab, width), "pos_instruct_embeddings": r(1, width)}
    for i in range(depth):
        state.update({f"layers.{i}.attention.wqkv.weight": r(3 * width, width), f"layers.{i}.attention.wo.weight": r(width, width),
                      f"layers.{i}.feed_forward.w1.weight": r(hidden, width), f"layers.{i}.feed_forward.w3.weight": r(hidden, width),
                      f"layers.{i}.feed_forward.w2.weight": r(width, hidden), f"layers.{i}.attention_norm.weight": 1 + r(width),
                      f"layers.{i}.ffn_norm.weight": 1 + r(width)})
    return state


def test_randar_safetensors_loads_strictly_and_runs(tmp_path):
    state = _official_randar_state()
    path = tmp_path / "randar_tiny.safetensors"
    save_file(state, str(path))
    model = load_randar(path, heads=4, grid=4)
    assert model.config.vocab_size == 40 and model.config.num_classes == 5 and model.config.depth == 2
    torch.testing.assert_close(model.trunk.blocks[1].ffn.down.weight, state["layers.1.feed_forward.w2.weight"])
    torch.testing.assert_close(model.instruction, state["pos_instruct_embeddings"][0])
    tokens = model.generate(torch.tensor([0, 4]), steps=5, cfg=2.0, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 16) and tokens.max() < 40


def test_randar_loader_rejects_foreign_keys_and_shapes(tmp_path):
    state = _official_randar_state()
    save_file({**state, "layers.0.attention.bogus": torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ModelLoadError, match="unexpected"):
        load_randar(tmp_path / "extra.safetensors", heads=4, grid=4)
    bad = dict(state)
    bad["layers.1.attention.wo.weight"] = torch.zeros(64, 32)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelLoadError, match="shape"):
        load_randar(tmp_path / "bad.safetensors", heads=4, grid=4)
    with pytest.raises(ModelLoadError, match="not found"):
        load_randar(tmp_path / "absent.safetensors")


def test_torch_checkpoint_unwrapping(tmp_path):
    state = {"a.weight": torch.ones(2)}
    torch.save({"model": {"module.a.weight": torch.ones(2)}, "step": 3}, tmp_path / "wrapped.pt")
    assert load_torch_state_dict(tmp_path / "wrapped.pt").keys() == state.keys()


def test_flextok_metadata_config_is_parsed_not_instantiated(tmp_path):
    metadata = {
        "encoder": repr({"_target_": "flextok.model.FlexTokEncoder", "module_dict": {"enc_seq_packer": {"n_max": 256},
                          "enc_transformer": {"_target_": "x.Transformer", "dim": 768, "depth": 12}}}),
        "decoder": repr({"_target_": "flextok.model.Decoder", "module_dict": {"dec_transformer": {"dim": 768, "depth": 12}}}),
        "regularizer": repr({"_target_": "flextok.regularizers.FSQ", "levels": [8, 8, 8, 5, 5, 5]}),
        "vae": repr({"_target_": "flextok.vae.StableVAE", "scaling_factor": 0.88}),
    }
    save_file({"encoder.module_dict.enc_transformer.x": torch.zeros(1)}, str(tmp_path / "model.safetensors"), metadata=metadata)
    config = read_flextok_config(tmp_path / "model.safetensors")
    assert config["vae"]["scaling_factor"] == 0.88
    assert flextok_hyperparameters(config) == {"encoder_dim": 768, "encoder_depth": 12, "decoder_dim": 768, "decoder_depth": 12,
                                               "num_registers": 256, "levels": [8, 8, 8, 5, 5, 5]}
