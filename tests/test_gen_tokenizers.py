"""Quantizers and tokenizers: lattice/bijection properties, encode/decode contracts, ordered-prefix structure."""
import dataclasses

import pytest
import torch

from tokenomy.errors import InputError
from tokenomy.tokenizers import (FSQ, FlexTokConfig, FlexTokTokenizer, GridVQConfig, GridVQTokenizer, TiTokConfig,
                                 TiTokTokenizer, VectorQuantizer, load_tokenizer)
from tokenomy.tokenizers.rectified_flow import euler_sample


def _images(n=2, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_fsq_index_code_bijection_and_lattice():
    fsq = FSQ((8, 5, 5, 5))
    ids = torch.arange(fsq.codebook_size)
    codes = fsq.ids_to_codes(ids)
    assert torch.equal(fsq.codes_to_ids(codes), ids)
    assert len({tuple(c) for c in codes.tolist()}) == 1000
    quantized, qids = fsq(torch.randn(500, 4) * 3)
    assert torch.equal(fsq.ids_to_codes(qids), quantized)
    half = torch.tensor([4.0, 2.0, 2.0, 2.0])
    scaled = quantized * half
    assert torch.allclose(scaled, scaled.round(), atol=1e-6) and scaled.abs().le(half).all()
    z = torch.randn(3, 4, requires_grad=True)
    fsq(z)[0].sum().backward()
    assert z.grad.abs().sum() > 0  # straight-through rounding passes gradients


def test_vq_picks_nearest_normalised_code_with_straight_through_gradient():
    vq = VectorQuantizer(codebook_size=16, dim=4)
    z = torch.randn(10, 4, requires_grad=True)
    quantized, ids, loss = vq(z)
    cosine = torch.nn.functional.normalize(z.detach(), dim=-1) @ vq.codebook().t()
    assert torch.equal(ids, cosine.argmax(-1))
    torch.testing.assert_close(quantized.detach(), vq.ids_to_codes(ids))
    (quantized.sum() + loss).backward()
    assert z.grad.abs().sum() > 0 and vq.embedding.weight.grad.abs().sum() > 0
    with pytest.raises(InputError):
        vq.ids_to_codes(torch.tensor([16]))


@pytest.mark.parametrize("make", [
    lambda: GridVQTokenizer(GridVQConfig(image_size=16, channels=16, codebook_size=32)),
    lambda: TiTokTokenizer(TiTokConfig(image_size=16, width=32, depth=1, heads=2, num_latent_tokens=8, codebook_size=32)),
    lambda: FlexTokTokenizer(FlexTokConfig(image_size=16, width=32, encoder_depth=1, decoder_depth=1, heads=2, num_registers=8, sample_steps=3)),
    lambda: FlexTokTokenizer(FlexTokConfig(image_size=16, patch_size=2, width=32, encoder_depth=1, decoder_depth=1, heads=2, num_registers=8,
                                           sample_steps=3, vae=dataclasses.asdict(GridVQConfig(image_size=16, channels=16, codebook_size=32)))),
])
def test_tokenizer_encode_decode_save_load(make, tmp_path):
    torch.manual_seed(0)
    tokenizer = make().eval()
    images = _images()
    ids = tokenizer.encode(images)
    assert ids.shape == (2, tokenizer.num_tokens) and ids.dtype == torch.long
    assert ids.min() >= 0 and ids.max() < tokenizer.vocab_size
    if isinstance(tokenizer, FlexTokTokenizer):
        noise = torch.randn(2, *tokenizer.noise_shape, generator=torch.Generator().manual_seed(0))
        decode = lambda t, x: t.decode(x, noise=noise)
    else:
        decode = lambda t, x: t.decode(x)
    out = decode(tokenizer, ids)
    assert out.shape == images.shape and out.abs().max() <= 1
    loss, _ = tokenizer.train().loss(images, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    tokenizer.eval().save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert torch.equal(loaded.encode(images), ids)
    torch.testing.assert_close(decode(loaded, ids), out)
    with pytest.raises(InputError):
        tokenizer.encode(torch.zeros(1, 3, 8, 8))


def test_flextok_registers_are_causal_and_every_prefix_decodes():
    torch.manual_seed(0)
    tok = FlexTokTokenizer(FlexTokConfig(image_size=16, width=32, encoder_depth=2, decoder_depth=1, heads=2, num_registers=8, sample_steps=2)).eval()
    torch.nn.init.normal_(tok.to_velocity.weight, std=0.1)
    for block in tok.decoder:  # adaLN-zero starts as identity; open the gates so registers reach the patches
        torch.nn.init.normal_(block.modulation[1].weight, std=0.1)
    images = _images()
    with torch.no_grad():
        before = tok.to_code(tok.encoder_norm(_encoder_out(tok, images)))
        tok.registers.data[5] += 1.0  # a later register must not change any earlier one
        after = tok.to_code(tok.encoder_norm(_encoder_out(tok, images)))
    torch.testing.assert_close(before[:, :5], after[:, :5])
    assert not torch.allclose(before[:, 5:], after[:, 5:])
    ids = tok.encode(images)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    outs = [tok.decode(ids[:, :k], noise=noise) for k in range(1, 9)]
    assert all(o.shape == images.shape for o in outs)
    assert not torch.allclose(outs[0], outs[-1])  # the condition actually reaches the decoder
    with pytest.raises(InputError):
        tok.decode(ids[:, :0])


def _encoder_out(tok, images):
    from tokenomy.tokenizers.blocks import patchify

    x = torch.cat([tok.patch_embed(patchify(images, tok.config.patch_size)) + tok.patch_pos, tok.registers.expand(images.shape[0], -1, -1)], 1)
    for block in tok.encoder:
        x = block(x, tok.encoder_mask)
    return x[:, -tok.num_tokens :]


def test_euler_sampler_reproduces_gaussian_target():
    """With the exact velocity of a Gaussian target N(mu, s^2), Euler integration lands on that Gaussian."""
    mu, s = 2.0, 0.5

    def velocity(x, t):
        t = t.view(-1, 1)
        # x_t = t*eps + (1-t)*x0 is Gaussian with mean (1-t)mu and var t^2 + (1-t)^2 s^2; v = E[eps - x0 | x_t]
        var = t**2 + (1 - t) ** 2 * s**2
        eps_mean = t * (x - (1 - t) * mu) / var
        x0_mean = mu + (1 - t) * s**2 * (x - (1 - t) * mu) / var
        return eps_mean - x0_mean

    samples = euler_sample(velocity, torch.randn(20000, 1, generator=torch.Generator().manual_seed(0)), steps=200)
    assert abs(samples.mean().item() - mu) < 0.03 and abs(samples.std().item() - s) < 0.03


def test_flextok_decoder_token_merging_option():
    torch.manual_seed(0)
    tok = FlexTokTokenizer(FlexTokConfig(image_size=16, width=32, encoder_depth=1, decoder_depth=2, heads=2, num_registers=4, sample_steps=2)).eval()
    for block in tok.decoder:
        torch.nn.init.normal_(block.modulation[1].weight, std=0.1)
    torch.nn.init.normal_(tok.to_velocity.weight, std=0.1)
    ids = tok.encode(_images())
    noise = torch.randn(2, *tok.noise_shape, generator=torch.Generator().manual_seed(2))
    base = tok.decode(ids, noise=noise)
    assert torch.equal(tok.decode(ids, noise=noise, merge_ratio=0.0), base)
    merged = tok.decode(ids, noise=noise, merge_ratio=0.25)
    assert merged.shape == base.shape and torch.isfinite(merged).all()
    assert 0 < (merged - base).abs().mean() < (base - base.mean()).abs().mean()
    with pytest.raises(InputError):
        tok.decode(ids, noise=noise, merge_ratio=0.5)
