"""`tokenomy eval`: every task x reducer x keep, scored by the reference rules, with an efficiency block.

Read top to bottom: `run_eval` opens (or resumes) a run, `_run_task` loads a task's docs once and walks the
reducer x keep sweep, `_run_combo` evaluates this rank's pending samples chunk by chunk, journaling each chunk,
and rank 0 merges the gathered records into the samples file and recomputes that combination's metrics from
all of its records (so a resumed or multi-process run aggregates exactly like a single uninterrupted one).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
import numpy as np
import torch
from tqdm.auto import tqdm

from tokenomy.errors import InputError, TokenomyError, UnknownNameError
from tokenomy.eval import oracles
from tokenomy.eval import tasks as task_registry
from tokenomy.eval.distributed import Group
from tokenomy.eval.efficiency import FLOPS_FORMULA, Timer, aggregate_efficiency, peak_memory, reset_peak_memory, sample_efficiency
from tokenomy.eval.store import RESULTS_SUFFIX, RunStore, read_results, record_key
from tokenomy.eval.tasks.base import Task
from tokenomy.reducers.plan import parse_spec

ON_ERROR_POLICIES = ("skip", "fail")
NO_REDUCTION = "none"
MODEL_ARGS = ("dtype", "device", "position_policy")  # the options of tokenomy.load that are not the reducer's
# Options that decide what happens at a bad sample, not the numbers of a good one: a resumed run may change them.
MAY_CHANGE_ON_RESUME = ("on_error",)


@dataclass
class EvalConfig:
    """Everything that determines the numbers of a run (resume refuses a run started with different values)."""

    model: str
    tasks: list[str]
    data_dir: str | None  # None when every task is generated in memory (synthvqa)
    output_path: str
    reducers: list[str] = field(default_factory=lambda: [NO_REDUCTION])
    keeps: list[int] = field(default_factory=list)
    model_args: dict = field(default_factory=dict)
    reducer_args: dict = field(default_factory=dict)
    batch_size: int = 1
    limit: float | None = None
    log_samples: bool = False
    seed: int = 0
    resume: bool | str = False  # True: the newest unfinished run with the same arguments; a string: that run's id
    on_error: str = "skip"
    gen_kwargs: dict = field(default_factory=dict)
    video_frames: int = 8

    def identity(self) -> dict:
        data = asdict(self)
        for volatile in ("resume", "output_path"):
            data.pop(volatile)
        data["data_dir"] = str(Path(self.data_dir).resolve()) if self.data_dir else None
        return json.loads(json.dumps(data))

    def combos(self) -> list[tuple[str, int | None]]:
        """Reducer x keep; the unpruned `none` baseline, and reducers budgeted by their own options (seats' video= and
        audio= retention), run once whatever the keeps."""
        out = []
        for reducer in self.reducers:
            for keep in self.keeps if takes_keep(reducer) else [None]:
                if (reducer, keep) not in out:
                    out.append((reducer, keep))
        return out


def takes_keep(reducer: str) -> bool:
    """Whether --keep budgets this reducer spec (its last stage's `keep`)."""
    from tokenomy.reducers import build_plan

    if oracles.is_diagnostic(reducer):
        return True
    return reducer != NO_REDUCTION and build_plan(reducer).last.applies_budget


def reducer_options(config: EvalConfig, reducer: str, keep: int | None) -> dict:
    """`--reducer_args`: `key=v` goes to every stage that accepts it (never to `none`), `name.key=v` only to the stages
    called `name`; `keep` is the last stage's budget (tokenomy.reducers.build_plan routes them)."""
    if reducer == NO_REDUCTION:
        return {}
    return {**config.reducer_args, **({"keep": keep} if keep is not None else {})}


def reduction_plan(reducer: str, options: dict):
    """The Plan of one spec of the sweep: an oracle diagnostic's own, or the registry's."""
    if oracles.is_diagnostic(reducer):
        return oracles.plan(reducer, **options)
    from tokenomy.reducers import build_plan

    return build_plan(reducer, **options)


def keep_label(keep: int | None) -> str:
    return "all" if keep is None else str(keep)


def sanitize_model_name(model: str) -> str:
    """The output sub-folder: a built-in name as it is, a model folder by its own name (/models/llava-1.5-7b-hf ->
    llava-1.5-7b-hf); runs of two folders with the same name share it and are told apart by their config."""
    path = Path(model.strip()).expanduser()
    return (path.name if path.name not in ("", ".", "..") else path.resolve().name) or "model"


def check_limit(limit) -> None:
    """--limit N keeps the first N usable samples of each task, a fraction in (0, 1) that share of them."""
    fraction = isinstance(limit, float) and 0 < limit < 1
    whole = isinstance(limit, (int, float)) and not isinstance(limit, bool) and math.isfinite(limit) and limit >= 1 \
        and float(limit).is_integer()
    if limit is not None and not (fraction or whole):
        raise InputError(f"--limit takes a positive whole number of samples or a fraction in (0, 1), got {limit!r}")


def apply_limit(docs: list, limit: float | None) -> list:
    if limit is None:
        return docs
    check_limit(limit)
    count = math.ceil(limit * len(docs)) if 0 < limit < 1 else int(limit)
    return docs[:count]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def report_problem(message: str) -> None:
    tqdm.write(f"tokenomy eval: {message}", file=sys.stderr)


def run_eval(config: EvalConfig) -> Path:
    """Run (or resume) an evaluation; returns the results file."""
    _check_config(config)
    group = Group()
    try:
        return _run(config, group)
    finally:
        group.close()


class Pipelines:
    """The model is built once per run; every reducer x keep gets its own Pipeline over the same weights."""

    def __init__(self, config: EvalConfig, group: Group):
        self.config = config
        self.model_args = dict(config.model_args)
        self.device = self.model_args.pop("device", None) or group.default_device()
        self.first = None
        self.built = {}

    def check_all(self) -> None:
        """Build every combo's Pipeline before the first sample, so a plan the model cannot run (a merge its encoder
        cannot take, a layer it does not have) fails the run at start, not after hours of other combos."""
        for reducer, keep in self.config.combos():
            self.get(reducer, keep)

    def get(self, reducer: str, keep: int | None):
        if (reducer, keep) not in self.built:
            self.built[reducer, keep] = self._build(reducer, keep)
        return self.built[reducer, keep]

    def _build(self, reducer: str, keep: int | None):
        plan = reduction_plan(reducer, reducer_options(self.config, reducer, keep))
        if self.first is None:
            from tokenomy import load

            self.first = load(self.config.model, reducer=plan, device=self.device, **self.model_args)
            return self.first
        return type(self.first)(self.first.model, self.first.processor, plan, name=self.first.name,
                                position_policy=self.model_args.get("position_policy"))


def _check_config(config: EvalConfig) -> None:
    if config.on_error not in ON_ERROR_POLICIES:
        raise InputError(f"--on-error must be one of {', '.join(ON_ERROR_POLICIES)}, got {config.on_error!r}")
    for name in config.tasks:
        task_registry.get(name)
    from tokenomy.reducers import available as available_reducers

    names = [name for spec in config.reducers for name, _ in parse_spec(spec)]  # malformed specs fail here
    unknown = [name for name in names if name not in available_reducers() and name not in oracles.DIAGNOSTICS]
    if unknown:  # before any data is read or model built
        raise UnknownNameError("reducer", unknown[0], available_reducers() + sorted(oracles.DIAGNOSTICS))
    diagnostics = [name for name in names if name in oracles.DIAGNOSTICS]
    blind = [name for name in config.tasks if not task_registry.get(name).gives_reducer_context]
    if diagnostics and blind:
        raise InputError(f"--reducers {diagnostics[0]} is a diagnostic that needs each sample's scene description, which "
                         f"only synthvqa provides; task {blind[0]} has none (run the oracles with --tasks synthvqa alone)")
    if any(takes_keep(r) for r in config.reducers) and not config.keeps:
        raise InputError("reducers other than 'none' need --keep (visual tokens entering the LLM), e.g. --keep 192,64 "
                         "(seats takes its budgets as --reducer_args seats.video=0.3,seats.audio=0.65 instead)")
    if config.batch_size < 1:
        raise InputError(f"--batch_size must be >= 1, got {config.batch_size}")
    check_limit(config.limit)
    _check_options(config)
    reading = [name for name in config.tasks if task_registry.get(name).reads_files]
    if reading and not config.data_dir:
        raise InputError(f"task {reading[0]} reads its files from --data-dir; give the folder that holds them")
    if config.data_dir and not Path(config.data_dir).exists():
        raise InputError(f"--data-dir {config.data_dir} does not exist")


def _check_options(config: EvalConfig) -> None:
    """Every option is checked here, before any data is read or the model is built (which takes seconds to minutes)."""
    from tokenomy.vlm.loading import resolve_dtype

    unknown = sorted(set(config.model_args) - set(MODEL_ARGS))
    if unknown:
        raise InputError(f"--model_args {unknown[0]} is not an option of tokenomy.load (known: {', '.join(MODEL_ARGS)}); "
                         "reducer options go in --reducer_args, generation options in --gen_kwargs")
    resolve_dtype(config.model_args.get("dtype"))
    from transformers import GenerationConfig

    defaults = GenerationConfig()
    unknown = sorted(k for k in config.gen_kwargs if not hasattr(defaults, k))
    if unknown:
        raise InputError(f"--gen_kwargs {unknown[0]} is not a generation option of transformers' generate")
    stage_names = {name for spec in config.reducers for name, _ in parse_spec(spec)}
    stray = sorted(k for k in config.reducer_args if "." in k and k.split(".", 1)[0] not in stage_names)
    if stray:
        raise InputError(f"--reducer_args {stray[0]} names reducer {stray[0].split('.', 1)[0]!r}, which is not in "
                         f"--reducer {','.join(config.reducers)}")
    for reducer, keep in config.combos():  # unknown options and impossible stage orders
        reduction_plan(reducer, reducer_options(config, reducer, keep))


def _differences(previous: dict, config: EvalConfig) -> list[str]:
    mine = config.identity()
    return sorted(k for k in set(previous) | set(mine) if k not in MAY_CHANGE_ON_RESUME and previous.get(k) != mine.get(k))


def _find_run(config: EvalConfig, folder: Path) -> tuple[str, dict] | None:
    """The unfinished run to continue: the one named by --resume RUN_ID, or the newest with the same arguments."""
    if isinstance(config.resume, str):
        stamp = Path(config.resume).name.removesuffix(RESULTS_SUFFIX)
        path = folder / f"{stamp}{RESULTS_SUFFIX}"
        if not path.is_file():
            unfinished = [s for s, _ in RunStore.incomplete_runs(folder)]
            raise InputError(f"--resume {config.resume}: no run {stamp} in {folder}; unfinished runs there: "
                             f"{', '.join(unfinished) or 'none'}")
        results = read_results(path)
        if results.get("complete", False):
            raise InputError(f"--resume {stamp}: that run in {folder} finished; start a new run without --resume")
        differences = _differences(results.get("config", {}), config)
        if differences:
            raise InputError(f"--resume {stamp}: that run used different {', '.join(differences)} (see the config in "
                             f"{path}); repeat its arguments")
        return stamp, results
    others = []
    for stamp, results in RunStore.incomplete_runs(folder):
        differences = _differences(results.get("config", {}), config)
        if not differences:
            return stamp, results
        others.append(f"{stamp} (different {', '.join(differences)})")
    note = f"; unfinished runs with other arguments: {'; '.join(others)}" if others else ""
    print(f"tokenomy eval: --resume found no unfinished run with these arguments in {folder}{note}; starting a new one",
          file=sys.stderr)
    return None


def _open_run(config: EvalConfig, folder: Path) -> tuple[str, dict, bool]:
    """(stamp, results, resumed)."""
    found = _find_run(config, folder) if config.resume else None
    if found is not None:
        stamp, results = found
        print(f"tokenomy eval: resuming run {stamp} in {folder}", file=sys.stderr)
        results["config"] = config.identity()  # --on-error may have changed
        return stamp, results, True
    import transformers

    from tokenomy import __version__

    results = {
        "results": {},
        "config": config.identity(),
        "task_configs": {},
        "skipped_tasks": {},
        "flops_formula": FLOPS_FORMULA,
        "versions": {"tokenomy": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": False,
    }
    return RunStore.new_stamp(folder), results, False


def _run(config: EvalConfig, group: Group) -> Path:
    folder = Path(config.output_path) / sanitize_model_name(config.model)
    opened: tuple | str = ""
    if group.is_main:
        try:
            opened = _open_run(config, folder)
        except TokenomyError as exc:
            opened = str(exc)
    opened = group.broadcast(opened)
    if isinstance(opened, str):
        raise InputError(opened)
    stamp, results, resumed = opened
    store = RunStore(folder, stamp)
    pipelines = Pipelines(config, group)
    results.update(world_size=group.world, device=str(config.model_args.get("device") or group.default_device()))
    if group.is_main:
        store.write_results(results)
    try:
        pipelines.check_all()
        _run_tasks(config, pipelines, group, store, results)
    except BaseException:
        if group.is_main and not resumed and not results["results"] and not store.has_samples():
            # Failed at start-up (model, data): nothing to resume, so no unfinished run is left behind.
            store.results_path.unlink(missing_ok=True)
        raise
    return store.results_path


def _run_tasks(config: EvalConfig, pipelines: Pipelines, group: Group, store: RunStore, results: dict) -> None:
    for name in config.tasks:
        task = task_registry.get(name)
        if task.requires_judge:
            results["skipped_tasks"][name] = "needs an LLM judge API (not configured); static scoring: use 'mmbench'"
            if group.is_main:
                report_problem(f"skipping task {name}: {results['skipped_tasks'][name]}")
            continue
        if hasattr(task, "n_frames"):
            task.n_frames = config.video_frames
        _run_task(config, task, pipelines, group, store, results)
    if group.is_main:
        results["complete"] = True
        store.write_results(results)
        if not config.log_samples:
            for name in config.tasks:
                store.remove_samples(name)
    group.barrier()


def _run_task(config: EvalConfig, task: Task, pipelines: Pipelines, group: Group, store: RunStore, results: dict) -> None:
    loaded = task.load(Path(config.data_dir) if config.data_dir else None)
    docs = apply_limit(loaded.docs, config.limit)
    load_errors = [{"id": e.id, "message": e.message, "source": e.source} for e in loaded.errors]
    if loaded.errors:
        if config.on_error == "fail":
            raise InputError(f"task {task.name}: {len(loaded.errors)} bad sample(s): " + "; ".join(map(str, loaded.errors[:5])))
        if group.is_main:
            for error in loaded.errors:
                report_problem(f"{task.name}: skipped {error}")
    if not docs:
        raise InputError(f"task {task.name}: no usable samples in {config.data_dir}")
    results["task_configs"][task.name] = task.config()
    if any(task.video(doc) is not None for doc in docs):
        results["task_configs"][task.name]["video_input"] = video_input(pipelines.get(*config.combos()[0]))
    if group.is_main:
        store.consolidate(task.name)
    group.barrier()
    finished = store.finished_records(task.name)
    changed = [r["id"] for r in finished if r["doc_index"] >= len(docs) or docs[r["doc_index"]]["id"] != r["id"]]
    if changed:
        raise InputError(f"--resume: the {task.name} data changed since the run started (sample {changed[0]} moved "
                         "or vanished); start a new run")
    done_keys = {record_key(r) for r in finished}
    for reducer, keep in config.combos():
        pending = [i for i in group.shard(list(range(len(docs)))) if (reducer, keep, i) not in done_keys]
        new_records = _run_combo(config, task, docs, pending, reducer, keep, pipelines, group, store)
        gathered = group.gather(new_records)
        if group.is_main:
            merged = sorted((r for part in gathered for r in part), key=lambda r: r["doc_index"])
            store.commit(task.name, merged)
        group.barrier()
        store.clear_journal(task.name, group.rank)
        if group.is_main:
            records = [r for r in finished if (r["reducer"], r["keep"]) == (reducer, keep)] + merged
            summary = summarize(task, records, load_errors, len(docs))
            if records and not summary["n-samples"]["scored"]:
                report_problem(f"{task.name} {reducer}@{keep_label(keep)}: every sample failed, e.g. "
                               f"{summary['errors'][-1]['id']}: {summary['errors'][-1]['message']}")
            results["results"].setdefault(task.name, {}).setdefault(reducer, {})[keep_label(keep)] = summary
            store.write_results(results)


def summarize(task: Task, records: list[dict], load_errors: list[dict], n_docs: int) -> dict:
    scored = sorted((r for r in records if "error" not in r), key=lambda r: r["doc_index"])
    failed = sorted((r for r in records if "error" in r), key=lambda r: r["doc_index"])
    return {
        "metrics": task.aggregate(scored),
        "efficiency": aggregate_efficiency(scored),
        # selected = scored + skipped: rows unusable at load count as selected and skipped whatever --limit says
        "n-samples": {"selected": n_docs + len(load_errors), "scored": len(scored), "skipped": len(failed) + len(load_errors)},
        "errors": load_errors + [{"id": r["id"], "message": r["error"]} for r in failed],
    }


def _run_combo(config, task, docs, pending, reducer, keep, pipelines, group, store) -> list[dict]:
    if not pending:
        return []
    pipeline = pipelines.get(reducer, keep)
    gen_kwargs = {"max_new_tokens": task.max_new_tokens, "do_sample": False, **config.gen_kwargs}
    chunks = [pending[i:i + config.batch_size] for i in range(0, len(pending), config.batch_size)]
    _warm_up(task, docs, chunks[0], reducer, pipeline, gen_kwargs)
    reset_peak_memory(pipeline.device)
    records = []
    bar = tqdm(total=len(pending), desc=f"{task.name} {reducer}@{keep_label(keep)}", unit="sample",
               disable=not group.is_main, dynamic_ncols=True)
    for chunk in chunks:
        # Seeded by the chunk's first sample, so a resumed or sharded run draws what the full run drew.
        seed_everything(config.seed * 1_000_003 + chunk[0])
        chunk_records = _run_chunk(config, task, docs, chunk, reducer, keep, pipeline, gen_kwargs)
        store.journal(task.name, group.rank, chunk_records)
        records += chunk_records
        bar.update(len(chunk))
    bar.close()
    return records


def _warm_up(task, docs, chunk, reducer, pipeline, gen_kwargs) -> None:
    """One untimed call so that lazy initialisation and kernel selection stay out of the measurements."""
    try:
        images, video = task.inputs(docs[chunk[0]], pipeline.adapter.supports_video)
        pipeline.generate([images], [task.prompt(docs[chunk[0]])], videos=[video], **{**gen_kwargs, "max_new_tokens": 2},
                          **sample_contexts(task, docs, [chunk[0]], reducer))
    except Exception:
        pass  # a bad first sample is reported when its chunk runs


def video_input(pipeline) -> str:
    """How a task's videos reach this model (Task.inputs), for the results file."""
    if not pipeline.adapter.supports_video:
        return "frames as images"
    return "video with its audio track" if pipeline.adapter.reads_audio else "video"


def _run_chunk(config, task, docs, chunk, reducer, keep, pipeline, gen_kwargs) -> list[dict]:
    base = lambda i: {"reducer": reducer, "keep": keep, "doc_index": i, "id": docs[i]["id"],
                      "chunk_start": chunk[0], "chunk_len": len(chunk)}
    records, ready = [], []
    for i in chunk:
        try:
            ready.append((i, task.prompt(docs[i]), task.inputs(docs[i], pipeline.adapter.supports_video)))
        except Exception as exc:  # whatever library raised it, the failure is this sample's alone
            records.append({**base(i), "error": _fail_or_describe(config, task, docs[i], exc)})
    batches = [ready] if ready else []
    while batches:
        batch = batches.pop(0)
        try:
            contexts = sample_contexts(task, docs, [i for i, _, _ in batch], reducer)
            with Timer(pipeline.device) as timer:
                generations = pipeline.generate([images for _, _, (images, _) in batch], [p for _, p, _ in batch],
                                                videos=[video for _, _, (_, video) in batch], **gen_kwargs, **contexts)
        except Exception as exc:
            if len(batch) > 1:
                batches = [[item] for item in batch] + batches  # isolate the culprit, to name it and keep the others
            else:
                records.append({**base(batch[0][0]), "error": _fail_or_describe(config, task, docs[batch[0][0]], exc)})
            continue
        records += _sample_records(config, task, docs, batch, generations, timer.ms, pipeline, base)
    return sorted(records, key=lambda r: r["doc_index"])


def sample_contexts(task, docs, indices, reducer) -> dict:
    """An oracle diagnostic's extra generate argument: each sample's description, as the task gives it."""
    if not oracles.is_diagnostic(reducer):
        return {}
    return {"contexts": [task.reducer_context(docs[i]) for i in indices]}


def _fail_or_describe(config, task, doc, exc) -> str:
    message = f"{type(exc).__name__}: {exc}"
    if config.on_error == "fail":
        raise InputError(f"task {task.name}: sample {doc['id']}: {message} (use --on-error skip to skip bad samples)") from exc
    report_problem(f"{task.name}: skipped sample {doc['id']}: {message}")
    return message


def _sample_records(config, task, docs, batch, generations, e2e_ms, pipeline, base) -> list[dict]:
    stats0 = generations[0].stats
    peak_mb, peak_kind = peak_memory(pipeline.device)
    batch_fields = {
        "batch_size": len(batch),
        "batch_prefill_ms": float(stats0["prefill_ms"]),
        "batch_decode_ms": float(stats0["decode_ms"]),
        # the first new token comes out of prefill; every further token is one decode step
        "batch_decode_steps": max(max(int(g.stats.get("new_tokens", len(g.token_ids))) for g in generations) - 1, 0),
        "batch_e2e_ms": e2e_ms,
        "peak_memory_mb": peak_mb,
        "peak_memory_kind": peak_kind,
    }
    out = []
    for (i, prompt, _), generation in zip(batch, generations):
        try:
            scored = {"target": task.target(docs[i]), **task.score(docs[i], generation.text)}
        except Exception as exc:
            out.append({**base(i), "error": _fail_or_describe(config, task, docs[i], exc)})
            continue
        record = {**base(i), "prompt": prompt, "prediction": generation.text, **scored,
                  **sample_efficiency(generation.stats, pipeline.text_config), **batch_fields}
        if config.log_samples and "kept_indices" in generation.stats:
            record["kept_indices"] = generation.stats["kept_indices"]
        out.append(record)
    return out
