"""`tokenomy generate`: one prompt over one or more images with a reducer, printing the answer and its stats."""
from __future__ import annotations

import json

from tokenomy.options import parse_value


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="answer a prompt about images with a token reducer")
    parser.add_argument("--model", required=True, help="built-in name (tiny-llava, ...) or a local model folder")
    parser.add_argument("--image", action="append", default=[], help="image file; repeat for several images")
    parser.add_argument("--prompt", required=True, help="the question; '<image>' marks where images go")
    parser.add_argument("--reducer", default="none",
                        help="a registered reducer or a stacked spec such as vtc-cls:keep=32+fastv (stages joined by +)")
    parser.add_argument("--keep", type=int, default=None, help="the last stage's budget: visual tokens per image it keeps")
    parser.add_argument("--position-policy", default=None, choices=["contiguous", "keep", "multi"],
                        help="positions of the kept tokens (default: the model family's)")
    parser.add_argument("--reducer-arg", action="append", default=[], metavar="K=V", help="extra reducer option")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", action="store_true", help="print the answer and stats as JSON")
    parser.add_argument("--vis", default=None, metavar="OUT.png",
                        help="write a picture of the tokens kept (clear), dropped (dimmed) and merged (outlined) of the first image")
    parser.set_defaults(func=run)


def run(args) -> int:
    import tokenomy
    from tokenomy.errors import InputError

    options = {}
    for item in args.reducer_arg:
        if "=" not in item:
            raise InputError(f"--reducer-arg {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        options[key] = parse_value(value)
    if args.keep is not None:
        options["keep"] = args.keep
    if args.vis and not args.image:
        raise InputError("--vis draws the first image's tokens; give an --image")
    pipeline = tokenomy.load(args.model, reducer=args.reducer, device=args.device, position_policy=args.position_policy, **options)
    images = args.image or None
    (result,) = pipeline.generate([images], [args.prompt], max_new_tokens=args.max_new_tokens)
    if args.vis:
        from tokenomy.vis import draw_selection

        try:
            draw_selection(result).save(args.vis)
        except (OSError, ValueError) as exc:  # PIL: an unwritable path, or an extension it has no format for
            raise InputError(f"--vis {args.vis}: cannot write the picture: {exc}") from exc
    if args.json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "stats": result.stats}))
    else:
        stats = result.stats
        print(result.text)
        print(
            f"[{stats['reducer']}] visual tokens {stats['visual_tokens_in']} -> {stats['visual_tokens_kept']},"
            f" prefill {stats['prefill_tokens']} tokens in {stats['prefill_ms']:.1f} ms,"
            f" decode {stats['new_tokens']} tokens in {stats['decode_ms']:.1f} ms"
        )
        for stage in stats["stages"]:
            layers = f" layers {stage['layers']}" if stage["layers"] else ""
            print(f"  {stage['reducer']} @ {stage['site']}{layers}: {stage['tokens_in']} -> {stage['tokens_out']} tokens,"
                  f" {stage['ms']:.1f} ms")
    return 0
