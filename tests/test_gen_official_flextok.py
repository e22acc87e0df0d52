"""FlexTok encoder loader: a tiny model.safetensors in the official layout, with the Hydra config in its metadata."""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tokenomy.errors import InputError, ModelLoadError
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


# ---- the rectified-flow decoder (module layout of the official classes; synthetic config, no released one read) ----
from tokenomy.tokenizers.flextok_official_decoder import load_flextok  # noqa: E402

DEC_DEPTH, FREQS, GRID = 2, 16, 4  # decoder depth, time-embedding frequencies, posemb table side (latent 8 -> 4 patches)


def official_decoder_modules(t, *, channels, patch, dim, head_dim, depth, registers, levels, grid, freqs, size_sampling):
    """The FlexTok decoder's module_dict as ml-flextok's configs write it (rectified-flow decoder over FSQ registers)."""
    return {
        "dec_from_latents": {"_target_": t + "preprocessors.linear.LinearLayer", "read_key": "quants", "write_key": "dec_quants", "dim_in": levels, "dim": dim},
        "dec_registers_posemb_module": {"_target_": t + "utils.posembs.PositionalEmbeddingAdder", "read_key": "dec_quants", "write_key": "dec_quants",
                                        "dim": dim, "max_sizes": [registers], "posemb_type": "learnable_sum", "posemb_scaling": "absolute"},
        "dec_nested_dropout": {"_target_": t + "preprocessors.token_dropout.MaskedNestedDropout", "read_write_key": "dec_quants", "dim": dim,
                               "eval_keep_k_read_key": "eval_keep_k", "train_keep_k_write_key": "train_keep_k", "size_sampling_mode": size_sampling},
        "dec_latent_dropout": {"_target_": t + "preprocessors.nullcond.LearnedNullCond", "read_write_key": "dec_quants", "dim": dim, "dropout_prob": 0.2},
        "dec_noise_channels_to_last": {"_target_": t + "utils.dict_ops.PerSampleOp", "read_key": "noised_images", "write_key": "dec_noised_last",
                                       "per_sample_op": {"_target_": t + "utils.dict_ops.channels_first_to_last", "_partial_": True}},
        "dec_noise_patch_emb": {"_target_": t + "preprocessors.patching.PatchEmbedder", "input_tensor_list_read_key": "dec_noised_last",
                                "patches_list_write_key": "dec_patches", "n_patches_write_key": "dec_n_patches", "patch_sizes": [patch, patch],
                                "channels_in": channels, "dim": dim, "flatten_patches": False},
        "dec_patches_posemb_module": {"_target_": t + "utils.posembs.PositionalEmbeddingAdder", "read_key": "dec_patches", "write_key": "dec_patches",
                                      "dim": dim, "max_sizes": [grid, grid], "posemb_type": "sincos"},
        "dec_seq_packer": {"_target_": t + "preprocessors.flex_seq_packing.BlockWiseSequencePacker", "input_list_read_keys": ["dec_patches", "dec_quants"],
                           "packed_seq_write_key": "dec_packed", "block_mask_write_key": "dec_mask", "inner_packed_shapes_write_key": "dec_ps_inner",
                           "outer_packed_shapes_write_key": "dec_ps_outer", "mask_mode": "full", "pad_to_multiple": 128,
                           "emb_packing_fn_write_key": "dec_emb_fn", "per_subseq_embs": True},
        "dec_time_embedder": {"_target_": t + "preprocessors.time_embedding.TimestepEmbedder", "timesteps_read_key": "timesteps",
                              "time_embedding_write_key": "dec_temb", "dim": dim, "frequency_embedding_size": freqs, "max_timestep": 1.0},
        "dec_transformer": {"_target_": t + "trunks.transformers.FlexTransformer", "input_seq_read_key": "dec_packed", "output_seq_write_key": "dec_out",
                            "dim": dim, "depth": depth, "head_dim": head_dim, "block_mask_read_key": "dec_mask", "adaLN_emb_read_key": "dec_temb",
                            "adaLN_packing_fn_read_key": "dec_emb_fn", "adaLN_expansion": 2, "use_act_checkpoint": True},
        "dec_unpacker": {"_target_": t + "postprocessors.seq_unpacking.SequenceUnpacker", "packed_seq_read_key": "dec_out",
                         "inner_seq_write_keys": ["dec_patches_out", "dec_registers_out"], "inner_packed_shapes_read_key": "dec_ps_inner",
                         "outer_packed_shapes_read_key": "dec_ps_outer"},
        "dec_to_patches": {"_target_": t + "postprocessors.heads.ToPatchesLinearHead", "read_key": "dec_patches_out", "write_key": "dec_velocity_last",
                           "dim": dim, "channels_out": channels, "patch_sizes": [patch, patch], "use_mup_readout": False, "adaLN_emb_read_key": "dec_temb"},
        "dec_channels_to_first": {"_target_": t + "utils.dict_ops.PerSampleOp", "read_key": "dec_velocity_last", "write_key": "velocity",
                                  "per_sample_op": {"_target_": t + "utils.dict_ops.channels_last_to_first", "_partial_": True}},
    }


def full_flextok_config(**overrides):
    """Encoder as above plus a decoder module_dict in the order and with the keys the official wrapper expects."""
    t = "flextok.model."
    config = flextok_config()
    config["regularizer"].update(quants_write_key="quants", tokens_write_key="tokens")
    config["pipeline"] = {"_target_": "flextok.flow_matching.pipelines.MinRFPipeline", "_partial_": True,
                          "target_sizes_read_key": "vae_image_sizes", "latents_read_key": "quants", "timesteps_read_key": "timesteps",
                          "noised_images_read_key": "noised_images", "reconst_write_key": "velocity", "out_channels": C}
    modules = official_decoder_modules(t, channels=C, patch=P, dim=DIM, head_dim=HEAD_DIM, depth=DEC_DEPTH, registers=REGISTERS,
                                       levels=len(LEVELS), grid=GRID, freqs=FREQS, size_sampling="pow2")
    config["decoder"] = {"_target_": t + "utils.wrappers.SequentialModuleDictWrapper", "module_dict": modules}
    for name, changes in overrides.items():
        modules[name] = {**modules.get(name, {}), **changes}
    return config


def official_decoder_embedding_state(r, d, *, channels, patch, dim, registers, levels, grid, freqs) -> dict:
    """Random weights for the FlexTok decoder's modules around its transformer, under their official names."""
    flat = channels * patch * patch
    return {d + "dec_from_latents.proj.weight": r(dim, levels), d + "dec_from_latents.proj.bias": r(dim),
            d + "dec_registers_posemb_module.posembs": r(1, 1, dim, registers),
            d + "dec_nested_dropout.dropout_mask_token": r(dim), d + "dec_latent_dropout.nullcond": r(dim),
            d + "dec_noise_patch_emb.patch_proj.weight": r(dim, flat), d + "dec_noise_patch_emb.patch_proj.bias": r(dim),
            d + "dec_patches_posemb_module.posembs": r(1, dim, grid, grid),
            d + "dec_time_embedder.mlp.0.weight": r(dim, freqs), d + "dec_time_embedder.mlp.0.bias": r(dim),
            d + "dec_time_embedder.mlp.2.weight": r(dim, dim), d + "dec_time_embedder.mlp.2.bias": r(dim),
            d + "dec_to_patches.adaLN_modulation.1.weight": r(2 * dim, dim), d + "dec_to_patches.adaLN_modulation.1.bias": r(2 * dim),
            d + "dec_to_patches.proj.weight": r(flat, dim), d + "dec_to_patches.proj.bias": r(flat)}


def official_full_state(seed=0):
    """Encoder state as above plus the decoder keys the official classes register (activation-checkpoint prefix kept)."""
    g = torch.Generator().manual_seed(seed + 100)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.3
    state = {k: v for k, v in official_state(seed).items() if not k.startswith("decoder.")}
    d = "decoder.module_dict."
    hidden = int(2 * 4 * DIM / 3)
    state.update(official_decoder_embedding_state(r, d, channels=C, patch=P, dim=DIM, registers=REGISTERS,
                                                  levels=len(LEVELS), grid=GRID, freqs=FREQS))
    for i in range(DEC_DEPTH):
        b = f"{d}dec_transformer.blocks.{i}._checkpoint_wrapped_module."
        state.update({b + f"attn.{p}.weight": r(DIM, DIM) for p in ("wq", "wk", "wv", "proj")})
        state.update({b + "mlp.fc1.weight": r(hidden, DIM), b + "mlp.fc3.weight": r(hidden, DIM), b + "mlp.fc2.weight": r(DIM, hidden)})
        state.update({b + "adaLN_modulation.1.weight": r(2 * 6 * DIM, DIM), b + "adaLN_modulation.1.bias": r(2 * 6 * DIM)})
    return state


def reference_velocity(state, noised, t, codes, keep_k, null):
    """One hand-written velocity evaluation of the synthetic decoder, sample by sample, straight from official keys."""
    d = "decoder.module_dict."
    s = lambda key: state[d + key]
    out = []
    for x, time, code, keep, drop in zip(noised, t, codes, keep_k, null):
        regs = F.linear(code, s("dec_from_latents.proj.weight"), s("dec_from_latents.proj.bias"))
        regs = regs + s("dec_registers_posemb_module.posembs")[0, 0].T
        regs = torch.cat([regs[:keep], s("dec_nested_dropout.dropout_mask_token").expand(REGISTERS - keep, DIM)])
        if drop:
            regs = s("dec_latent_dropout.nullcond").expand(REGISTERS, DIM)
        h, w = x.shape[1] // P, x.shape[2] // P
        patches = torch.stack([torch.stack([x[:, P * i:P * i + P, P * j:P * j + P].permute(1, 2, 0).reshape(-1) for j in range(w)]) for i in range(h)])
        patches = F.linear(patches, s("dec_noise_patch_emb.patch_proj.weight"), s("dec_noise_patch_emb.patch_proj.bias"))
        patches = patches + s("dec_patches_posemb_module.posembs")[0, :, :h, :w].permute(1, 2, 0)
        seq = torch.cat([patches.reshape(h * w, DIM), regs])
        freqs = torch.exp(-math.log(256) * torch.arange(FREQS // 2) / (FREQS // 2)) * 1000.0
        temb = torch.cat([torch.cos(time * freqs), torch.sin(time * freqs)])
        temb = F.linear(F.silu(F.linear(temb, s("dec_time_embedder.mlp.0.weight"), s("dec_time_embedder.mlp.0.bias"))),
                        s("dec_time_embedder.mlp.2.weight"), s("dec_time_embedder.mlp.2.bias"))
        heads = DIM // HEAD_DIM
        for i in range(DEC_DEPTH):
            p = f"dec_transformer.blocks.{i}._checkpoint_wrapped_module."
            mod = F.linear(F.silu(temb), s(p + "adaLN_modulation.1.weight"), s(p + "adaLN_modulation.1.bias")).view(2, 6 * DIM)
            mod = torch.cat([mod[0].expand(h * w, -1), mod[1].expand(REGISTERS, -1)])  # patches, then registers
            g_msa, g_mlp, sh_msa, sc_msa, sh_mlp, sc_mlp = mod.chunk(6, -1)
            hn = F.layer_norm(seq, (DIM,)) * (1 + sc_msa) + sh_msa
            q, k, v = (F.linear(hn, s(p + f"attn.{m}.weight")).view(-1, heads, HEAD_DIM).transpose(0, 1) for m in ("wq", "wk", "wv"))
            q, k = F.layer_norm(q, (HEAD_DIM,)), F.layer_norm(k, (HEAD_DIM,))
            attn = ((q @ k.transpose(-1, -2)) * 8.0 / HEAD_DIM).softmax(-1) @ v
            seq = seq + g_msa * F.linear(attn.transpose(0, 1).reshape(-1, DIM), s(p + "attn.proj.weight"))
            hn = F.layer_norm(seq, (DIM,)) * (1 + sc_mlp) + sh_mlp
            seq = seq + g_mlp * F.linear(F.silu(F.linear(hn, s(p + "mlp.fc1.weight"))) * F.linear(hn, s(p + "mlp.fc3.weight")), s(p + "mlp.fc2.weight"))
        shift, scale = F.linear(F.silu(temb), s("dec_to_patches.adaLN_modulation.1.weight"), s("dec_to_patches.adaLN_modulation.1.bias")).chunk(2)
        y = F.linear(F.layer_norm(seq[: h * w], (DIM,)) * (1 + scale) + shift, s("dec_to_patches.proj.weight"), s("dec_to_patches.proj.bias"))
        y = y.view(h, w, P, P, C).permute(4, 0, 2, 1, 3).reshape(C, h * P, w * P)
        out.append(y)
    return torch.stack(out)


def reference_apg(cond, uncond, scale, running):
    """Normalized guidance: momentum -0.5 on cond - uncond, norm clipped to 2.5, only the part orthogonal to cond."""
    diff = (cond - uncond) - 0.5 * running
    norms = diff.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert (norms > 2.5).any()  # the clip is exercised
    diff = diff * torch.clamp(2.5 / norms, max=1.0)
    unit = cond.double().flatten(1) / cond.double().flatten(1).norm(dim=1, keepdim=True)
    flat = diff.double().flatten(1)
    orthogonal = flat - (flat * unit).sum(1, keepdim=True) * unit
    return cond + (scale - 1) * orthogonal.view_as(cond).float()


def test_flextok_decoder_loads_strictly_and_one_velocity_matches_reference(tmp_path):
    state = official_full_state()
    write(tmp_path / "model.safetensors", state, full_flextok_config())
    model = load_flextok(tmp_path, vae_config=TINY_VAE)
    ours = model.state_dict()
    for key, value in state.items():  # every saved tensor, encoder and decoder, landed unchanged
        mapped = key.replace("_checkpoint_wrapped_module.", "").replace("vae.vae.", "vae.", 1)
        if mapped.startswith("decoder."):
            assert torch.equal(ours[mapped], value), key
    assert torch.equal(ours["blocks.0.wq.weight"], state["encoder.module_dict.enc_transformer.blocks.0.attn.wq.weight"])
    g = torch.Generator().manual_seed(4)
    noised, t = torch.randn(3, C, 8, 8, generator=g), torch.tensor([1.0, 0.5, 0.25])
    codes = model.fsq.ids_to_codes(torch.randint(0, 8 * 5 * 5 * 5, (3, REGISTERS), generator=g))
    keep_k, null = [2, REGISTERS, 1], [False, False, True]
    got = model.decoder.velocity(noised, t, codes, keep_k, null)
    torch.testing.assert_close(got, reference_velocity(state, noised, t, codes, keep_k, null), rtol=1e-4, atol=1e-4)
    # the nested-dropout slots really are replaced: changing a dropped code changes nothing, a kept one does
    later, earlier = codes.clone(), codes.clone()
    later[0, 3], earlier[0, 0] = -later[0, 3], -earlier[0, 0]
    assert torch.equal(model.decoder.velocity(noised, t, later, keep_k, null)[0], got[0])
    assert not torch.allclose(model.decoder.velocity(noised, t, earlier, keep_k, null)[0], got[0])


def test_flextok_decode_prefix_runs_euler_and_vae(tmp_path):
    write(tmp_path / "model.safetensors", official_full_state(), full_flextok_config())
    model = load_flextok(tmp_path / "model.safetensors", vae_config=TINY_VAE)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    ids = model.encode(images)
    noise = torch.randn(2, C, 8, 8, generator=torch.Generator().manual_seed(6))
    for k in (1, 3, REGISTERS):
        out = model.decode(ids[:, :k], steps=2, latent_size=8, noise=noise)
        assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    # one Euler step from t = 1 is x - v(x, 1), then the VAE decoder on the unscaled latents
    codes = model.fsq.ids_to_codes(F.pad(ids[:, :3], (0, REGISTERS - 3)))
    latents = noise - model.decoder.velocity(noise, torch.ones(2), codes, [3, 3])
    torch.testing.assert_close(model.decode(ids[:, :3], steps=1, latent_size=8, noise=noise),
                               model.vae.decode(latents / 0.7).sample, rtol=1e-4, atol=1e-4)
    # guidance: plain CFG is uncond + w (cond - uncond) on the same noise; APG runs and differs from it
    uncond = model.decoder.velocity(noise, torch.ones(2), codes, [3, 3], [True, True])
    cond = noise - latents
    cfg = model.decode(ids[:, :3], steps=1, cfg=3.0, latent_size=8, noise=noise)
    torch.testing.assert_close(cfg, model.vae.decode((noise - (uncond + 3.0 * (cond - uncond))) / 0.7).sample, rtol=1e-4, atol=1e-4)
    # APG over two steps (the second uses the momentum of the first), written out from its definition
    x, running = noise, torch.zeros_like(noise)
    for t in (1.0, 0.5):
        cond_t, uncond_t = (model.decoder.velocity(x, torch.full((2,), t), codes, [3, 3], [drop] * 2) for drop in (False, True))
        x, running = x - reference_apg(cond_t, uncond_t, 3.0, running) / 2, (cond_t - uncond_t) - 0.5 * running
    apg = model.decode(ids[:, :3], steps=2, cfg=3.0, perform_norm_guidance=True, latent_size=8, noise=noise)
    torch.testing.assert_close(apg, model.vae.decode(x / 0.7).sample, rtol=1e-4, atol=1e-4)
    drawn = model.decode(ids[:, :2], steps=2, latent_size=(8, 4), generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (2, 3, 16, 8)
    with pytest.raises(InputError, match="1 <= k <= 6"):
        model.decode(ids.new_zeros(2, REGISTERS + 1), latent_size=8)
    with pytest.raises(InputError, match="noise must have shape"):
        model.decode(ids[:, :2], latent_size=4, noise=noise)


def test_flextok_decoder_bad_checkpoints_name_the_culprit(tmp_path):
    state = official_full_state()
    gone = "decoder.module_dict.dec_transformer.blocks.1._checkpoint_wrapped_module.adaLN_modulation.1.bias"
    with pytest.raises(ModelLoadError, match="missing keys.*dec_transformer.blocks.1.adaLN_modulation.1.bias"):
        load_flextok(write(tmp_path / "missing.safetensors", {k: v for k, v in state.items() if k != gone}, full_flextok_config()), vae_config=TINY_VAE)
    odd = full_flextok_config(dec_repa_head={"_target_": "flextok.model.postprocessors.heads.MLPHead", "dim": DIM})
    with pytest.raises(ModelLoadError, match=r"dec_repa_head: class 'flextok.model.postprocessors.heads.MLPHead' is not ported"):
        load_flextok(write(tmp_path / "odd.safetensors", state, odd), vae_config=TINY_VAE)
    rope = full_flextok_config(dec_transformer={"rope_forward_read_key": "dec_rope"})
    with pytest.raises(ModelLoadError, match=r"dec_transformer \(FlexTransformer\): rope_forward_read_key is not ported"):
        load_flextok(write(tmp_path / "rope.safetensors", state, rope), vae_config=TINY_VAE)
    extra = full_flextok_config(dec_time_embedder={"learn_sigma": True})
    with pytest.raises(ModelLoadError, match=r"dec_time_embedder \(TimestepEmbedder\): options \['learn_sigma'\] are not ported"):
        load_flextok(write(tmp_path / "extra.safetensors", state, extra), vae_config=TINY_VAE)
    bad = {**state, "decoder.module_dict.dec_nested_dropout.dropout_mask_token": torch.zeros(DIM + 1)}
    with pytest.raises(ModelLoadError, match="shape mismatch for.*dec_nested_dropout.dropout_mask_token"):
        load_flextok(write(tmp_path / "shape.safetensors", bad, full_flextok_config()), vae_config=TINY_VAE)
    with pytest.raises(ModelLoadError, match="unexpected keys.*dec_stray"):
        load_flextok(write(tmp_path / "stray.safetensors", {**state, "decoder.module_dict.dec_stray.weight": torch.zeros(2)},
                           full_flextok_config()), vae_config=TINY_VAE)
