"""benchmarks/token_probes.py: its labels come from the scene description, and its probe fits what is linearly there."""
import importlib.util
from pathlib import Path

import torch
from transformers import CLIPModel

import tokenomy
from tokenomy.eval import synthvqa
from tokenomy.train.probe import cell_labels
from tokenomy.vision.reference import ASSETS

SPEC = importlib.util.spec_from_file_location("token_probes", Path(__file__).parents[1] / "benchmarks" / "token_probes.py")
token_probes = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(token_probes)


def test_labels_per_cell_and_per_scene():
    images, labels, foreground = token_probes.scene_labels("test", 3, grid=8)
    assert labels.shape == (3, 64, len(token_probes.heads())) and foreground.shape == (3, 64)
    columns = list(token_probes.heads())
    for index, image in enumerate(images):
        scene = synthvqa.make_scene("test", index)
        cells = cell_labels(scene, image, 8)
        assert torch.equal(labels[index, :, columns.index("shape")], cells[:, 1])
        assert (labels[index, :, columns.index("count")] == len(scene.objects)).all()
        assert (labels[index, :, columns.index("scene_word")] == synthvqa.WORDS.index(scene.word)).all()
        assert torch.equal(foreground[index], (cells[:, 0] > 0) | (cells[:, 3] > 0))


def test_probe_reads_a_linear_code_and_chance_is_the_majority():
    torch.manual_seed(0)
    y = torch.randint(0, 3, (600,))
    x = torch.nn.functional.one_hot(y, 3).float() * 4 + 0.3 * torch.randn(600, 3)
    probe = token_probes.fit_probe(x, y, y > 0, classes=3, steps=50, decay=1e-3)
    predicted = probe(x).argmax(-1)
    assert token_probes.group_accuracy(predicted, y, y > 0)["accuracy"] == 100.0
    shuffled = token_probes.group_accuracy(y[torch.randperm(600)], y, torch.ones(600, dtype=torch.bool))
    assert shuffled["accuracy"] < 50 and shuffled["chance"] == 100 * torch.bincount(y).max().item() / 600


def test_encoder_tokens_are_the_feature_layer_patches():
    encoder = tokenomy.vision.load("ref-clip")
    images = [synthvqa.render(synthvqa.make_scene("test", i)) for i in range(3)]
    tokens = token_probes.encoder_tokens(encoder, images, batch_size=2, feature_layer=-2)
    assert tokens.shape == (3, 256, encoder.config.hidden_size)
    reference = CLIPModel.from_pretrained(ASSETS / "ref-clip").vision_model.eval()
    pixels = encoder.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(tokens, expected)


def test_pooled_probes_report_every_fact_on_held_out_items():
    rows = token_probes.pooled_probes("ref-clip", train_scenes=12, test_scenes=6, batch_size=6, steps=5, decay=1e-3)
    assert list(rows) == ["shape from the mean token of its cells", "word from the mean token of its cells",
                          "word from CLS at layer -2", "count from CLS at layer -2", "word from CLS at layer -1",
                          "count from CLS at layer -1"]
    objects = sum(len(synthvqa.make_scene("test", i).objects) for i in range(6))
    assert rows["count from CLS at layer -1"]["cells"] == 6 and 0 < rows["shape from the mean token of its cells"]["cells"] <= objects
    assert all(0 <= row["accuracy"] <= 100 and 0 < row["chance"] <= 100 for row in rows.values())
