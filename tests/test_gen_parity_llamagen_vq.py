"""LlamaGen VQ against a transcription of the official tokenizer (FoundationVision/LlamaGen @ ce98ec4,
tokenizer/tokenizer_image/vq_model.py, cited as V with line numbers), tiny model, seeded random weights saved as the
official `vq_ds16_c2i.pt` (weights under `model`, next to optimizer state), loaded by `load_llamagen_vq`.

The transcription follows the official code (module state turned into arguments) and never calls tokenomy.
Encode = VQModel.encode's indices (V 41-45, 215-259), decode = VQModel.decode_code (V 52-55, 261-276); the official
sampling and reconstruction scripts clamp the decoded pixels to [-1, 1] before saving, which tokenomy's decode does.
"""
import pytest
import torch
import torch.nn.functional as F

from tests.test_gen_official_llamagen_vq import CH, CODES, DIM, MULT, SIZE, Z, official_vq_state
from tokenomy.tokenizers.llamagen_vq import load_llamagen_vq

RES_BLOCKS = 2  # Encoder/Decoder num_res_blocks default, V 65 / V 129


def normalize(x, s, name):  # Normalize(group): GroupNorm(32, eps=1e-6, affine), V 359-362
    return F.group_norm(x, 32, s[name + ".weight"], s[name + ".bias"], eps=1e-6)


def nonlinearity(x):  # V 354-356
    return x * torch.sigmoid(x)


def conv(x, s, name, padding=0, stride=1):
    return F.conv2d(x, s[name + ".weight"], s[name + ".bias"], stride=stride, padding=padding)


def resnet_block(s, name, x):  # V 299-314 (dropout 0, no conv_shortcut)
    h = conv(nonlinearity(normalize(x, s, name + ".norm1")), s, name + ".conv1", padding=1)
    h = conv(nonlinearity(normalize(h, s, name + ".norm2")), s, name + ".conv2", padding=1)
    if name + ".nin_shortcut.weight" in s:  # in_channels != out_channels, V 309-313
        x = conv(x, s, name + ".nin_shortcut")
    return x + h


def attn_block(s, name, x):  # V 327-351
    h_ = normalize(x, s, name + ".norm")
    q, k, v = (conv(h_, s, f"{name}.{p}") for p in ("q", "k", "v"))
    b, c, h, w = q.shape
    q = q.reshape(b, c, h * w).permute(0, 2, 1)
    k = k.reshape(b, c, h * w)
    w_ = torch.bmm(q, k) * (int(c) ** (-0.5))
    w_ = F.softmax(w_, dim=2)
    v = v.reshape(b, c, h * w)
    h_ = torch.bmm(v, w_.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + conv(h_, s, name + ".proj_out")


def downsample(s, name, x):  # V 389-393: asymmetric zero padding, then stride-2 conv
    return conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0), s, name + ".conv", stride=2)


def upsample(s, name, x):  # V 374-378
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"), s, name + ".conv", padding=1)


def encoder(s, x, ch_mult=MULT, down=downsample):  # V 105-124 (attention only at the last level, V 85-86)
    levels = len(ch_mult)
    h = conv(x, s, "encoder.conv_in", padding=1)
    for i_level in range(levels):
        for i_block in range(RES_BLOCKS):
            h = resnet_block(s, f"encoder.conv_blocks.{i_level}.res.{i_block}", h)
            if i_level == levels - 1:
                h = attn_block(s, f"encoder.conv_blocks.{i_level}.attn.{i_block}", h)
        if i_level != levels - 1:
            h = down(s, f"encoder.conv_blocks.{i_level}.downsample", h)
    h = resnet_block(s, "encoder.mid.0", h)
    h = attn_block(s, "encoder.mid.1", h)
    h = resnet_block(s, "encoder.mid.2", h)
    return conv(nonlinearity(normalize(h, s, "encoder.norm_out")), s, "encoder.conv_out", padding=1)


def decoder(s, z, ch_mult=MULT):  # V 173-194; conv_blocks[0] is the lowest resolution (V 147), attention there only
    levels = len(ch_mult)
    h = conv(z, s, "decoder.conv_in", padding=1)
    h = resnet_block(s, "decoder.mid.0", h)
    h = attn_block(s, "decoder.mid.1", h)
    h = resnet_block(s, "decoder.mid.2", h)
    for i_level in range(levels):
        for i_block in range(RES_BLOCKS + 1):
            h = resnet_block(s, f"decoder.conv_blocks.{i_level}.res.{i_block}", h)
            if i_level == 0:  # built for reversed level num_resolutions - 1, V 156-157
                h = attn_block(s, f"decoder.conv_blocks.{i_level}.attn.{i_block}", h)
        if i_level != levels - 1:
            h = upsample(s, f"decoder.conv_blocks.{i_level}.upsample", h)
    return conv(nonlinearity(normalize(h, s, "decoder.norm_out")), s, "decoder.conv_out", padding=1)


def quantize_indices(s, z):  # VectorQuantizer.forward with l2_norm, V 215-232
    z = torch.einsum("b c h w -> b h w c", z).contiguous()
    z_flattened = z.view(-1, DIM)
    z_flattened = F.normalize(z_flattened, p=2, dim=-1)
    embedding = F.normalize(s["quantize.embedding.weight"], p=2, dim=-1)
    d = torch.sum(z_flattened**2, dim=1, keepdim=True) + torch.sum(embedding**2, dim=1) - 2 * torch.einsum(
        "bd,dn->bn", z_flattened, torch.einsum("n d -> d n", embedding))
    return torch.argmin(d, dim=1)


def official_encode(s, images):  # VQModel.encode, V 41-45: info[2] are the indices, row-major over (b, h, w)
    return quantize_indices(s, conv(encoder(s, images), s, "quant_conv"))


def official_decode_code(s, code_b, shape):  # VQModel.decode_code, V 52-55 with get_codebook_entry, V 261-276
    embedding = F.normalize(s["quantize.embedding.weight"], p=2, dim=-1)
    z_q = embedding[code_b].reshape(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2).contiguous()
    return decoder(s, conv(z_q, s, "post_quant_conv"))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    state = official_vq_state(seed=11)
    # a trained decoder ends in about [-1, 1]; these random weights end in about [-4, 4], where float32 rounding of
    # two correct implementations alone reaches 1e-5, so the last conv is scaled to the realistic range
    state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"] * 0.3
    path = tmp_path_factory.mktemp("vq") / "vq_tiny.pt"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "steps": 7}, path)
    return load_llamagen_vq(path, image_size=SIZE, channels=CH, channel_mult=MULT, z_channels=Z), state


def images(seed, batch=3):
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_llamagen_vq_encode_equals_official_indices(loaded):
    model, state = loaded
    x = images(21)
    grid = SIZE // 2 ** (len(MULT) - 1)
    expected = official_encode(state, x).view(x.shape[0], grid * grid)
    assert torch.equal(model.encode(x), expected)
    assert expected.unique().numel() > 3  # the codebook is really searched, not one code everywhere
    # the pre-quantization features themselves agree, not only their argmin
    torch.testing.assert_close(model.latents(x), conv(encoder(state, x), state, "quant_conv"), rtol=0, atol=1e-5)


def test_llamagen_vq_decode_equals_official_pixels(loaded):
    model, state = loaded
    grid = SIZE // 2 ** (len(MULT) - 1)
    for ids in (model.encode(images(22)), torch.randint(0, CODES, (2, grid * grid), generator=torch.Generator().manual_seed(23))):
        official = official_decode_code(state, ids.flatten(), (ids.shape[0], DIM, grid, grid))
        inside = (official.abs() < 1).float().mean()
        assert 0.2 < inside < 1  # the clamp is exercised, and most pixels are compared unclamped
        unclamped = model.decoder(model.from_code(model.ids_to_latents(ids)))
        torch.testing.assert_close(unclamped, official, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.decode(ids), official.clamp(-1, 1), rtol=0, atol=1e-5)


def test_llamagen_vq_parity_catches_symmetric_downsampling(loaded):
    """The comparison is sharp: the same transcription with a symmetric stride-2 padding (the usual Conv2d(padding=1))
    misses tokenomy's features by far, so a port that padded that way would fail the tests above."""
    model, state = loaded
    x = images(24)
    symmetric = lambda s, name, h: conv(h, s, name + ".conv", padding=1, stride=2)
    features = conv(encoder(state, x, down=symmetric), state, "quant_conv")
    assert (model.latents(x) - features).abs().max() > 1e-2
