"""Test-time search: exact reductions on tiny random models, and a verifier gain on the shipped models."""
import torch

from tokenomy.generation.base import ARConfig
from tokenomy.generation.raster_ar import RasterAR
from tokenomy.generation.search import ARPrior, Searcher, UniformPrior, geometric_schedule
from tokenomy.generation.verifiers import ClassifierVerifier
from tokenomy.generation.classifier import SmallClassifier
from tokenomy.tokenizers import FlexTokConfig, FlexTokTokenizer


def _tiny_setup(seed=0):
    torch.manual_seed(seed)
    tokenizer = FlexTokTokenizer(FlexTokConfig(image_size=16, width=32, encoder_depth=1, decoder_depth=1, heads=2,
                                               num_registers=8, levels=(4, 4), sample_steps=2, guidance=1.0)).eval()
    for block in tokenizer.decoder:
        torch.nn.init.normal_(block.modulation[1].weight, std=0.2)
    torch.nn.init.normal_(tokenizer.to_velocity.weight, std=0.2)
    model = RasterAR(ARConfig(vocab_size=16, num_classes=3, grid_rows=1, grid_cols=8, width=32, depth=2, heads=2)).eval()
    torch.nn.init.normal_(model.trunk.head.weight, std=0.5)
    verifier = ClassifierVerifier(SmallClassifier(num_classes=3, width=8, feature_dim=16).eval())
    return tokenizer, model, verifier


def test_geometric_schedule():
    assert geometric_schedule(16) == [1, 2, 4, 8, 16]
    assert geometric_schedule(12) == [1, 2, 4, 8, 12]


def test_greedy_beam_of_width_one_equals_greedy_decoding():
    tokenizer, model, verifier = _tiny_setup()
    searcher = Searcher(ARPrior(model), tokenizer, verifier)
    result = searcher.beam_search(1, beams=1, candidates=1, schedule=[1, 3, 8], generator=torch.Generator().manual_seed(0))
    greedy = model.generate(torch.tensor([1]), temperature=0.0)
    assert torch.equal(result.tokens, greedy)
    assert result.compute.decoded_images == 3 and result.compute.ar_forward_passes == 8


def test_lookahead_scores_extended_prefixes_but_keeps_beam_tokens():
    tokenizer, model, verifier = _tiny_setup()
    searcher = Searcher(ARPrior(model), tokenizer, verifier)
    plain = searcher.beam_search(2, beams=2, candidates=3, schedule=[1, 2, 4], generator=torch.Generator().manual_seed(3))
    ahead = searcher.beam_search(2, beams=2, candidates=3, schedule=[1, 2, 4], lookahead=3, generator=torch.Generator().manual_seed(3))
    assert plain.tokens.shape == ahead.tokens.shape == (1, 4)
    # the look-ahead roll-outs cost extra AR passes but draw nothing from the search generator
    assert ahead.compute.ar_forward_passes > plain.compute.ar_forward_passes
    assert ahead.compute.decoded_images == plain.compute.decoded_images


def test_search_raises_verifier_score_over_best_of_one():
    """Beam search and best-of-N at the same number of decoded images both beat best-of-1 on the verifier."""
    tokenizer, _, verifier = _tiny_setup(seed=1)
    searcher = Searcher(UniformPrior(16, 8), tokenizer, verifier)
    gains_beam, gains_bon = [], []
    for seed in range(4):
        one = searcher.best_of_n(0, 1, generator=torch.Generator().manual_seed(seed))
        beam = searcher.beam_search(0, beams=2, candidates=4, schedule=[1, 2, 4, 8], generator=torch.Generator().manual_seed(seed))
        bon = searcher.best_of_n(0, beam.compute.decoded_images, generator=torch.Generator().manual_seed(seed))
        assert beam.compute.decoded_images == bon.compute.decoded_images == 4 + 8 + 8 + 8
        gains_beam.append(float(beam.scores[0] - one.scores[0]))
        gains_bon.append(float(bon.scores[0] - one.scores[0]))
    assert min(gains_bon) >= 0 and sum(gains_bon) > 0
    assert sum(gains_beam) > 0


def test_clip_verifier_loads_local_weights_only(tmp_path):
    import json

    import open_clip
    import pytest

    from tokenomy.errors import ModelLoadError
    from tokenomy.generation.verifiers import CLIPVerifier

    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "tiny-clip-test.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "config")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip-test")
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    verifier = CLIPVerifier("tiny-clip-test", tmp_path / "tiny.pt")
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    scores = verifier.score(images, ["a red circle", "a blue square", "a yellow cross"])
    assert scores.shape == (3,) and scores.min() >= 0 and scores.max() <= 2.5
    with pytest.raises(ModelLoadError):
        CLIPVerifier("tiny-clip-test", tmp_path / "missing.pt")
