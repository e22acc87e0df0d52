"""FlexTok encoder loader: a tiny model.safetensors in the official layout, with the Hydra config in its metadata."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tokenomy.errors import ModelLoadError
from tokenomy.tokenizers.flextok_official import load_flextok_encoder

TINY_VAE = {"block_out_channels": [32, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1}
C, P, DIM, DEPTH, HEAD_DIM, REGISTERS, LEVELS = 4, 2, 32, 2, 8, 6, [8, 5, 5, 5]


def flextok_config(n_eval=None):
    """The metadata config tree (Hydra `_target_`s + arguments) of a tiny FlexTok, module names as released."""
    t = "flextok.model."
    return {
        "vae": {"_target_": "flextok.vae_wrapper.StableDiffusionVAE", "latent_channels": C, "scaling_factor": 0.7, "sample_posterior": False},
        "encoder": {"_target_": t + "utils.wrappers.SequentialModuleDictWrapper", "module_dict": {
            "enc_channels_to_last": {"_target_": t + "utils.dict_ops.PerSampleOp", "read_key": "vae_latents"},
            "enc_patch_emb": {"_target_": t + "preprocessors.patching.PatchEmbedder", "channels_in": C, "dim": DIM, "patch_sizes": [P, P], "flatten_patches": False},
            "enc_posemb_module": {"_target_": t + "utils.posembs.PositionalEmbeddingAdder", "dim": DIM, "max_sizes": [8, 8], "posemb_type": "sincos"},
            "enc_register_module": {"_target_": t + "preprocessors.registers.Registers1D", "dim": DIM, "n_min": 1, "n_max": REGISTERS, "n_eval": n_eval},
            "enc_seq_packer": {"_target_": t + "preprocessors.flex_seq_packing.BlockWiseSequencePacker", "mask_mode": "causal_last", "pad_to_multiple": 128},
            "enc_transformer": {"_target_": t + "trunks.transformers.FlexTransformer", "dim": DIM, "depth": DEPTH, "head_dim": HEAD_DIM, "use_act_checkpoint": True},
            "enc_unpacker": {"_target_": t + "postprocessors.seq_unpacking.SequenceUnpacker"},
            "enc_to_latents": {"_target_": t + "postprocessors.heads.LinearHead", "dim": DIM, "dim_out": len(LEVELS), "use_mup_readout": False},
        }},
        "decoder": {"_target_": t + "utils.wrappers.SequentialModuleDictWrapper", "module_dict": {"dec_transformer": {"dim": DIM, "depth": 1}}},
        "regularizer": {"_target_": "flextok.regularizers.quantize_fsq.FSQ", "levels": LEVELS},
    }


def official_state(seed=0):
    from diffusers.models import AutoencoderKL

    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.3
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config({"latent_channels": C, **TINY_VAE})
    state = {f"vae.vae.{k}": v for k, v in vae.state_dict().items()}
    e = "encoder.module_dict."
    hidden = int(2 * 4 * DIM / 3)
    state.update({e + "enc_patch_emb.patch_proj.weight": r(DIM, C * P * P), e + "enc_patch_emb.patch_proj.bias": r(DIM),
                  e + "enc_posemb_module.posembs": r(1, DIM, 8, 8), e + "enc_register_module.registers": r(REGISTERS, DIM),
                  e + "enc_to_latents.proj.weight": r(len(LEVELS), DIM), e + "enc_to_latents.proj.bias": r(len(LEVELS))})
    for i in range(DEPTH):
        b = f"{e}enc_transformer.blocks.{i}."
        state.update({b + f"attn.{p}.weight": r(DIM, DIM) for p in ("wq", "wk", "wv", "proj")})
        state.update({b + "mlp.fc1.weight": r(hidden, DIM), b + "mlp.fc3.weight": r(hidden, DIM), b + "mlp.fc2.weight": r(DIM, hidden)})
    state["decoder.module_dict.dec_transformer.blocks.0.attn.wq.weight"] = r(DIM, DIM)  # the decoder half, skipped
    return state


def write(path, state, config):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={k: repr(v) for k, v in config.items()})
    return path


def reference_register_latents(state, latents, registers):
    """Hand-written official encoder (packed sequence with the causal_last mask, muP attention scale)."""
    e = "encoder.module_dict."
    b, c, h, w = latents.shape
    x = latents.permute(0, 2, 3, 1).reshape(b, h // P, P, w // P, P, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h // P, w // P, -1)
    x = F.linear(x, state[e + "enc_patch_emb.patch_proj.weight"], state[e + "enc_patch_emb.patch_proj.bias"])
    x = x + state[e + "enc_posemb_module.posembs"][0, :, : h // P, : w // P].permute(1, 2, 0)
    n = (h // P) * (w // P)
    x = torch.cat([x.reshape(b, n, DIM), state[e + "enc_register_module.registers"][:registers].expand(b, -1, -1)], 1)
    allowed = torch.zeros(x.shape[1], x.shape[1], dtype=torch.bool)
    allowed[:, :n] = True
    allowed[n:, n:] = torch.tril(torch.ones(registers, registers, dtype=torch.bool))
    heads = DIM // HEAD_DIM
    for i in range(DEPTH):
        p = f"{e}enc_transformer.blocks.{i}."
        hn = F.layer_norm(x, (DIM,))
        q, k, v = (F.linear(hn, state[p + f"attn.{m}.weight"]).view(b, -1, heads, HEAD_DIM).transpose(1, 2) for m in ("wq", "wk", "wv"))
        q, k = F.layer_norm(q, (HEAD_DIM,)), F.layer_norm(k, (HEAD_DIM,))
        scores = (q @ k.transpose(-1, -2) * 8.0 / HEAD_DIM).masked_fill(~allowed, float("-inf"))
        x = x + F.linear((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, DIM), state[p + "attn.proj.weight"])
        hn = F.layer_norm(x, (DIM,))
        x = x + F.linear(F.silu(F.linear(hn, state[p + "mlp.fc1.weight"])) * F.linear(hn, state[p + "mlp.fc3.weight"]), state[p + "mlp.fc2.weight"])
    return F.linear(F.layer_norm(x[:, n:], (DIM,)), state[e + "enc_to_latents.proj.weight"], state[e + "enc_to_latents.proj.bias"])


def test_flextok_encoder_loads_matches_reference_and_tokenizes(tmp_path):
    state = official_state()
    path = write(tmp_path / "model.safetensors", state, flextok_config(n_eval=4))
    model = load_flextok_encoder(tmp_path, vae_config=TINY_VAE)  # the folder holding model.safetensors
    ours = model.state_dict()
    assert torch.equal(ours["blocks.1.fc3.weight"], state["encoder.module_dict.enc_transformer.blocks.1.mlp.fc3.weight"])
    assert torch.equal(ours["vae.encoder.conv_in.weight"], state["vae.vae.encoder.conv_in.weight"])
    assert model.scaling_factor == 0.7 and model.num_tokens == 4
    latents = torch.randn(2, C, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model.register_latents(latents), reference_register_latents(state, latents, 4), rtol=1e-4, atol=1e-4)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ids = model.encode(images)
    assert ids.shape == (2, 4) and ids.max() < 8 * 5 * 5 * 5
    expected = model.fsq(reference_register_latents(state, model.vae.encode(images).latent_dist.mode() * 0.7, 4))[1]
    assert torch.equal(ids, expected)
    assert path.is_file()


def test_flextok_register_prefix_is_causal(tmp_path):
    """Register i never sees registers after it: the first k ids with n_eval = k equal the first k of n_max."""
    state = official_state()
    write(tmp_path / "short.safetensors", state, flextok_config(n_eval=3))
    write(tmp_path / "full.safetensors", state, flextok_config())
    latents = torch.randn(1, C, 8, 8, generator=torch.Generator().manual_seed(3))
    short = load_flextok_encoder(tmp_path / "short.safetensors", vae_config=TINY_VAE).register_latents(latents)
    full = load_flextok_encoder(tmp_path / "full.safetensors", vae_config=TINY_VAE).register_latents(latents)
    assert full.shape[1] == REGISTERS
    torch.testing.assert_close(short, full[:, :3])


def test_flextok_bad_checkpoints_name_the_culprit(tmp_path):
    state = official_state()
    config = flextok_config()
    bad = {k: v for k, v in state.items() if k != "encoder.module_dict.enc_transformer.blocks.1.attn.wk.weight"}
    with pytest.raises(ModelLoadError, match="missing keys.*enc_transformer.blocks.1.attn.wk.weight"):
        load_flextok_encoder(write(tmp_path / "missing.safetensors", bad, config), vae_config=TINY_VAE)
    bad = {**state, "encoder.module_dict.enc_register_module.registers": torch.zeros(REGISTERS, DIM + 1)}
    with pytest.raises(ModelLoadError, match="shape mismatch for.*enc_register_module.registers"):
        load_flextok_encoder(write(tmp_path / "shape.safetensors", bad, config), vae_config=TINY_VAE)
    odd = flextok_config()
    odd["encoder"]["module_dict"]["enc_extra"] = {"_target_": "flextok.model.Something", "dim": 3}
    with pytest.raises(ModelLoadError, match=r"unexpected modules \['enc_extra \(Something\)'\]"):
        load_flextok_encoder(write(tmp_path / "odd.safetensors", state, odd), vae_config=TINY_VAE)
    with pytest.raises(ModelLoadError, match="EPFL-VILAB/flextok_d18_d28_dfn.*hub id"):
        load_flextok_encoder("EPFL-VILAB/flextok_d18_d28_dfn")
