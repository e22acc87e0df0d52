"""The shipped tiny checkpoints: ordered-prefix reconstruction, search with the local verifier, the CLI."""
from pathlib import Path

import torch

from tokenomy.cli import main
from tokenomy.generation.classifier import SmallClassifier
from tokenomy.generation.data import shapes_batch
from tokenomy.generation.search import Searcher, UniformPrior
from tokenomy.generation.verifiers import ClassifierVerifier
from tokenomy.tokenizers import load_tokenizer

ASSETS = Path(__file__).resolve().parent.parent / "tokenomy" / "assets" / "generation"


def _spearman(x, y):
    rank = lambda v: torch.tensor(v).argsort().argsort().float()
    rx, ry = rank(x), rank(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def test_shipped_assets_fit_the_size_budget():
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total <= 20 * 2**20, f"shipped generation assets take {total / 2**20:.1f} MB"


def test_shipped_ordered_tokenizer_reconstruction_improves_with_prefix_length():
    tokenizer = load_tokenizer(ASSETS / "flextok")
    images, _ = shapes_batch(48, 32, torch.Generator().manual_seed(7))
    ids = tokenizer.encode(images)
    noise = torch.randn(images.shape[0], *tokenizer.noise_shape, generator=torch.Generator().manual_seed(0))
    lengths = [2**i for i in range(tokenizer.num_tokens.bit_length()) if 2**i <= tokenizer.num_tokens]
    errors = [(tokenizer.decode(ids[:, :k], steps=10, noise=noise) - images).pow(2).mean().item() for k in lengths]
    assert _spearman(lengths, errors) <= -0.9, errors
    assert errors[-1] < 0.9 * errors[0], errors  # measured on the shipped model: about 15% lower at 16 tokens than at 1
    mean_image_error = (images.mean(0, keepdim=True) - images).pow(2).mean().item()
    assert errors[-1] < mean_image_error, (errors, mean_image_error)


def test_search_with_local_verifier_beats_best_of_one_on_shipped_models():
    tokenizer = load_tokenizer(ASSETS / "flextok")
    verifier = ClassifierVerifier(SmallClassifier.load(ASSETS / "classifier"))
    searcher = Searcher(UniformPrior(tokenizer.vocab_size, 4), tokenizer, verifier, decode_kwargs={"steps": 8})
    one, beam = [], []
    for target in (0, 5, 10, 15):
        rng = lambda: torch.Generator().manual_seed(target)
        one.append(float(searcher.best_of_n(target, 1, generator=rng()).scores[0]))
        beam.append(float(searcher.beam_search(target, beams=2, candidates=8, schedule=[1, 2, 4], generator=rng()).scores[0]))
    assert sum(beam) / 4 > sum(one) / 4 + 0.5, (one, beam)


def test_generate_image_cli_writes_pngs(tmp_path):
    code = main(["generate-image", "--classes", "0,3", "--num", "2", "--steps", "8", "--out", str(tmp_path)])
    assert code == 0
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 4 and all(p.stat().st_size > 100 for p in pngs)
