"""Training recipes: tokenizers on offline images, AR generators on the token ids of a trained tokenizer.

Both loops are plain AdamW with linear warm-up, a wall-clock budget and periodic checkpoints, so a run can be
stopped at any time and still leave a usable model on disk.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from tokenomy.generation.data import DATASETS, image_pool, sample_batch
from tokenomy.tokenizers.base import TOKENIZERS, load_tokenizer
from tokenomy.errors import UnknownNameError


def _optimizer(model_or_params, lr: float, betas=(0.9, 0.99), weight_decay: float = 0.0):
    params = model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module) else model_or_params
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def _warmup_lr(step: int, base_lr: float, warmup: int) -> float:
    return base_lr * min(1.0, (step + 1) / max(1, warmup))


def train_tokenizer(kind: str, out_dir, dataset: str = "shapes", steps: int = 2000, batch: int = 64, lr: float = 3e-4,
                    minutes: float | None = None, seed: int = 0, checkpoint_every: int = 250, init_from=None,
                    pool: int = 0, pool_cache=None, **config_overrides):
    """Train a tokenizer of `kind` (from scratch, or continuing `init_from`) and save it to `out_dir`."""
    if kind not in TOKENIZERS:
        raise UnknownNameError("tokenizer", kind, TOKENIZERS)
    if dataset not in DATASETS:
        raise UnknownNameError("dataset", dataset, DATASETS)
    torch.manual_seed(seed)
    cls = TOKENIZERS[kind]
    vae_from = config_overrides.pop("vae_from", None)
    if init_from:
        model = load_tokenizer(init_from)
    elif vae_from:  # latent-space tokenizer on top of a trained, frozen grid VQ autoencoder
        autoencoder = load_tokenizer(vae_from)
        scale = config_overrides.pop("latent_scale", autoencoder.config.code_dim ** 0.5)  # unit-norm codes -> unit variance
        model = cls(cls.config_class(vae=dataclasses.asdict(autoencoder.config), latent_scale=scale, **config_overrides))
        model.vae.load_state_dict(autoencoder.state_dict())
    else:
        model = cls(cls.config_class(**config_overrides))
    model.train()
    optimizer = _optimizer([p for p in model.parameters() if p.requires_grad], lr)
    generator = torch.Generator().manual_seed(seed)
    deadline = time.time() + 60 * minutes if minutes else None
    # a fixed pool instead of fresh images each step; a frozen autoencoder's latents are then computed once
    pool_images = image_pool(dataset, pool, seed + 1, model.config.image_size, pool_cache)[0] if pool else None
    pool_latents = None
    if pool and getattr(model, "vae", None) is not None:
        pool_latents = torch.cat([model.to_latent(chunk) for chunk in pool_images.split(500)])
    log = []
    bar = tqdm(range(steps), desc=f"train {kind} on {dataset}")
    for step in bar:
        if pool:
            picks = torch.randint(pool, (batch,), generator=generator)
            images = pool_images[picks]
        else:
            images, _ = sample_batch(dataset, batch, generator, model.config.image_size)
        for group in optimizer.param_groups:
            group["lr"] = _warmup_lr(step, lr, 100)
        if pool_latents is not None:
            loss, parts = model.loss(images, generator, latent=pool_latents[picks])
        else:
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


def tokenize_dataset(tokenizer, dataset: str = "shapes", size: int = 20000, seed: int = 1, batch: int = 500, pool_cache=None):
    """Encode a fixed set of images once: (token ids [size, L], labels [size])."""
    images, labels = image_pool(dataset, size, seed, tokenizer.config.image_size, pool_cache)
    ids = [tokenizer.encode(chunk) for chunk in tqdm(images.split(batch), desc=f"tokenize {dataset}")]
    return torch.cat(ids), labels


def train_ar(kind: str, tokenizer_dir, out_dir, dataset: str = "shapes", steps: int = 4000, batch: int = 64, lr: float = 1e-3,
             minutes: float | None = None, seed: int = 0, num_images: int = 20000, checkpoint_every: int = 250,
             init_from=None, pool_cache=None, **config_overrides):
    """Train a class-conditional AR generator (`raster` or `randar`) on the ids of a trained tokenizer."""
    from tokenomy.generation.base import GENERATORS, ARConfig, load_generator

    if kind not in GENERATORS:
        raise UnknownNameError("generator", kind, GENERATORS)
    tokenizer = load_tokenizer(tokenizer_dir)
    ids, labels = tokenize_dataset(tokenizer, dataset, num_images, seed=1, pool_cache=pool_cache)
    # 2D grid tokens keep their grid for the 2D RoPE; 1D tokenizers become a 1 x K grid
    rows, cols = tokenizer.grid if tokenizer.kind == "grid_vq" else (1, tokenizer.num_tokens)
    torch.manual_seed(seed)
    if init_from:
        model = load_generator(init_from)
    else:
        config = ARConfig(vocab_size=tokenizer.vocab_size, num_classes=DATASETS[dataset], grid_rows=rows, grid_cols=cols, **config_overrides)
        model = GENERATORS[kind](config)
    model.train()
    optimizer = _optimizer(model, lr, betas=(0.9, 0.95), weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    deadline = time.time() + 60 * minutes if minutes else None
    log = []
    bar = tqdm(range(steps), desc=f"train {kind} on {dataset} tokens")
    for step in bar:
        picks = torch.randint(ids.shape[0], (batch,), generator=generator)
        for group in optimizer.param_groups:
            # linear warm-up, then cosine decay to 10% over the step budget
            progress = step / max(1, steps)
            group["lr"] = _warmup_lr(step, lr, 200) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        loss = model.loss(ids[picks], labels[picks], generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        log.append({"step": step, "loss": loss.item()})
        last = step + 1 == steps or (deadline is not None and time.time() > deadline)
        if (step + 1) % checkpoint_every == 0 or last:
            model.eval().save(out_dir)
            model.train()
            (Path(out_dir) / "train_log.json").write_text(json.dumps({"dataset": dataset, "tokenizer": str(tokenizer_dir), "batch": batch, "lr": lr, "steps_done": step + 1, "log": log[-50:]}))
        if last:
            break
    return model.eval()


def train_classifier(out_dir, dataset: str = "shapes", steps: int = 600, batch: int = 128, lr: float = 2e-3, seed: int = 0):
    """The small local CNN used for FID/KID features and as the local verifier."""
    from tokenomy.generation.classifier import SmallClassifier, classifier_loss

    torch.manual_seed(seed)
    model = SmallClassifier(DATASETS[dataset]).train()
    optimizer = _optimizer(model, lr)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc=f"train classifier on {dataset}")
    for step in bar:
        images, labels = sample_batch(dataset, batch, generator)
        loss = classifier_loss(model, images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    images, labels = sample_batch(dataset, 1000, torch.Generator().manual_seed(seed + 999), split="test")
    with torch.no_grad():
        accuracy = (model(images).argmax(-1) == labels).float().mean().item()
    model.save(out_dir)
    (Path(out_dir) / "train_log.json").write_text(json.dumps({"dataset": dataset, "steps": steps, "held_out_accuracy": accuracy}))
    return model, accuracy
