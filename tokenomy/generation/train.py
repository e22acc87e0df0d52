"""Training recipes: tokenizers on offline images, AR generators on the token ids of a trained tokenizer.

Both loops are plain AdamW with linear warm-up, a wall-clock budget and periodic checkpoints, so a run can be
stopped at any time and still leave a usable model on disk.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from tokenomy.generation.data import DATASETS, sample_batch
from tokenomy.tokenizers.base import TOKENIZERS, load_tokenizer
from tokenomy.errors import UnknownNameError


def _optimizer(model, lr: float, betas=(0.9, 0.99), weight_decay: float = 0.0):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)


def _warmup_lr(step: int, base_lr: float, warmup: int) -> float:
    return base_lr * min(1.0, (step + 1) / max(1, warmup))


def train_tokenizer(kind: str, out_dir, dataset: str = "shapes", steps: int = 2000, batch: int = 64, lr: float = 3e-4,
                    minutes: float | None = None, seed: int = 0, checkpoint_every: int = 250, **config_overrides):
    """Train a tokenizer of `kind` from scratch and save it (config.json + model.safetensors) to `out_dir`."""
    if kind not in TOKENIZERS:
        raise UnknownNameError("tokenizer", kind, TOKENIZERS)
    if dataset not in DATASETS:
        raise UnknownNameError("dataset", dataset, DATASETS)
    torch.manual_seed(seed)
    cls = TOKENIZERS[kind]
    model = cls(cls.config_class(**config_overrides)).train()
    optimizer = _optimizer(model, lr)
    generator = torch.Generator().manual_seed(seed)
    deadline = time.time() + 60 * minutes if minutes else None
    log = []
    bar = tqdm(range(steps), desc=f"train {kind} on {dataset}")
    for step in bar:
        images, _ = sample_batch(dataset, batch, generator, model.config.image_size)
        for group in optimizer.param_groups:
            group["lr"] = _warmup_lr(step, lr, 100)
        loss, parts = model.loss(images, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        log.append({"step": step, "loss": loss.item(), **parts})
        last = step + 1 == steps or (deadline is not None and time.time() > deadline)
        if (step + 1) % checkpoint_every == 0 or last:
            model.eval().save(out_dir)
            model.train()
            (Path(out_dir) / "train_log.json").write_text(json.dumps({"dataset": dataset, "batch": batch, "lr": lr, "steps_done": step + 1, "log": log[-50:]}))
        if last:
            break
    return model.eval()
