"""`tokenomy.vision.load`: a CLIP folder or the shipped ref-clip as a VisionEncoder, and the errors on bad names."""
import pytest
import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

import tokenomy
from tokenomy.errors import InputError, ModelLoadError, UnknownNameError
from tokenomy.eval import synthvqa
from tokenomy.vision import HFViTEncoder


def test_a_clip_folder_loads_as_an_encoder_that_reads_hidden_states(tmp_path):
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=64, patch_size=8)
    CLIPVisionModel(config).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(tmp_path)
    encoder = tokenomy.vision.load(tmp_path)
    assert isinstance(encoder, HFViTEncoder) and encoder.has_cls and encoder.num_layers == 3
    pixels = encoder.image_processor(synthvqa.render(synthvqa.make_scene("test", 0)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 64, 64)
    reference = CLIPVisionModel.from_pretrained(tmp_path).eval()(pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(encoder.encode(pixels, feature_layer=-2).tokens, reference.hidden_states[-2][:, 1:])


def test_bad_names_and_folders_are_named(tmp_path):
    with pytest.raises(UnknownNameError, match="ref-clip"):  # the message lists the built-in encoders
        tokenomy.vision.load("ref-clop")
    with pytest.raises(ModelLoadError, match="does not exist"):
        tokenomy.vision.load(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        tokenomy.vision.load(tmp_path)  # a folder without a model
    with pytest.raises(InputError, match=r"tokenomy.vision.load\('ref-clip'\)"):
        tokenomy.load("ref-clip")
