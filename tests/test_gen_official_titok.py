"""Official TiTok loader: hub-mixin folders and legacy .bin state dicts in the official key layout, tiny sizes."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tokenomy.errors import ModelLoadError
from tokenomy.tokenizers.titok_official import load_titok

SIZES = {"small": (32, 1, 4), "base": (32, 2, 4), "large": (64, 1, 4)}  # tiny stand-ins for the official size names
PIXEL = dict(pixel_channels=32, pixel_channel_mult=(1, 1, 2), pixel_res_blocks=2, pixel_codebook_size=16, pixel_code_dim=32)
IMAGE, PATCH, K = 16, 4, 4


def config_tree(legacy: bool):
    """What the official TiTok writes to config.json (OmegaConf container), for a tiny model."""
    vq = {"codebook_size": 10, "token_size": 6 if legacy else 8, "use_l2_norm": legacy, "commitment_cost": 0.25,
          "vit_enc_model_size": "base", "vit_dec_model_size": "base" if legacy else "large", "vit_enc_patch_size": PATCH,
          "vit_dec_patch_size": PATCH, "num_latent_tokens": K, "finetune_decoder": legacy}
    if not legacy:
        vq["is_legacy"] = False
    return {"experiment": {"tokenizer_checkpoint": "tokenizer.bin"}, "model": {"vq_model": vq},
            "dataset": {"preprocessing": {"crop_size": IMAGE}}}


def official_titok_state(tree, seed=0):
    """Every key and shape of the official TiTok (modeling/titok.py, modules/blocks.py, maskgit_vqgan.py)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2
    vq = tree["model"]["vq_model"]
    legacy = vq.get("is_legacy", True)
    grid = IMAGE // PATCH
    state = {}

    def vit(prefix, size):
        width, depth, _ = SIZES[size]
        state.update({f"{prefix}.class_embedding": r(1, width), f"{prefix}.positional_embedding": r(grid**2 + 1, width),
                      f"{prefix}.latent_token_positional_embedding": r(K, width), f"{prefix}.ln_pre.weight": 1 + r(width),
                      f"{prefix}.ln_pre.bias": r(width), f"{prefix}.ln_post.weight": 1 + r(width), f"{prefix}.ln_post.bias": r(width)})
        for i in range(depth):
            b = f"{prefix}.transformer.{i}."
            state.update({b + "ln_1.weight": 1 + r(width), b + "ln_1.bias": r(width), b + "ln_2.weight": 1 + r(width), b + "ln_2.bias": r(width),
                          b + "attn.in_proj_weight": r(3 * width, width), b + "attn.in_proj_bias": r(3 * width),
                          b + "attn.out_proj.weight": r(width, width), b + "attn.out_proj.bias": r(width),
                          b + "mlp.c_fc.weight": r(4 * width, width), b + "mlp.c_fc.bias": r(4 * width),
                          b + "mlp.c_proj.weight": r(width, 4 * width), b + "mlp.c_proj.bias": r(width)})
        return width

    enc = vit("encoder", vq["vit_enc_model_size"])
    dec = vit("decoder", vq["vit_dec_model_size"])
    state.update({"latent_tokens": r(K, enc), "encoder.patch_embed.weight": r(enc, 3, PATCH, PATCH), "encoder.patch_embed.bias": r(enc),
                  "encoder.conv_out.weight": r(vq["token_size"], enc, 1, 1), "encoder.conv_out.bias": r(vq["token_size"]),
                  "quantize.embedding.weight": r(vq["codebook_size"], vq["token_size"]),
                  "decoder.decoder_embed.weight": r(dec, vq["token_size"]), "decoder.decoder_embed.bias": r(dec),
                  "decoder.mask_token": r(1, 1, dec)})
    if not legacy:
        state.update({"decoder.ffn.0.weight": r(PATCH * PATCH * 3, dec, 1, 1), "decoder.ffn.0.bias": r(PATCH * PATCH * 3),
                      "decoder.conv_out.weight": r(3, 3, 3, 3), "decoder.conv_out.bias": r(3)})
        return state
    codes, code_dim, ch, mult = PIXEL["pixel_codebook_size"], PIXEL["pixel_code_dim"], PIXEL["pixel_channels"], PIXEL["pixel_channel_mult"]
    state.update({"decoder.ffn.0.weight": r(2 * dec, dec, 1, 1), "decoder.ffn.0.bias": r(2 * dec),
                  "decoder.ffn.2.weight": r(codes, 2 * dec, 1, 1), "decoder.ffn.2.bias": r(codes),
                  "pixel_quantize.embedding.weight": r(codes, code_dim)})

    def resnet(name, cin, cout):
        state.update({f"{name}.norm1.weight": 1 + r(cin), f"{name}.norm1.bias": r(cin), f"{name}.conv1.weight": r(cout, cin, 3, 3),
                      f"{name}.norm2.weight": 1 + r(cout), f"{name}.norm2.bias": r(cout), f"{name}.conv2.weight": r(cout, cout, 3, 3)})
        if cin != cout:
            state[f"{name}.nin_shortcut.weight"] = r(cout, cout, 1, 1)

    top = ch * mult[-1]
    state.update({"pixel_decoder.conv_in.weight": r(top, code_dim, 3, 3), "pixel_decoder.conv_in.bias": r(top)})
    for j in range(2):
        resnet(f"pixel_decoder.mid.{j}", top, top)
    for i in range(len(mult)):
        cin = ch * (mult[-1] if i == len(mult) - 1 else mult[i + 1])
        for j in range(2):
            resnet(f"pixel_decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
        if i != 0:
            state.update({f"pixel_decoder.up.{i}.upsample_conv.weight": r(cin, cin, 3, 3), f"pixel_decoder.up.{i}.upsample_conv.bias": r(cin)})
    state.update({"pixel_decoder.norm_out.weight": 1 + r(ch * mult[0]), "pixel_decoder.norm_out.bias": r(ch * mult[0]),
                  "pixel_decoder.conv_out.weight": r(3, ch * mult[0], 3, 3), "pixel_decoder.conv_out.bias": r(3)})
    return state


def hub_folder(tmp_path, legacy):
    """A PyTorchModelHubMixin folder as TiTok.save_pretrained writes it: config.json + model.safetensors."""
    tree = config_tree(legacy)
    state = official_titok_state(tree)
    folder = tmp_path / ("tokenizer_titok_legacy" if legacy else "tokenizer_titok_bl")
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tree, indent=4))
    save_file(state, str(folder / "model.safetensors"))
    return folder, state


@pytest.mark.parametrize("legacy", [True, False])
def test_titok_hub_folder_loads_runs_and_parameters_equal(tmp_path, legacy):
    folder, state = hub_folder(tmp_path, legacy)
    model = load_titok(folder, sizes=SIZES, **PIXEL)
    ours = model.state_dict()
    assert len(ours) == len(state)
    assert torch.equal(ours["encoder.blocks.1.attn.qkv.weight"], state["encoder.transformer.1.attn.in_proj_weight"])
    assert torch.equal(ours["decoder.blocks.0.mlp.2.bias"], state["decoder.transformer.0.mlp.c_proj.bias"])
    if legacy:
        assert torch.equal(ours["pixel_quantizer.weight"], state["pixel_quantize.embedding.weight"])
        assert torch.equal(ours["pixel_decoder.stages.1.resnets.0.shortcut.weight"], state["pixel_decoder.up.1.block.0.nin_shortcut.weight"])
    images = torch.rand(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ids = model.encode(images)
    assert ids.shape == (2, K) and ids.max() < 10
    recon = model.decode(ids)
    assert recon.shape == images.shape and recon.min() >= -1 and recon.max() <= 1


@pytest.mark.parametrize("legacy", [True, False])
def test_titok_encoder_matches_hand_written_official_latents(tmp_path, legacy):
    """Reference: the official encoder with nn.MultiheadAttention blocks, images in [0, 1], and the legacy
    reshape [B, K, W] -> [B, W, K, 1] (no transpose) before the 1x1 conv."""
    folder, state = hub_folder(tmp_path, legacy)
    model = load_titok(folder, sizes=SIZES, **PIXEL)
    images01 = torch.rand(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    width, depth, heads = SIZES["base"]
    x = F.conv2d(images01, state["encoder.patch_embed.weight"], state["encoder.patch_embed.bias"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([state["encoder.class_embedding"].expand(2, 1, -1), x], 1) + state["encoder.positional_embedding"]
    x = torch.cat([x, (state["latent_tokens"] + state["encoder.latent_token_positional_embedding"]).expand(2, -1, -1)], 1)
    ln = lambda x, name: F.layer_norm(x, (width,), state[name + ".weight"], state[name + ".bias"])
    x = ln(x, "encoder.ln_pre")
    for i in range(depth):
        b = f"encoder.transformer.{i}."
        attention = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attention.load_state_dict({"in_proj_weight": state[b + "attn.in_proj_weight"], "in_proj_bias": state[b + "attn.in_proj_bias"],
                                   "out_proj.weight": state[b + "attn.out_proj.weight"], "out_proj.bias": state[b + "attn.out_proj.bias"]})
        h = ln(x, b + "ln_1")
        x = x + attention(h, h, h, need_weights=False)[0]
        h = F.gelu(F.linear(ln(x, b + "ln_2"), state[b + "mlp.c_fc.weight"], state[b + "mlp.c_fc.bias"]))
        x = x + F.linear(h, state[b + "mlp.c_proj.weight"], state[b + "mlp.c_proj.bias"])
    latent = ln(x[:, -K:], "encoder.ln_post")
    latent = latent.reshape(2, width, K, 1) if legacy else latent.transpose(1, 2)[..., None]
    expected = F.conv2d(latent, state["encoder.conv_out.weight"], state["encoder.conv_out.bias"])[..., 0].transpose(1, 2)
    torch.testing.assert_close(model.latents(images01), expected, rtol=1e-4, atol=1e-4)


def test_titok_single_stage_pixel_head_order(tmp_path):
    """The single-stage head rearranges 'b (p1 p2 c) h w -> b c (h p1) (w p2)' before its 3x3 conv."""
    folder, state = hub_folder(tmp_path, legacy=False)
    model = load_titok(folder, sizes=SIZES)
    grid, width = IMAGE // PATCH, SIZES["large"][0]
    features = torch.randn(1, width, grid, grid, generator=torch.Generator().manual_seed(3))
    channels = model.decoder.ffn(features)  # [1, p*p*3, g, g]
    expected = torch.zeros(1, 3, IMAGE, IMAGE)
    for p1 in range(PATCH):
        for p2 in range(PATCH):
            for c in range(3):
                expected[0, c, p1::PATCH, p2::PATCH] = channels[0, (p1 * PATCH + p2) * 3 + c]
    pixels = channels.view(1, PATCH, PATCH, 3, grid, grid).permute(0, 3, 4, 1, 5, 2).reshape(1, 3, IMAGE, IMAGE)
    torch.testing.assert_close(pixels, expected)
    codes = torch.randn(1, K, 8, generator=torch.Generator().manual_seed(4))
    assert model.decode_codes(codes).shape == (1, 3, IMAGE, IMAGE)


def test_titok_legacy_bin_with_variant_and_bad_inputs(tmp_path):
    tree = config_tree(legacy=True)
    state = official_titok_state(tree)
    torch.save(state, tmp_path / "tokenizer_titok_tiny.bin")
    model = load_titok(tmp_path / "tokenizer_titok_tiny.bin", config=tree, sizes=SIZES, **PIXEL)
    assert model.config.is_legacy and model.config.num_latent_tokens == K
    with pytest.raises(ModelLoadError, match="variant="):
        load_titok(tmp_path / "tokenizer_titok_tiny.bin")
    # the B-64 variant (with the tiny size table) expects 64 latent tokens of 256 px images and 4096 codes
    with pytest.raises(ModelLoadError, match=r"shape mismatch for.*latent_tokens: \(4, 32\) \(expected \(64, 32\)\)"):
        load_titok(tmp_path / "tokenizer_titok_tiny.bin", variant="titok_b64", sizes=SIZES, **PIXEL)
    torch.save({k: v for k, v in state.items() if not k.startswith("pixel_decoder.")}, tmp_path / "stage1.bin")
    with pytest.raises(ModelLoadError, match="missing keys.*pixel_decoder.conv_in.weight"):
        load_titok(tmp_path / "stage1.bin", config=tree, sizes=SIZES, **PIXEL)
    torch.save({**state, "decoder.transformer.0.attn.in_proj_weight": torch.zeros(96, 31)}, tmp_path / "shape.bin")
    with pytest.raises(ModelLoadError, match=r"decoder.transformer.0.attn.in_proj_weight: \(96, 31\)"):
        load_titok(tmp_path / "shape.bin", config=tree, sizes=SIZES, **PIXEL)
    with pytest.raises(ModelLoadError, match="yucornetto/tokenizer_titok_l32_imagenet.*hub id"):
        load_titok("yucornetto/tokenizer_titok_l32_imagenet")


def test_titok_maskgit_resnet_shortcut_reads_the_block_output(tmp_path):
    """The released MaskGIT-VQGAN adds nin_shortcut(h) (h = the conv branch), not a projection of the input."""
    folder, state = hub_folder(tmp_path, legacy=True)
    model = load_titok(folder, sizes=SIZES, **PIXEL)
    b = "pixel_decoder.up.1.block.0."
    x = torch.randn(1, 64, 4, 4, generator=torch.Generator().manual_seed(5))
    gn = lambda x, name: F.group_norm(x, 32, state[b + name + ".weight"], state[b + name + ".bias"], eps=1e-6)
    h = F.conv2d(F.silu(gn(x, "norm1")), state[b + "conv1.weight"], padding=1)
    h = F.conv2d(F.silu(gn(h, "norm2")), state[b + "conv2.weight"], padding=1)
    expected = h + F.conv2d(h, state[b + "nin_shortcut.weight"])
    torch.testing.assert_close(model.pixel_decoder.stages[1].resnets[0](x), expected, rtol=1e-4, atol=1e-4)


def test_titok_loaded_model_saves_and_reloads_in_tokenomy_format(tmp_path):
    from tokenomy.tokenizers import load_tokenizer

    folder, _ = hub_folder(tmp_path, legacy=True)
    model = load_titok(folder, sizes=SIZES, **PIXEL)
    model.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    ids = torch.tensor([[0, 3, 9, 1]])
    assert type(again).__name__ == "OfficialTiTok" and torch.equal(again.decode(ids), model.decode(ids))
