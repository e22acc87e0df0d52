"""`tokenomy train-tokenizer`, `tokenomy train-ar`, `tokenomy train-verifier` and `tokenomy generate-image`."""
from __future__ import annotations

import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "generation"


def _overrides(pairs):
    """k=v pairs -> config overrides with ints, floats and tuples (comma lists) parsed."""
    out = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        parts = [p for p in value.split(",") if p]
        parsed = []
        for part in parts:
            try:
                parsed.append(int(part))
            except ValueError:
                try:
                    parsed.append(float(part))
                except ValueError:
                    parsed.append(part)
        out[key] = tuple(parsed) if "," in value else parsed[0]
    return out


def _train_tokenizer(args) -> int:
    from tokenomy.generation.train import train_tokenizer

    train_tokenizer(args.kind, args.out, dataset=args.dataset, steps=args.steps, batch=args.batch, lr=args.lr,
                    minutes=args.minutes, seed=args.seed, init_from=args.init_from, pool=args.pool, pool_cache=args.pool_cache,
                    **_overrides(args.set))
    print(f"saved {args.kind} tokenizer to {args.out}")
    return 0


def _train_ar(args) -> int:
    from tokenomy.generation.train import train_ar

    train_ar(args.kind, args.tokenizer, args.out, dataset=args.dataset, steps=args.steps, batch=args.batch, lr=args.lr,
             minutes=args.minutes, seed=args.seed, num_images=args.num_images, init_from=args.init_from, pool_cache=args.pool_cache,
             **_overrides(args.set))
    print(f"saved {args.kind} generator to {args.out}")
    return 0


def _train_verifier(args) -> int:
    from tokenomy.generation.train import train_classifier

    _, accuracy = train_classifier(args.out, dataset=args.dataset, steps=args.steps, seed=args.seed)
    print(f"saved classifier to {args.out}; held-out accuracy {accuracy:.3f}")
    return 0


def _generate_image(args) -> int:
    import torch
    from PIL import Image

    from tokenomy.errors import InputError
    from tokenomy.generation.base import load_generator
    from tokenomy.tokenizers import load_tokenizer

    generator_model, tokenizer = load_generator(args.generator), load_tokenizer(args.tokenizer)
    classes = [int(c) for c in args.classes.split(",")]
    if any(not 0 <= c < generator_model.config.num_classes for c in classes):
        raise InputError(f"--classes must lie in [0, {generator_model.config.num_classes}), got {classes}")
    labels = torch.tensor(classes).repeat_interleave(args.num)
    rng = torch.Generator().manual_seed(args.seed)
    options = dict(cfg=args.cfg, cfg_schedule=args.cfg_schedule, temperature=args.temperature, top_k=args.top_k, generator=rng)
    generator_model.forward_passes = 0
    if generator_model.kind == "randar":
        tokens = generator_model.generate(labels, steps=args.steps, order=args.order, **options)
    else:
        tokens = generator_model.generate(labels, **options)
    with torch.no_grad():
        images = tokenizer.decode(tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    for i, (label, array) in enumerate(zip(labels.tolist(), pixels)):
        Image.fromarray(array).resize((array.shape[1] * args.upscale, array.shape[0] * args.upscale), Image.NEAREST).save(out / f"class{label:02d}_{i:03d}.png")
    (out / "generation.json").write_text(json.dumps({"generator": str(args.generator), "tokenizer": str(args.tokenizer), "classes": classes,
                                                     "forward_passes": generator_model.forward_passes, **{k: v for k, v in vars(args).items() if k in ("steps", "order", "cfg", "cfg_schedule", "temperature", "top_k", "seed")}}))
    print(f"wrote {len(pixels)} images to {out} ({generator_model.forward_passes} forward passes)")
    return 0


def add_parser(subparsers) -> None:
    tok = subparsers.add_parser("train-tokenizer", help="train an image tokenizer (grid_vq, titok, flextok) on offline data")
    tok.add_argument("--kind", default="flextok", choices=["grid_vq", "titok", "flextok"])
    tok.add_argument("--dataset", default="shapes", choices=["shapes", "digits"])
    tok.add_argument("--out", required=True)
    tok.add_argument("--steps", type=int, default=2000)
    tok.add_argument("--batch", type=int, default=64)
    tok.add_argument("--lr", type=float, default=1e-3)
    tok.add_argument("--minutes", type=float, default=None, help="stop after this wall-clock budget (a checkpoint is saved)")
    tok.add_argument("--seed", type=int, default=0)
    tok.add_argument("--init-from", default=None, help="continue training a saved tokenizer folder")
    tok.add_argument("--pool", type=int, default=0, help="train on a fixed pool of this many images (0 = fresh images every step)")
    tok.add_argument("--pool-cache", default=None, help="file caching the image pool as uint8, shared between runs")
    tok.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. width=96 levels=8,5,5,5")
    tok.set_defaults(func=_train_tokenizer)

    ar = subparsers.add_parser("train-ar", help="train a class-conditional AR generator (raster, randar) on tokenizer ids")
    ar.add_argument("--kind", default="randar", choices=["raster", "randar"])
    ar.add_argument("--tokenizer", default=str(ASSETS / "grid_vq"))
    ar.add_argument("--dataset", default="shapes", choices=["shapes", "digits"])
    ar.add_argument("--out", required=True)
    ar.add_argument("--steps", type=int, default=4000)
    ar.add_argument("--batch", type=int, default=64)
    ar.add_argument("--lr", type=float, default=1e-3)
    ar.add_argument("--minutes", type=float, default=None)
    ar.add_argument("--seed", type=int, default=0)
    ar.add_argument("--num-images", type=int, default=20000, help="size of the tokenized training set")
    ar.add_argument("--init-from", default=None)
    ar.add_argument("--pool-cache", default=None, help="file caching the image pool as uint8, shared between runs")
    ar.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. width=128 depth=4")
    ar.set_defaults(func=_train_ar)

    ver = subparsers.add_parser("train-verifier", help="train the small local classifier (FID/KID features, search verifier)")
    ver.add_argument("--dataset", default="shapes", choices=["shapes", "digits"])
    ver.add_argument("--out", required=True)
    ver.add_argument("--steps", type=int, default=600)
    ver.add_argument("--seed", type=int, default=0)
    ver.set_defaults(func=_train_verifier)

    gen = subparsers.add_parser("generate-image", help="sample class-conditional images from a trained generator, write PNGs")
    gen.add_argument("--generator", default=str(ASSETS / "randar"))
    gen.add_argument("--tokenizer", default=str(ASSETS / "grid_vq"))
    gen.add_argument("--classes", default="0", help="comma-separated class ids")
    gen.add_argument("--num", type=int, default=4, help="images per class")
    gen.add_argument("--steps", type=int, default=0, help="RandAR decoding steps; 0 = one token per step")
    gen.add_argument("--order", default="random", choices=["random", "raster"])
    gen.add_argument("--cfg", type=float, default=2.0)
    gen.add_argument("--cfg-schedule", default="constant", choices=["constant", "linear", "power-cosine"])
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--upscale", type=int, default=4, help="nearest-neighbour upscaling of the written PNGs")
    gen.add_argument("--out", required=True)
    gen.set_defaults(func=_generate_image)
