"""`tokenomy train-ref`: train a reference model on synthvqa or on a vqa-jsonl folder of your own."""
from __future__ import annotations

from pathlib import Path


def add_parser(subparsers):
    from tokenomy.train.loop import STAGES, TrainConfig
    from tokenomy.train.models import ARCHES

    defaults = TrainConfig(arch="llava", out_dir="")
    parser = subparsers.add_parser(
        "train-ref", help="train a small reference VLM (LLaVA or Qwen2-VL format) on synthvqa or your vqa-jsonl data",
        description="Train a reference model from scratch. Checkpoints are written every --save-every steps; "
                    "--resume continues the same run and the same loss curve. The result is a transformers folder "
                    "OUT/model that `tokenomy.load(OUT/model)` and `tokenomy eval --model OUT/model` open.",
    )
    parser.add_argument("--arch", choices=ARCHES, required=True)
    parser.add_argument("--data", default=None, help="vqa-jsonl folder (train.jsonl or *.jsonl; {id, image, question, "
                                                     "answers}); default: the synthvqa train stream")
    parser.add_argument("--out", default=None, help="run folder (default: runs/ref-ARCH)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--save-every", type=int, default=defaults.save_every)
    parser.add_argument("--vision-steps", type=int, default=defaults.vision_steps,
                        help="first steps train only the vision tower + projector through the probe (synthvqa)")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size, help="BPE vocabulary of the tokenizer")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--llm-layers", type=int, default=defaults.llm_layers, help="decoder layers of the language model")
    parser.add_argument("--grow-from", default=None,
                        help="start from this run folder's checkpoint (fewer LLM layers, same arch): its layers are spread "
                             "over --llm-layers and the new ones start as the identity")
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:N, or auto (the GPU when there is one)")
    parser.add_argument("--workers", type=int, default=defaults.workers,
                        help="processes building the next batches while the model trains (use several on a GPU)")
    parser.add_argument("--vision-tower", default=None,
                        help="train-clip's OUT/model as the vision tower, with --stage: --arch llava (LLaVA-1.5 recipe) takes "
                             "a --tower clip export, frozen, read at its second-to-last layer; --arch qwen (Qwen2-VL "
                             "recipe) a --tower qwen export, trained on")
    parser.add_argument("--stage", choices=STAGES, default=None,
                        help="with --vision-tower: pretrain trains on captions with the LLM frozen, finetune trains the LLM "
                             "too, on the VQA turns")
    parser.add_argument("--init-from", default=None,
                        help="start from this run folder's weights and tokenizer (same arch and sizes), e.g. the pretrain "
                             "run a finetune continues")
    parser.add_argument("--probe-weight", type=float, default=None,
                        help="visual-token probe loss weight (synthvqa); default 1 end to end, 0 on a frozen tower")
    parser.add_argument("--vision-lr-scale", type=float, default=None,
                        help="the vision side's learning rate as a fraction of --lr; default 0.1 for --arch qwen on a "
                             "--vision-tower (the Qwen2-VL recipe), else 1")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--eval-scenes", type=int, default=50,
                        help="after training on synthvqa, score this many val scenes (7 questions each); 0 skips")
    parser.set_defaults(func=run)
    add_clip_parser(subparsers)


def add_clip_parser(subparsers):
    from tokenomy.train.clip import CAPTION_STYLES, TOWERS, ClipConfig

    defaults = ClipConfig(out_dir="")
    parser = subparsers.add_parser(
        "train-clip", help="train ref-clip: a CLIP model, contrastively, on synthvqa scenes and captions of them",
        description="Train transformers' CLIPModel on synthvqa scenes, each with a caption written from its description "
                    "(colours, shapes, counts, positions, the small object, the word). Checkpoints every --save-every "
                    "steps; --resume continues the same loss curve. Writes OUT/model (safetensors, tokenizer, image "
                    "processor) and its zero-shot image->caption retrieval accuracy on test scenes.",
    )
    parser.add_argument("--out", default="runs/ref-clip", help="run folder")
    for option in ("steps", "batch_size", "lr", "warmup", "weight_decay", "vision_layers", "width", "text_layers",
                   "save_every", "threads", "seed", "vocab_size", "tokenizer_scenes", "workers", "caption_weight",
                   "decoder_layers"):
        value = getattr(defaults, option)
        parser.add_argument(f"--{option.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:N, or auto (the GPU when there is one)")
    parser.add_argument("--tower", choices=TOWERS, default=defaults.tower,
                        help="clip: CLIP's ViT with CLS (ref-clip); qwen: a Qwen2-VL ViT with its 2x2 merger, for train-ref "
                             "--arch qwen --vision-tower")
    parser.add_argument("--captions", choices=CAPTION_STYLES, default=defaults.captions,
                        help="caption writer: v2 names the word in every caption and 2-4 objects; v1 trained the shipped "
                             "ref-clip")
    parser.add_argument("--twins", action="store_true",
                        help="hard negatives: half of each batch are twins of the other half, differing only in the word "
                             "or in one named object's shape, captioned alike")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--eval-scenes", type=int, default=100, help="test scenes of the retrieval score; 0 skips it")
    parser.set_defaults(func=run_clip)


def run_clip(args):
    from dataclasses import fields

    from tokenomy.train.clip import ClipConfig, train_clip

    options = {f.name: getattr(args, f.name) for f in fields(ClipConfig) if f.name != "out_dir"}
    folder = train_clip(ClipConfig(out_dir=args.out, **options), resume=args.resume, eval_scenes=args.eval_scenes)
    print(f"model written to {folder}")
    if args.eval_scenes:
        print(f"zero-shot retrieval on {args.eval_scenes} test scenes: {(folder / 'retrieval.json').read_text()}")
    return 0


def run(args):
    from tokenomy.train.loop import TrainConfig, train

    config = TrainConfig(
        arch=args.arch, out_dir=args.out or str(Path("runs") / f"ref-{args.arch}"), data=args.data, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, save_every=args.save_every, threads=args.threads,
        vision_steps=args.vision_steps, llm_layers=args.llm_layers, grow_from=args.grow_from,
        seed=args.seed, vocab_size=args.vocab_size, device=args.device, workers=args.workers,
        vision_tower=args.vision_tower, stage=args.stage, init_from=args.init_from, probe_weight=args.probe_weight,
        vision_lr_scale=args.vision_lr_scale,
    )
    folder = train(config, resume=args.resume)
    print(f"model written to {folder}")
    if args.data is None and args.eval_scenes > 0 and args.stage != "pretrain":  # stage 1 answers with captions
        from tokenomy.eval import synthvqa
        from tokenomy.eval.synthvqa_eval import evaluate
        from tokenomy.vlm.pipeline import load

        result = evaluate(load(str(folder)), synthvqa.items("val", num_scenes=args.eval_scenes), desc="synthvqa val")
        print(f"synthvqa val accuracy: {result['overall']:.1f}% over {result['count']} questions")
        for kind, accuracy in result["per_type"].items():
            print(f"  {kind:8s} {accuracy:5.1f}%")
    return 0
