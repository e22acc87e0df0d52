"""LlamaGen VQ loader: official `vq_ds16_c2i.pt` layout, written from a tiny random state dict, loads and round-trips."""
import pytest
import torch
import torch.nn.functional as F

from tokenomy.errors import ModelLoadError
from tokenomy.tokenizers.llamagen_vq import load_llamagen_vq

SIZE, CH, MULT, Z, CODES, DIM = 16, 32, (1, 2), 32, 12, 4


def official_vq_state(seed=0):
    """Every key and shape of LlamaGen's VQModel (tokenizer/tokenizer_image/vq_model.py) for a tiny config."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1
    state = {}
    conv = lambda name, cin, cout, k: state.update({f"{name}.weight": r(cout, cin, k, k), f"{name}.bias": r(cout)})
    norm = lambda name, c: state.update({f"{name}.weight": 1 + r(c), f"{name}.bias": r(c)})

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3), norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    levels = len(MULT)
    conv("encoder.conv_in", 3, CH, 3)
    block_in = CH
    for i in range(levels):
        block_out = CH * MULT[i]
        for j in range(2):
            resnet(f"encoder.conv_blocks.{i}.res.{j}", block_in, block_out)
            block_in = block_out
            if i == levels - 1:
                attn(f"encoder.conv_blocks.{i}.attn.{j}", block_in)
        if i != levels - 1:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", block_in, block_in, 3)
    resnet("encoder.mid.0", block_in, block_in), attn("encoder.mid.1", block_in), resnet("encoder.mid.2", block_in, block_in)
    norm("encoder.norm_out", block_in), conv("encoder.conv_out", block_in, Z, 3)
    block_in = CH * MULT[-1]
    conv("decoder.conv_in", Z, block_in, 3)
    resnet("decoder.mid.0", block_in, block_in), attn("decoder.mid.1", block_in), resnet("decoder.mid.2", block_in, block_in)
    for index, i in enumerate(reversed(range(levels))):
        block_out = CH * MULT[i]
        for j in range(3):
            resnet(f"decoder.conv_blocks.{index}.res.{j}", block_in, block_out)
            block_in = block_out
            if i == levels - 1:
                attn(f"decoder.conv_blocks.{index}.attn.{j}", block_in)
        if i != 0:
            conv(f"decoder.conv_blocks.{index}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in), conv("decoder.conv_out", block_in, 3, 3)
    conv("quant_conv", Z, DIM, 1), conv("post_quant_conv", DIM, Z, 1)
    state["quantize.embedding.weight"] = F.normalize(r(CODES, DIM), dim=-1)
    state["quantize.codebook_used"] = torch.zeros(65536)
    return state


@pytest.fixture
def vq_file(tmp_path):
    state = official_vq_state()
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "steps": 7}, tmp_path / "vq_tiny.pt")
    return tmp_path / "vq_tiny.pt", state


def load(path):
    return load_llamagen_vq(path, image_size=SIZE, channels=CH, channel_mult=MULT, z_channels=Z)


def test_vq_loads_and_parameters_equal(vq_file):
    path, state = vq_file
    model = load(path)
    ours = model.state_dict()
    assert len(ours) == len(state) - 1  # all but the usage statistic
    assert torch.equal(ours["quantizer.embedding.weight"], state["quantize.embedding.weight"])
    assert torch.equal(ours["encoder.stages.0.resample_conv.weight"], state["encoder.conv_blocks.0.downsample.conv.weight"])
    assert torch.equal(ours["decoder.stages.0.resample_conv.bias"], state["decoder.conv_blocks.0.upsample.conv.bias"])
    assert torch.equal(ours["decoder.stages.1.resnets.0.shortcut.weight"], state["decoder.conv_blocks.1.res.0.nin_shortcut.weight"])
    assert torch.equal(ours["encoder.middle.1.proj_out.weight"], state["encoder.mid.1.proj_out.weight"])


def test_vq_encode_is_l2_normalised_nearest_code_and_decode_runs(vq_file):
    path, state = vq_file
    model = load(path)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ids = model.encode(images)
    assert ids.shape == (2, (SIZE // 2) ** 2) and ids.max() < CODES
    # reference: cosine nearest neighbour between the quant_conv features and the normalised codebook
    features = F.conv2d(model.encoder(images), state["quant_conv.weight"], state["quant_conv.bias"])
    cosine = F.normalize(features.flatten(2).transpose(1, 2), dim=-1) @ F.normalize(state["quantize.embedding.weight"], dim=-1).T
    assert torch.equal(ids, cosine.argmax(-1))
    codes = model.ids_to_latents(ids)
    expected = F.normalize(state["quantize.embedding.weight"], dim=-1)[ids].view(2, SIZE // 2, SIZE // 2, DIM).permute(0, 3, 1, 2)
    torch.testing.assert_close(codes, expected)
    recon = model.decode(ids)
    assert recon.shape == images.shape and recon.abs().max() <= 1


def test_vq_encoder_downsampling_pads_right_and_bottom(vq_file):
    """Taming's stride-2 conv sees the input padded by one zero row/column at the bottom/right only."""
    model = load(vq_file[0])
    x = torch.randn(1, CH, 8, 8, generator=torch.Generator().manual_seed(2))
    stage = model.encoder.stages[0]
    conv = stage.resample_conv
    h = x
    for resnet in stage.resnets:
        h = resnet(h)
    out = stage(x)
    assert out.shape == (1, CH, 4, 4)
    torch.testing.assert_close(out, F.conv2d(F.pad(h, (0, 1, 0, 1)), conv.weight, conv.bias, stride=2))


def test_vq_bad_checkpoints_name_the_culprit(vq_file, tmp_path):
    path, state = vq_file
    torch.save({"model": {k: v for k, v in state.items() if k != "decoder.conv_blocks.1.res.2.conv2.bias"}}, tmp_path / "missing.pt")
    with pytest.raises(ModelLoadError, match=r"missing keys \['decoder.conv_blocks.1.res.2.conv2.bias'\]"):
        load(tmp_path / "missing.pt")
    torch.save({"model": {**state, "encoder.conv_in.weight": torch.zeros(CH, 4, 3, 3)}}, tmp_path / "shape.pt")
    with pytest.raises(ModelLoadError, match="shape mismatch for.*encoder.conv_in.weight"):
        load(tmp_path / "shape.pt")
    with pytest.raises(ModelLoadError, match="unexpected keys.*encoder.conv_blocks.2"):  # a VQ-16 file read as a smaller model
        torch.save({"model": {**state, "encoder.conv_blocks.2.res.0.conv1.bias": torch.zeros(1)}}, tmp_path / "extra.pt")
        load(tmp_path / "extra.pt")
    with pytest.raises(ModelLoadError, match="FoundationVision/LlamaGen.*hub id"):
        load("FoundationVision/LlamaGen")


def test_vq_loaded_model_saves_and_reloads_in_tokenomy_format(vq_file, tmp_path):
    from tokenomy.tokenizers import load_tokenizer

    model = load(vq_file[0])
    model.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    images = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7)) * 2 - 1
    assert type(again).__name__ == "LlamaGenVQ" and torch.equal(again.encode(images), model.encode(images))
