"""Generation-branch benchmark on the shipped tiny checkpoints (CPU is enough).

1. Reconstruction PSNR against token count: the ordered FlexTok-style tokenizer at every power-of-two prefix,
   the 2D grid VQ tokenizer, the TiTok-style tokenizer when shipped, and two baselines (mean image, 4x
   nearest down/up-sampling).
2. RandAR decoding: forward passes, wall time, KID / FID on the local classifier's features and class
   consistency, for sequential decoding (one token per step) and parallel decoding (cosine schedule).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/generation.py --out benchmarks/generation.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from tokenomy.generation.base import load_generator
from tokenomy.generation.classifier import SmallClassifier
from tokenomy.generation.data import shapes_batch
from tokenomy.generation.metrics import frechet_distance, kernel_inception_distance, psnr
from tokenomy.tokenizers import load_tokenizer

ASSETS = Path(__file__).resolve().parent.parent / "tokenomy" / "assets" / "generation"


def reconstruction_table(images: torch.Tensor, train_images: torch.Tensor, flow_steps: int) -> list[dict]:
    rows = []
    mean_image = train_images.mean(0, keepdim=True).expand_as(images)
    rows.append({"tokenizer": "baseline: mean image", "tokens": 0, "psnr_db": psnr(mean_image, images).mean().item()})
    small = torch.nn.functional.interpolate(images, scale_factor=0.25, mode="nearest")
    rows.append({"tokenizer": "baseline: 4x nearest down/up (64 RGB pixels)", "tokens": 64,
                 "psnr_db": psnr(torch.nn.functional.interpolate(small, scale_factor=4, mode="nearest"), images).mean().item()})
    for name in ("grid_vq", "titok"):
        if (ASSETS / name).is_dir():
            tok = load_tokenizer(ASSETS / name)
            with torch.no_grad():
                recon = tok.decode(tok.encode(images))
            rows.append({"tokenizer": name, "tokens": tok.num_tokens, "vocab": tok.vocab_size, "psnr_db": psnr(recon, images).mean().item()})
    flextok = load_tokenizer(ASSETS / "flextok")
    ids = flextok.encode(images)
    noise = torch.randn(images.shape[0], *flextok.noise_shape, generator=torch.Generator().manual_seed(0))
    k = 1
    while k <= flextok.num_tokens:
        start = time.perf_counter()
        recon = torch.cat([flextok.decode(ids[i : i + 128, :k], steps=flow_steps, noise=noise[i : i + 128]) for i in range(0, len(ids), 128)])
        rows.append({"tokenizer": f"flextok prefix ({flow_steps} Euler steps, CFG {flextok.config.guidance})", "tokens": k,
                     "vocab": flextok.vocab_size, "psnr_db": psnr(recon, images).mean().item(),
                     "mse": (recon - images).pow(2).mean().item(), "decode_s_per_image": (time.perf_counter() - start) / len(ids)})
        k *= 2
    return rows


def merging_table(images: torch.Tensor, flow_steps: int, ratios=(0.0, 0.25, 0.45)) -> list[dict]:
    """Token merging (ToMe-SD through tokenomy.kernels) in the ordered tokenizer's flow decoder, all 16 tokens."""
    flextok = load_tokenizer(ASSETS / "flextok")
    ids = flextok.encode(images)
    noise = torch.randn(images.shape[0], *flextok.noise_shape, generator=torch.Generator().manual_seed(0))
    rows, unmerged = [], None
    for ratio in ratios:
        start = time.perf_counter()
        recon = flextok.decode(ids, steps=flow_steps, noise=noise, merge_ratio=ratio)
        elapsed = time.perf_counter() - start
        unmerged = recon if unmerged is None else unmerged
        rows.append({"merge_ratio": ratio, "merged_patch_tokens_per_block": int(ratio * flextok.grid[0] * flextok.grid[1]),
                     "patch_tokens": flextok.grid[0] * flextok.grid[1], "decode_s": elapsed,
                     "psnr_vs_original_db": psnr(recon, images).mean().item(), "psnr_vs_unmerged_db": psnr(recon, unmerged).mean().item()})
    return rows


def decoding_table(num_images: int, settings: list[str], cfg: float, seed: int) -> tuple[list[dict], dict]:
    """settings: "STEPS" or "STEPS@SEED_OFFSET" (a second seed of one setting shows run-to-run noise)."""
    generator_model = load_generator(ASSETS / "randar")
    tokenizer = load_tokenizer(ASSETS / "grid_vq")
    classifier = SmallClassifier.load(ASSETS / "classifier")
    real, _ = shapes_batch(num_images, 32, torch.Generator().manual_seed(10_000 + seed))
    real_b, _ = shapes_batch(num_images, 32, torch.Generator().manual_seed(20_000 + seed))
    with torch.no_grad():
        # The generator models the tokenizer's ids, so its reference is the tokenizer's reconstructions of real
        # images: that keeps the tokenizer's own artefacts out of the generator's score. Features are
        # standardised with the reference statistics so the cubic KID kernel works on unit-scale inputs.
        reference_raw = classifier.features(tokenizer.decode(tokenizer.encode(real)))
        mean, std = reference_raw.mean(0), reference_raw.std()  # one global scale: near-constant dims must not blow up
        standardise = lambda f: (f - mean) / std
        reference = standardise(reference_raw)
        recon_b = standardise(classifier.features(tokenizer.decode(tokenizer.encode(real_b))))
        real_b_features = standardise(classifier.features(real_b))
    floor = {"kid_recon_vs_recon": kernel_inception_distance(recon_b, reference),
             "fid_recon_vs_recon": frechet_distance(recon_b, reference),
             "kid_real_vs_recon": kernel_inception_distance(real_b_features, reference),
             "fid_real_vs_recon": frechet_distance(real_b_features, reference)}
    labels = torch.arange(num_images) % generator_model.config.num_classes
    rows = []
    for setting in tqdm(settings, desc="randar decoding settings"):
        steps, _, offset = setting.partition("@")
        steps, run_seed = int(steps), seed + int(offset or 0)
        generator_model.forward_passes = 0
        rng = torch.Generator().manual_seed(run_seed)
        start = time.perf_counter()
        tokens = torch.cat([generator_model.generate(labels[i : i + 256], steps=steps, cfg=cfg, generator=rng)
                            for i in range(0, num_images, 256)])
        elapsed = time.perf_counter() - start
        passes = generator_model.forward_passes / ((num_images + 255) // 256)
        with torch.no_grad():
            images = tokenizer.decode(tokens)
            logits = classifier(images)
            features = standardise(classifier.features(images))
        kid, kid_std = kernel_inception_distance(features, reference)
        rows.append({"steps": steps or generator_model.num_tokens, "seed": run_seed, "forward_passes_per_image": passes, "wall_s": elapsed,
                     "kid": kid, "kid_std": kid_std, "fid": frechet_distance(features, reference),
                     "class_consistency": (logits.argmax(-1) == labels).float().mean().item()})
    if (ASSETS / "raster").is_dir():  # the raster GPT on the same tokens, KV-cached, one token per pass
        raster = load_generator(ASSETS / "raster")
        raster.forward_passes = 0
        rng = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        tokens = torch.cat([raster.generate(labels[i : i + 256], cfg=cfg, generator=rng) for i in range(0, num_images, 256)])
        elapsed = time.perf_counter() - start
        with torch.no_grad():
            images = tokenizer.decode(tokens)
            logits, features = classifier(images), standardise(classifier.features(images))
        kid, kid_std = kernel_inception_distance(features, reference)
        rows.append({"steps": "raster GPT", "seed": seed, "forward_passes_per_image": raster.forward_passes / ((num_images + 255) // 256),
                     "wall_s": elapsed, "kid": kid, "kid_std": kid_std, "fid": frechet_distance(features, reference),
                     "class_consistency": (logits.argmax(-1) == labels).float().mean().item()})
    return rows, floor


def likelihood_table(num_images: int, seed: int) -> list[dict]:
    """Held-out NLL (nats/token) of the RandAR model under teacher forcing, in raster and in random order."""
    generator_model = load_generator(ASSETS / "randar")
    tokenizer = load_tokenizer(ASSETS / "grid_vq")
    images, labels = shapes_batch(num_images, 32, torch.Generator().manual_seed(30_000 + seed))
    tokens = tokenizer.encode(images)
    rows = []
    with torch.no_grad():
        for order in ("raster", "random"):
            log_prob = generator_model.sequence_log_prob(labels, tokens, order=order, generator=torch.Generator().manual_seed(seed))
            rows.append({"order": order, "nll_nats_per_token": -log_prob.mean().item() / tokens.shape[1]})
        if (ASSETS / "raster").is_dir():
            log_prob = load_generator(ASSETS / "raster").sequence_log_prob(labels, tokens)
            rows.append({"order": "raster (raster GPT)", "nll_nats_per_token": -log_prob.mean().item() / tokens.shape[1]})
    return rows


def search_table(targets: list[int], budget_candidates: int, seed: int) -> list[dict]:
    """AR-free search over the ordered tokenizer's first 4 tokens with the local classifier as verifier."""
    from tokenomy.generation.search import Searcher, UniformPrior
    from tokenomy.generation.verifiers import ClassifierVerifier

    tokenizer = load_tokenizer(ASSETS / "flextok")
    verifier = ClassifierVerifier(SmallClassifier.load(ASSETS / "classifier"))
    searcher = Searcher(UniformPrior(tokenizer.vocab_size, 4), tokenizer, verifier, decode_kwargs={"steps": 10})
    results = {"best-of-1": [], "beam (2 beams, schedule 1,2,4)": [], "best-of-N (same decodes as beam)": []}
    decodes = 0
    for target in tqdm(targets, desc="search targets"):
        rng = lambda: torch.Generator().manual_seed(seed + target)
        one = searcher.best_of_n(target, 1, generator=rng())
        beam = searcher.beam_search(target, beams=2, candidates=budget_candidates, schedule=[1, 2, 4], generator=rng())
        bon = searcher.best_of_n(target, beam.compute.decoded_images, generator=rng())
        decodes = beam.compute.decoded_images
        for name, result in zip(results, (one, beam, bon)):
            with torch.no_grad():
                hit = verifier.classifier(result.images[:1]).argmax(-1).item() == target
            results[name].append((float(result.scores[0]), hit))
    return [{"method": name, "decoded_images": 1 if name == "best-of-1" else decodes,
             "mean_verifier_log_prob": sum(s for s, _ in rows) / len(rows), "target_class_hit_rate": sum(h for _, h in rows) / len(rows)}
            for name, rows in results.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=1024, help="generated images per decoding setting")
    parser.add_argument("--recon-images", type=int, default=256)
    parser.add_argument("--steps", default="0,0@1,32,22,16", help="RandAR steps to compare; 0 = sequential (one token per step); @k = seed offset")
    parser.add_argument("--cfg", type=float, default=2.0)
    parser.add_argument("--flow-steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default="recon,merge,decoding,likelihood,search", help="comma-separated sections to run")
    parser.add_argument("--out", default="benchmarks/generation.json")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    parts = set(args.parts.split(","))
    recon = decoding = likelihood = search = merging = []
    floor = {}
    if "recon" in parts:
        held_out, _ = shapes_batch(args.recon_images, 32, torch.Generator().manual_seed(123))
        train_like, _ = shapes_batch(1024, 32, torch.Generator().manual_seed(321))
        recon = reconstruction_table(held_out, train_like, args.flow_steps)
    if "merge" in parts:
        merging = merging_table(shapes_batch(args.recon_images, 32, torch.Generator().manual_seed(123))[0], args.flow_steps)
    if "decoding" in parts:
        decoding, floor = decoding_table(args.num_images, args.steps.split(","), args.cfg, args.seed)
    if "likelihood" in parts:
        likelihood = likelihood_table(512, args.seed)
    if "search" in parts:
        search = search_table(list(range(16)), 8, args.seed)
    report = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args), "reconstruction": recon,
              "decoding": decoding, "quality_floor": floor, "likelihood": likelihood, "search": search, "merging": merging}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("| tokenizer | tokens | PSNR (dB) |\n|---|---|---|")
    for row in recon:
        print(f"| {row['tokenizer']} | {row['tokens']} | {row['psnr_db']:.2f} |")
    print("\n| RandAR steps | seed | forward passes / image | wall (s) | KID x1e3 (± std) | FID | class consistency |\n|---|---|---|---|---|---|---|")
    for row in decoding:
        print(f"| {row['steps']} | {row['seed']} | {row['forward_passes_per_image']:.0f} | {row['wall_s']:.1f} | {1e3 * row['kid']:.2f} ± {1e3 * row['kid_std']:.2f} | {row['fid']:.2f} | {row['class_consistency']:.3f} |")
    if floor:
        print(f"\nreference = grid VQ reconstructions of {args.num_images} held-out images; floor (other held-out reconstructions): "
              f"KID x1e3 {1e3 * floor['kid_recon_vs_recon'][0]:.2f} ± {1e3 * floor['kid_recon_vs_recon'][1]:.2f}, FID {floor['fid_recon_vs_recon']:.2f}; "
              f"raw held-out images: KID x1e3 {1e3 * floor['kid_real_vs_recon'][0]:.2f}, FID {floor['fid_real_vs_recon']:.2f}")
    if likelihood:
        print("\n| model / order | held-out NLL (nats/token) |\n|---|---|")
        for row in likelihood:
            print(f"| {row['order']} | {row['nll_nats_per_token']:.3f} |")
    if merging:
        print("\n| decoder merge ratio | merged / patch tokens per block | decode (s) | PSNR vs original (dB) | PSNR vs unmerged (dB) |\n|---|---|---|---|---|")
        for row in merging:
            print(f"| {row['merge_ratio']} | {row['merged_patch_tokens_per_block']} / {row['patch_tokens']} | {row['decode_s']:.2f} | {row['psnr_vs_original_db']:.2f} | {row['psnr_vs_unmerged_db']:.2f} |")
    print("\n| search (uniform prior, 4 ordered tokens) | decoded images | mean log p(target) | target hit rate |\n|---|---|---|---|")
    for row in search:
        print(f"| {row['method']} | {row['decoded_images']} | {row['mean_verifier_log_prob']:.2f} | {row['target_class_hit_rate']:.2f} |")


if __name__ == "__main__":
    main()
