"""TiTok against a transcription of the official tokenizer (bytedance/1d-tokenizer @ 942a96f), tiny models with
seeded random weights saved as the official hub-mixin folder (config.json + model.safetensors), loaded by `load_titok`:
the legacy two-stage layout (TiTok-L-32/B-64/S-128: l2-normalised codes, MaskGIT-VQGAN pixel decoder) and the
single-stage one (TiTok-BL/SL VQ: plain codes, pixel head).

Cited files: T = modeling/titok.py, B = modeling/modules/blocks.py, Q = modeling/quantizer/quantizer.py,
M = modeling/modules/maskgit_vqgan.py. The transcription follows the official code (module state turned into
arguments) and never calls tokenomy. The official model reads and writes images in [0, 1]; tokenomy takes and gives
[-1, 1], so the inputs here are multiples of 1/256 (exact under x -> 2x - 1 -> (x + 1) / 2), and tokenomy's decode is
compared with the official pixels clamped to [0, 1] as the official demo saves them, mapped to [-1, 1]. einops is not
installed here: each `rearrange` pattern of the official code is spelled out as the permute it denotes.
"""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tests.test_gen_official_titok import IMAGE, K, PIXEL, SIZES, config_tree, hub_folder
from tokenomy.tokenizers.titok_official import load_titok


class Config:
    """The fields the official modules read from the OmegaConf tree (T 85-87, B 215-241, B 300-321)."""

    def __init__(self, tree):
        vq = tree["model"]["vq_model"]
        self.image_size = tree["dataset"]["preprocessing"]["crop_size"]
        self.enc_patch, self.dec_patch = vq["vit_enc_patch_size"], vq["vit_dec_patch_size"]
        self.enc = SIZES[vq["vit_enc_model_size"]]  # (width, num_layers, num_heads), the tiny stand-in table
        self.dec = SIZES[vq["vit_dec_model_size"]]
        self.num_latent_tokens, self.token_size = vq["num_latent_tokens"], vq["token_size"]
        self.is_legacy = vq.get("is_legacy", True)
        self.finetune_decoder = vq.get("finetune_decoder", True)
        self.use_l2_norm = vq["use_l2_norm"]


def layer_norm(x, s, name):  # nn.LayerNorm(width), eps 1e-5
    return F.layer_norm(x, x.shape[-1:], s[name + ".weight"], s[name + ".bias"])


def residual_attention_block(s, b, x, heads):  # B 65-73 on LND input, nn.MultiheadAttention(d_model, n_head), B 47
    h = layer_norm(x, s, b + "ln_1")
    attn_output = F.multi_head_attention_forward(
        h, h, h, x.shape[-1], heads, s[b + "attn.in_proj_weight"], s[b + "attn.in_proj_bias"], None, None, False, 0.0,
        s[b + "attn.out_proj.weight"], s[b + "attn.out_proj.bias"], training=False, need_weights=False)[0]
    x = x + attn_output
    h = F.linear(layer_norm(x, s, b + "ln_2"), s[b + "mlp.c_fc.weight"], s[b + "mlp.c_fc.bias"])  # c_fc, GELU, c_proj (B 53-57)
    return x + F.linear(F.gelu(h), s[b + "mlp.c_proj.weight"], s[b + "mlp.c_proj.bias"])


def expand_token(token, batch_size):  # B 207-208
    return token.unsqueeze(0).expand(batch_size, -1, -1)


def titok_encoder(s, c, pixel_values, latent_tokens):  # TiTokEncoder.forward, B 262-293
    width, num_layers, heads = c.enc
    grid_size = c.image_size // c.enc_patch
    batch_size = pixel_values.shape[0]
    x = F.conv2d(pixel_values, s["encoder.patch_embed.weight"], s["encoder.patch_embed.bias"], stride=c.enc_patch)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([expand_token(s["encoder.class_embedding"], x.shape[0]), x], dim=1)
    x = x + s["encoder.positional_embedding"]
    latent_tokens = expand_token(latent_tokens, x.shape[0]) + s["encoder.latent_token_positional_embedding"]
    x = torch.cat([x, latent_tokens], dim=1)
    x = layer_norm(x, s, "encoder.ln_pre").permute(1, 0, 2)  # NLD -> LND
    for i in range(num_layers):
        x = residual_attention_block(s, f"encoder.transformer.{i}.", x, heads)
    x = x.permute(1, 0, 2)
    latent_tokens = layer_norm(x[:, 1 + grid_size**2 :], s, "encoder.ln_post")
    if c.is_legacy:  # B 286-287: a reshape, no transpose
        latent_tokens = latent_tokens.reshape(batch_size, width, c.num_latent_tokens, 1)
    else:  # B 289-290
        latent_tokens = latent_tokens.reshape(batch_size, c.num_latent_tokens, width, 1).permute(0, 2, 1, 3)
    latent_tokens = F.conv2d(latent_tokens, s["encoder.conv_out.weight"], s["encoder.conv_out.bias"])
    return latent_tokens.reshape(batch_size, c.token_size, 1, c.num_latent_tokens)


def get_codebook_entry(s, c, indices):  # Q 121-130 (1-D indices)
    z_quantized = s["quantize.embedding.weight"][indices]
    return F.normalize(z_quantized, dim=-1) if c.use_l2_norm else z_quantized


def quantize(s, c, z):  # VectorQuantizer.forward, Q 54-119 (eval: the straight-through add leaves z_quantized)
    z = z.float().permute(0, 2, 3, 1).contiguous()  # 'b c h w -> b h w c'
    z_flattened = z.reshape(-1, z.shape[-1])  # 'b h w c -> (b h w) c'
    if c.use_l2_norm:
        z_flattened = F.normalize(z_flattened, dim=-1)
        embedding = F.normalize(s["quantize.embedding.weight"], dim=-1)
    else:
        embedding = s["quantize.embedding.weight"]
    d = torch.sum(z_flattened**2, dim=1, keepdim=True) + torch.sum(embedding**2, dim=1) - 2 * torch.einsum(
        "bd,dn->bn", z_flattened, embedding.T)
    min_encoding_indices = torch.argmin(d, dim=1)
    z_quantized = get_codebook_entry(s, c, min_encoding_indices).view(z.shape)
    return z_quantized.permute(0, 3, 1, 2).contiguous(), min_encoding_indices.view(z.shape[0], z.shape[1], z.shape[2])


def titok_decoder(s, c, z_quantized):  # TiTokDecoder.forward, B 356-382
    width, num_layers, heads = c.dec
    grid_size = c.image_size // c.dec_patch
    N, C, H, W = z_quantized.shape
    x = z_quantized.reshape(N, C * H, W).permute(0, 2, 1)
    x = F.linear(x, s["decoder.decoder_embed.weight"], s["decoder.decoder_embed.bias"])
    batchsize, seq_len, _ = x.shape
    mask_tokens = s["decoder.mask_token"].repeat(batchsize, grid_size**2, 1)
    mask_tokens = torch.cat([expand_token(s["decoder.class_embedding"], mask_tokens.shape[0]), mask_tokens], dim=1)
    mask_tokens = mask_tokens + s["decoder.positional_embedding"]
    x = x + s["decoder.latent_token_positional_embedding"][:seq_len]
    x = torch.cat([mask_tokens, x], dim=1)
    x = layer_norm(x, s, "decoder.ln_pre").permute(1, 0, 2)
    for i in range(num_layers):
        x = residual_attention_block(s, f"decoder.transformer.{i}.", x, heads)
    x = x.permute(1, 0, 2)[:, 1 : 1 + grid_size**2]
    x = layer_norm(x, s, "decoder.ln_post")
    x = x.permute(0, 2, 1).reshape(batchsize, width, grid_size, grid_size).contiguous()
    if c.is_legacy:  # ffn = conv 1x1, tanh, conv 1x1; conv_out = Identity (B 341-347)
        x = F.conv2d(x, s["decoder.ffn.0.weight"], s["decoder.ffn.0.bias"]).tanh()
        return F.conv2d(x, s["decoder.ffn.2.weight"], s["decoder.ffn.2.bias"])
    x = F.conv2d(x, s["decoder.ffn.0.weight"], s["decoder.ffn.0.bias"])  # B 350-354
    b, _, h, w = x.shape  # Rearrange('b (p1 p2 c) h w -> b c (h p1) (w p2)')
    p = c.dec_patch
    x = x.reshape(b, p, p, 3, h, w).permute(0, 3, 4, 1, 5, 2).reshape(b, 3, h * p, w * p)
    return F.conv2d(x, s["decoder.conv_out.weight"], s["decoder.conv_out.bias"], padding=1)


def conv2d_same(x, weight, bias=None):  # Conv2dSame, M 39-50 (stride 1, dilation 1)
    k = weight.shape[-1]
    pad = max((x.shape[-1] - 1) + (k - 1) + 1 - x.shape[-1], 0)
    if pad > 0:
        x = F.pad(x, [pad // 2, pad - pad // 2, pad // 2, pad - pad // 2])
    return F.conv2d(x, weight, bias)


def maskgit_resnet_block(s, b, x):  # M 76-90
    residual = x
    h = conv2d_same(F.silu(F.group_norm(x, 32, s[b + "norm1.weight"], s[b + "norm1.bias"], eps=1e-6)), s[b + "conv1.weight"])
    h = conv2d_same(F.silu(F.group_norm(h, 32, s[b + "norm2.weight"], s[b + "norm2.bias"], eps=1e-6)), s[b + "conv2.weight"])
    if b + "nin_shortcut.weight" in s:  # in_channels != out_channels_: the shortcut reads hidden_states (M 87-88)
        residual = conv2d_same(h, s[b + "nin_shortcut.weight"])
    return h + residual


def pixel_decoder(s, hidden_states):  # maskgit Decoder.forward, M 228-245; self.up holds block_idx 0..n-1 (M 218-221)
    levels, res_blocks = len(PIXEL["pixel_channel_mult"]), PIXEL["pixel_res_blocks"]
    p = "pixel_decoder."
    hidden_states = conv2d_same(hidden_states, s[p + "conv_in.weight"], s[p + "conv_in.bias"])
    for j in range(res_blocks):
        hidden_states = maskgit_resnet_block(s, f"{p}mid.{j}.", hidden_states)
    for block_idx in reversed(range(levels)):  # UpsamplingBlock.forward, M 146-154
        for j in range(res_blocks):
            hidden_states = maskgit_resnet_block(s, f"{p}up.{block_idx}.block.{j}.", hidden_states)
        if block_idx != 0:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
            hidden_states = conv2d_same(hidden_states, s[f"{p}up.{block_idx}.upsample_conv.weight"], s[f"{p}up.{block_idx}.upsample_conv.bias"])
    hidden_states = F.silu(F.group_norm(hidden_states, 32, s[p + "norm_out.weight"], s[p + "norm_out.bias"], eps=1e-6))
    return conv2d_same(hidden_states, s[p + "conv_out.weight"], s[p + "conv_out.bias"])


def official_encode(s, c, x):  # TiTok.encode, T 162-181: result_dict["min_encoding_indices"] is [B, 1, K]
    z = titok_encoder(s, c, x, s["latent_tokens"])
    return quantize(s, c, z)[1]


def official_decode(s, c, z_quantized):  # TiTok.decode, T 183-190
    decoded = titok_decoder(s, c, z_quantized)
    if c.finetune_decoder:
        quantized_states = torch.einsum("nchw,cd->ndhw", decoded.softmax(1), s["pixel_quantize.embedding.weight"])
        decoded = pixel_decoder(s, quantized_states)
    return decoded


def official_decode_tokens(s, c, tokens):  # TiTok.decode_tokens, T 192-202
    tokens = tokens.squeeze(1)
    batch, seq_len = tokens.shape
    z_quantized = get_codebook_entry(s, c, tokens.reshape(-1)).reshape(batch, 1, seq_len, -1)
    return official_decode(s, c, z_quantized.permute(0, 3, 1, 2).contiguous())  # 'b h w c -> b c h w'


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "single_stage"])
def loaded(request, tmp_path_factory):
    folder, state = hub_folder(tmp_path_factory.mktemp("titok"), legacy=request.param)
    # a trained decoder ends in about [0, 1]; these random weights end in about [-9, 9], where float32 rounding alone
    # can reach 1e-5, so the last conv is scaled towards the realistic range
    last = "pixel_decoder.conv_out.weight" if request.param else "decoder.conv_out.weight"
    state[last] = state[last] * 0.2
    save_file(state, str(folder / "model.safetensors"))
    return load_titok(folder, sizes=SIZES, **PIXEL), state, Config(config_tree(request.param))


def images01(seed, batch=3):
    return torch.randint(0, 257, (batch, 3, IMAGE, IMAGE), generator=torch.Generator().manual_seed(seed)) / 256


def test_titok_encode_equals_official_indices(loaded):
    model, state, c = loaded
    x = images01(31)
    expected = official_encode(state, c, x)
    assert expected.shape == (3, 1, K) and expected.unique().numel() > 1
    assert torch.equal(model.encode(x * 2 - 1), expected[:, 0])
    latents = titok_encoder(state, c, x, state["latent_tokens"])  # [B, token_size, 1, K]
    torch.testing.assert_close(model.latents(x), latents[:, :, 0].transpose(1, 2), rtol=0, atol=1e-5)


def test_titok_decode_equals_official_pixels(loaded):
    model, state, c = loaded
    for tokens in (official_encode(state, c, images01(32)), torch.randint(0, 10, (2, 1, K), generator=torch.Generator().manual_seed(33))):
        official = official_decode_tokens(state, c, tokens)
        assert 0.2 < ((official > 0) & (official < 1)).float().mean() < 1  # the clamp is exercised, most pixels compared raw
        ours = model.decode_codes(model.quantizer.ids_to_codes(tokens[:, 0]))
        torch.testing.assert_close(ours, official, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.decode(tokens[:, 0]), official.clamp(0.0, 1.0) * 2 - 1, rtol=0, atol=1e-5)


def test_titok_parity_catches_a_transposed_legacy_latent(tmp_path):
    """The comparison is sharp: reading the legacy encoder's [B, K, W] outputs with a transpose (the 'fixed' layout)
    instead of the official reshape misses the official latents by far, so a port doing that would fail above."""
    folder, state = hub_folder(tmp_path, legacy=True)
    model, c = load_titok(folder, sizes=SIZES, **PIXEL), Config(config_tree(legacy=True))
    c.is_legacy = False
    transposed = titok_encoder(state, c, images01(34), state["latent_tokens"])
    assert (model.latents(images01(34)) - transposed[:, :, 0].transpose(1, 2)).abs().max() > 1e-2
