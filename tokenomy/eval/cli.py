"""`tokenomy eval` (lmms-eval style flags) and `tokenomy report`."""
from __future__ import annotations

from pathlib import Path

from tokenomy.errors import InputError
from tokenomy.options import parse_value


def parse_kv(text: str | None) -> dict:
    """`k=v,k2=v2` -> {k: v, k2: v2} with ints, floats and booleans converted."""
    out = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise InputError(f"expected key=value, got {item!r} in {text!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value.strip())
    return out


def parse_list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def parse_limit(text: str | None):
    from tokenomy.eval.runner import check_limit

    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = text
    value = int(value) if isinstance(value, float) and value >= 1 and value.is_integer() else value
    check_limit(value)
    return value


def add_parser(subparsers) -> None:
    ev = subparsers.add_parser("eval", help="evaluate reducers on VQA benchmarks (accuracy + efficiency)",
                               description="Batch evaluation over tasks x reducers x keeps. Results go to "
                                           "OUTPUT_PATH/<model>/<timestamp>_results.json.")
    ev.add_argument("--model", help="built-in name (e.g. tiny-llava) or a local Hugging Face folder")
    ev.add_argument("--model_args", "--model-args", default="", help="k=v,... for tokenomy.load: dtype= (bfloat16, float16, float32, auto), device=, position_policy=")
    ev.add_argument("--reducer", "--reducers", default="none",
                    help="comma list of reducers or stacked specs (vtc-cls:keep=128+fastv); every reducer x keep runs, "
                         "--keep budgeting each spec's last stage; 'list' prints every reducer with its site and options")
    ev.add_argument("--reducer_args", "--reducer-args", "--method-args", default="",
                    help="k=v,... for every reducer but none; NAME.k=v for reducer NAME only (e.g. fastv.layer=3)")
    ev.add_argument("--keep", "--keeps", default="", help="comma list of visual-token budgets entering the LLM")
    ev.add_argument("--tasks", help="comma list of tasks, or 'list' to print them")
    ev.add_argument("--data-dir", "--data_dir", dest="data_dir", help="local folder holding each task's files (not needed by synthvqa, which is generated in memory)")
    ev.add_argument("--batch_size", "--batch-size", type=int, default=1)
    ev.add_argument("--limit", default=None, help="first N usable samples per task (or a fraction in (0, 1)); rows that "
                                                  "cannot be read are listed whatever the limit")
    ev.add_argument("--output_path", "--output-path", default="eval_results")
    ev.add_argument("--log_samples", "--log-samples", action="store_true", help="keep <timestamp>_samples_<task>.jsonl")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_ID",
                    help="continue the newest unfinished run started with the same arguments (--on-error may differ), "
                         "or the run RUN_ID (the <RUN_ID>_results.json stamp); without one, a new run starts")
    ev.add_argument("--on-error", "--on_error", dest="on_error", choices=("skip", "fail"), default="skip",
                    help="a sample that cannot be evaluated, for any reason: skip = list its id and reason in the results and "
                         "go on; fail = stop at once naming it (finished samples stay on disk for --resume)")
    ev.add_argument("--gen_kwargs", "--gen-kwargs", default="", help="k=v,... for generate (e.g. max_new_tokens=16)")
    ev.add_argument("--video_frames", "--video-frames", type=int, default=8, help="frames sampled per video")
    ev.set_defaults(func=run_eval_command)

    rep = subparsers.add_parser("report", help="markdown table and plots from eval results",
                                description="Print a markdown table of every results file under OUTPUT and write "
                                            "an accuracy-vs-kept-tokens PNG per task next to it.")
    rep.add_argument("output", help="the --output_path of one or more eval runs")
    rep.set_defaults(func=run_report_command)


def print_reducers() -> None:
    from tokenomy.reducers.registry import describe

    for row in describe():
        options = ", ".join(f"{key}={value!r}" for key, value in row["options"].items())
        print(f"{row['name']:10s} {row['description']}")
        print(f"{'':10s}   site: {row['site']}; position policy: {row['position_policy']}")
        print(f"{'':10s}   options: {options}")
        print(f"{'':10s}   paper: {row['paper']}")


def run_eval_command(args) -> int:
    from tokenomy.eval import tasks as task_registry

    if (args.reducer or "").strip() == "list":
        print_reducers()
        return 0
    if not args.tasks:
        raise InputError("tokenomy eval needs --tasks (a comma list, or 'list' to print them)")
    if args.tasks.strip() == "list":
        for name in task_registry.available():
            task = task_registry.get(name)
            note = "  [needs an LLM judge API; skipped]" if task.requires_judge else ""
            print(f"{name:16s} {task.description}{note}")
            print(f"{'':16s}   scored as: {task.reference}")
        return 0
    if not args.model:
        raise InputError("tokenomy eval needs --model (and --data-dir for tasks read from files)")
    from tokenomy.eval.runner import EvalConfig, run_eval
    from tokenomy.reducers.plan import split_spec_list

    try:
        keeps = [int(k) for k in parse_list(args.keep)]
    except ValueError as exc:
        raise InputError(f"--keep takes comma-separated integers, got {args.keep!r}") from exc
    config = EvalConfig(
        model=args.model, tasks=parse_list(args.tasks), data_dir=args.data_dir, output_path=args.output_path,
        reducers=split_spec_list(args.reducer or ""), keeps=keeps, model_args=parse_kv(args.model_args),
        reducer_args=parse_kv(args.reducer_args), batch_size=args.batch_size, limit=parse_limit(args.limit),
        log_samples=args.log_samples, seed=args.seed, resume=args.resume, on_error=args.on_error, gen_kwargs=parse_kv(args.gen_kwargs), video_frames=args.video_frames,
    )
    path = run_eval(config)
    print(f"results: {path}")
    return 0


def run_report_command(args) -> int:
    from tokenomy.eval.report import report

    table, plots = report(Path(args.output))
    print(table)
    for path in plots:
        print(f"plot: {path}")
    return 0
