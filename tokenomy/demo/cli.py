"""`tokenomy demo vlm` and `tokenomy demo gen`: serve a Gradio demo, bound to 127.0.0.1 unless --host says otherwise."""
from __future__ import annotations

from tokenomy.demo.serving import DEFAULT_HOST, DEFAULT_MAX_FILE_SIZE, DEFAULT_PORT


def _serving_options(parser) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to bind (default {DEFAULT_HOST}: this machine only; 0.0.0.0 serves the network)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--max-file-size", default=DEFAULT_MAX_FILE_SIZE,
                        help=f"largest upload accepted, e.g. 20mb or 512kb (default {DEFAULT_MAX_FILE_SIZE})")


def add_parser(subparsers) -> None:
    from tokenomy.demo import gen, vlm

    demo = subparsers.add_parser("demo", help="serve a Gradio demo: vlm (chat with a reducer) or gen (generation playground)")
    which = demo.add_subparsers(dest="demo", metavar="DEMO", required=True)
    chat = which.add_parser("vlm", help="chat about an image or video with a token reducer; shows what it kept")
    chat.add_argument("--model", default=vlm.DEFAULT_MODEL, help="initial model: a built-in name or a local model folder")
    chat.add_argument("--reducer", default=vlm.DEFAULT_REDUCER, help="initial reducer or stacked spec")
    chat.add_argument("--keep", type=int, default=vlm.DEFAULT_KEEP, help="initial budget (visual tokens per image)")
    chat.add_argument("--max-new-tokens", type=int, default=vlm.DEFAULT_MAX_NEW_TOKENS)
    _serving_options(chat)
    chat.set_defaults(func=_run_vlm)
    playground = which.add_parser("gen", help="sample from the shipped generator, watch its decoding order, inpaint, "
                                              "decode an ordered tokenizer coarse to fine")
    _serving_options(playground)
    playground.set_defaults(func=_run_gen)


def _run_vlm(args) -> int:
    from tokenomy.demo import vlm
    from tokenomy.demo.serving import launch, parse_file_size

    max_file_size = parse_file_size(args.max_file_size)
    session = vlm.ChatSession()
    # the initial choice loads now: a bad model or spec fails here, and the first question does not wait for the load
    session.cache.get(args.model, args.reducer, vlm.parse_keep(args.keep))
    app = vlm.build_app(model=args.model, reducer=args.reducer, keep=args.keep, max_new_tokens=args.max_new_tokens,
                        session=session)
    launch(app, host=args.host, port=args.port, max_file_size=max_file_size)
    return 0


def _run_gen(args) -> int:
    from tokenomy.demo import gen
    from tokenomy.demo.serving import launch, parse_file_size

    max_file_size = parse_file_size(args.max_file_size)
    launch(gen.build_app(), host=args.host, port=args.port, max_file_size=max_file_size)
    return 0
