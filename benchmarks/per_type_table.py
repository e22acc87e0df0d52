"""Per question type accuracy with standard errors, from the samples of `tokenomy eval --tasks synthvqa --log_samples`.

    python benchmarks/per_type_table.py OUTPUT_PATH [--first-word]

Prints one markdown row per (model, reducer, keep): overall and per type accuracy, each as `mean ± standard error`
(binomial, sqrt(p(1-p)/n), n the questions of that type). `--first-word` adds a column that counts an answer right when it
starts with the right word, for models that answer and then fail to stop, running words together ("orangenonoorange");
the benchmark itself scores the whole answer.
"""
from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

from tokenomy.eval.synthvqa import QUESTION_TYPES, normalize_answer


def cell(scores: list) -> str:
    if not scores:
        return "-"
    p = sum(scores) / len(scores)
    return f"{100 * p:.1f} ± {100 * math.sqrt(p * (1 - p) / len(scores)):.1f}"


def first_word_right(record: dict) -> float:
    words = normalize_answer(record["prediction"]).split()
    targets = {normalize_answer(t) for t in record["target"]}
    return float(bool(words) and any(words[0] == t or (t and words[0].startswith(t)) for t in targets))


def rows(output: Path) -> list:
    found = []
    for samples in sorted(output.rglob("*_samples_synthvqa.jsonl")):
        model = samples.parent.name
        groups = defaultdict(list)
        for line in samples.read_text().splitlines():
            record = json.loads(line)
            if "error" not in record:
                groups[(record["reducer"], record["keep"])].append(record)
        for (reducer, keep), records in groups.items():
            found.append((model, reducer, keep, records))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output")
    parser.add_argument("--first-word", action="store_true")
    args = parser.parse_args()
    header = ["model", "reducer", "keep", "n", "overall", *QUESTION_TYPES] + (["first word right"] if args.first_word else [])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for model, reducer, keep, records in rows(Path(args.output)):
        per_type = [cell([r["score"] for r in records if r["type"] == kind]) for kind in QUESTION_TYPES]
        extra = [cell([first_word_right(r) for r in records])] if args.first_word else []
        print("| " + " | ".join([model, reducer, "all" if keep is None else str(keep), str(len(records)),
                                 cell([r["score"] for r in records]), *per_type, *extra]) + " |")


if __name__ == "__main__":
    main()
