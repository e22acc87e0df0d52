"""A test double of `tokenomy.load` / `Pipeline` (tests only), following the pipeline contract.

Predictions depend on the prompt, the image pixels, the reducer and keep, and (for "random") on torch's global
RNG, so the runner's seeding, sharding and resume logic are all exercised by comparing outputs.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from PIL import Image

from tokenomy.errors import InputError

VOCAB = ["yes", "no", "2", "dog", "cat", "A", "B", "red"]
TOKENS_PER_IMAGE = 16


@dataclass
class FakeGeneration:
    text: str
    token_ids: list
    stats: dict = field(default_factory=dict)


class FakePipeline:
    def __init__(self, reducer="none", keep=None, device="cpu", delay_s=0.0, num_layers=4):
        self.name, self.reducer, self.keep, self.device, self.delay_s = "fake-llava", reducer, keep, torch.device(device), delay_s
        self.text_config = SimpleNamespace(hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers)

    def generate(self, images, prompts, max_new_tokens=32, do_sample=False, **kwargs):
        if isinstance(prompts, str):
            prompts, images = [prompts], [images]
        if len(images) != len(prompts):
            raise InputError("images and prompts differ in length")
        out = []
        for image, prompt in zip(images, prompts):
            frames = image if isinstance(image, list) else [image]
            if not all(isinstance(f, Image.Image) for f in frames):
                raise InputError("fake pipeline expects PIL images")
            n_in = TOKENS_PER_IMAGE * len(frames)
            kept = n_in if self.keep is None else min(self.keep, n_in)
            digest = hashlib.sha256(prompt.encode() + b"".join(f.tobytes() for f in frames)).digest()
            choice = digest[0]
            if self.reducer == "random":
                choice += int(torch.randint(0, 3, ()).item())  # depends on the seeded global RNG
            if kept < n_in:
                choice += kept
            text = VOCAB[choice % len(VOCAB)]
            n_new = min(max_new_tokens, 3)
            per_layer = [n_in] + [kept] * (self.text_config.num_hidden_layers - 1) if self.reducer == "fastv" else [kept] * self.text_config.num_hidden_layers
            out.append(FakeGeneration(text, list(range(n_new)), {
                "visual_tokens_in": n_in, "visual_tokens_kept": kept if self.reducer != "fastv" else n_in,
                "visual_tokens_per_layer": per_layer, "prefill_tokens": (n_in if self.reducer == "fastv" else kept) + len(prompt.split()),
                "reducer": self.reducer, "keep": self.keep, "new_tokens": n_new,
                "kept_indices": [list(range(min(kept, TOKENS_PER_IMAGE))) for _ in frames]}))
        if self.delay_s:
            time.sleep(self.delay_s)
        for g in out:
            g.stats.update(prefill_ms=1.0, decode_ms=2.0)
        return out


def fake_load(model, reducer="none", device=None, dtype=None, keep=None, delay_s=0.0, **kwargs):
    return FakePipeline(reducer=reducer, keep=keep, device=device or "cpu", delay_s=float(delay_s))


def write_vqa_fixture(root, n=6, bad=False):
    """A vqa-jsonl fixture of `n` valid samples (distinct images); with `bad`, also the three kinds of bad data."""
    import json

    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (8, 8), (40 * i % 256, 7 * i, 100)).save(root / "img" / f"{i}.png")
        rows.append(json.dumps({"id": f"q{i}", "image": f"img/{i}.png", "question": f"What is shown in picture {i}?",
                                "answers": [VOCAB[i % len(VOCAB)]] * 6 + ["dog"] * 4}))
    if bad:
        rows.insert(2, json.dumps({"id": "missing-image", "image": "img/nope.png", "question": "?", "answers": ["dog"]}))
        rows.insert(4, json.dumps({"id": "no-answers", "image": "img/0.png", "question": "?", "answers": []}))
        rows.insert(5, '{"id": "broken-line", "image": "img/0.png", "question": ')
    (root / "qa.jsonl").write_text("\n".join(rows) + "\n")
    return root


def spawn_worker(rank, world, port, config_kwargs):
    """torch.multiprocessing.spawn target: one rank of a gloo data-parallel evaluation."""
    import os

    from tokenomy.eval.runner import EvalConfig, run_eval

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run_eval(EvalConfig(**config_kwargs), load_fn=fake_load)
