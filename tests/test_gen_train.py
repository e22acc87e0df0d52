"""The training recipes run end to end on tiny models and leave loadable checkpoints."""
import json

import torch

from tokenomy.generation.base import load_generator
from tokenomy.generation.train import train_ar, train_tokenizer
from tokenomy.tokenizers import load_tokenizer


def test_train_tokenizer_then_ar_recipes(tmp_path):
    tok_dir, ar_dir = tmp_path / "tok", tmp_path / "ar"
    train_tokenizer("grid_vq", tok_dir, dataset="digits", steps=3, batch=8, channels=16, codebook_size=32)
    tokenizer = load_tokenizer(tok_dir)
    assert json.loads((tok_dir / "train_log.json").read_text())["steps_done"] == 3
    train_ar("randar", tok_dir, ar_dir, dataset="digits", steps=3, batch=4, num_images=16, width=32, depth=1, heads=2)
    model = load_generator(ar_dir)
    assert model.config.vocab_size == 32 and (model.config.grid_rows, model.config.grid_cols) == tokenizer.grid
    tokens = model.generate(torch.tensor([3]), steps=4, generator=torch.Generator().manual_seed(0))
    assert tokenizer.decode(tokens).shape == (1, 3, 32, 32)
    flex_dir = tmp_path / "flex"
    train_tokenizer("flextok", flex_dir, steps=2, batch=4, pool=8, vae_from=tok_dir, patch_size=2, width=32,
                    encoder_depth=1, decoder_depth=1, heads=2, num_registers=4)
    flex = load_tokenizer(flex_dir)
    torch.testing.assert_close(flex.vae.quantizer.embedding.weight, tokenizer.quantizer.embedding.weight)  # frozen autoencoder
