"""The shipped ref-clip: a 12-layer CLIP tower with CLS that tokenomy reads as an encoder, and that matches test scenes
to their captions far above chance."""
import json

import pytest
import torch
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

import tokenomy
from tokenomy.eval import synthvqa
from tokenomy.train import clip
from tokenomy.vision.reference import ASSETS

FOLDER = ASSETS / "ref-clip"
SCENES = 100  # chance: 1% top-1
MARGIN = 24  # points above chance each direction must clear: 25% of 100 scenes, a quarter


def test_ref_clip_is_a_clip_tower_tokenomy_reads():
    encoder = tokenomy.vision.load("ref-clip")
    assert encoder.has_cls and encoder.num_layers >= 12 and encoder.patch_size == 8
    pixels = encoder.image_processor(synthvqa.render(synthvqa.make_scene("test", 0)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 128, 128)
    output = encoder.encode(pixels, feature_layer=-2)
    assert output.tokens.shape[:2] == (1, 16 * 16) and output.cls is not None
    assert torch.isfinite(output.tokens).all()


@pytest.fixture(scope="module")
def scores():
    model = CLIPModel.from_pretrained(FOLDER, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(FOLDER, local_files_only=True)
    tokenizer.padding_side = "right"
    processor = AutoImageProcessor.from_pretrained(FOLDER, local_files_only=True)
    return clip.retrieval(model, tokenizer, processor, scenes=SCENES)


def test_ref_clip_retrieves_test_captions_above_chance(scores):
    assert scores["chance"] == 1.0
    assert scores["image_to_caption"] >= scores["chance"] + MARGIN, scores
    assert scores["caption_to_image"] >= scores["chance"] + MARGIN, scores


def test_shipped_retrieval_score_is_what_the_weights_give(scores):
    shipped = json.loads((FOLDER / "retrieval.json").read_text())
    for direction in ("image_to_caption", "caption_to_image"):
        assert scores[direction] == pytest.approx(shipped[direction], abs=1.0)  # one scene of 100
