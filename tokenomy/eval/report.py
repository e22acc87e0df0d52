"""`tokenomy report O`: one markdown table for every results file under O, and an accuracy-vs-tokens plot per task."""
from __future__ import annotations

from pathlib import Path

from tokenomy.errors import InputError
from tokenomy.eval.store import RESULTS_SUFFIX, read_results

COLUMNS = ("model", "run", "task", "reducer", "keep", "metric", "score", "% of none", "tokens in", "kept",
           "layer-avg kept", "prefill TFLOPs", "prefill ms", "decode ms/tok", "n")


def collect_rows(root: Path) -> list[dict]:
    files = sorted(Path(root).rglob(f"*{RESULTS_SUFFIX}"))
    if not files:
        raise InputError(f"no *{RESULTS_SUFFIX} files under {root}; run `tokenomy eval --output_path {root}` first")
    rows = []
    for path in files:
        data = read_results(path)
        try:
            rows += _rows_of(path, data)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path} is not a tokenomy eval results file: {type(exc).__name__}: {exc}") from exc
    return rows


def _rows_of(path: Path, data: dict) -> list[dict]:
    # A run that did not finish (killed, stopped by --on-error fail) shows its partial numbers, marked as such.
    run = path.name[: -len(RESULTS_SUFFIX)] + ("" if data.get("complete", False) else " (unfinished)")
    rows = []
    for task, by_reducer in data["results"].items():
        metric = data.get("task_configs", {}).get(task, {}).get("primary_metric", "accuracy")
        baseline = by_reducer.get("none", {}).get("all", {}).get("metrics", {}).get(metric)
        for reducer, by_keep in by_reducer.items():
            for keep, entry in by_keep.items():
                eff = entry.get("efficiency", {})
                score = entry["metrics"].get(metric)
                rows.append({
                    "model": path.parent.name, "run": run, "task": task, "reducer": reducer, "keep": keep,
                    "metric": metric, "score": score,
                    "% of none": 100.0 * score / baseline if baseline and score is not None else None,
                    "tokens in": eff.get("visual_tokens_in"), "kept": eff.get("visual_tokens_kept"),
                    "layer-avg kept": eff.get("equivalent_visual_tokens"), "prefill TFLOPs": eff.get("prefill_tflops"),
                    "prefill ms": eff.get("prefill_ms"), "decode ms/tok": eff.get("decode_ms_per_token"),
                    "n": entry.get("n-samples", {}).get("scored"), "results_file": path,
                })
    return rows


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value and abs(value) < 0.01:
            return f"{value:.3g}"
        return f"{value:.2f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def plot_task(rows: list[dict], path: Path) -> Path:
    """Score against layer-averaged kept visual tokens, one curve per reducer; `none` as a dashed reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for reducer in sorted({r["reducer"] for r in rows}):
        points = sorted((r["layer-avg kept"], r["score"]) for r in rows if r["reducer"] == reducer and r["score"] is not None)
        if not points:
            continue
        if reducer == "none":
            ax.axhline(points[0][1], linestyle="--", color="gray", label="none (unpruned)")
        else:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=reducer)
    first = rows[0]
    ax.set_xlabel("visual tokens kept (layer-averaged)")
    ax.set_ylabel(first["metric"])
    ax.set_title(f"{first['task']} — {first['model']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(root: Path) -> tuple[str, list[Path]]:
    rows = collect_rows(root)
    plots = []
    for results_file in sorted({r["results_file"] for r in rows}):
        run_rows = [r for r in rows if r["results_file"] == results_file]
        run = results_file.name[: -len(RESULTS_SUFFIX)]
        for task in sorted({r["task"] for r in run_rows}):
            task_rows = [r for r in run_rows if r["task"] == task]
            plots.append(plot_task(task_rows, results_file.with_name(f"{run}_plot_{task}.png")))
    return markdown_table(rows), plots
