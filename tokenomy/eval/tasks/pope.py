"""POPE (COCO): yes/no object hallucination over the adversarial, popular and random splits.

Default parsing is LLaVA's `eval_pope.py` (first sentence, any of No/not/no -> "no", else "yes"), the rule the
papers follow; `pope-strict` is lmms-eval's verbatim comparison. Positive class is "yes".
"""
from __future__ import annotations

from pathlib import Path

from tokenomy.eval.data import SampleError, image_ref, read_jsonl
from tokenomy.eval.tasks.base import SHORT_ANSWER, LoadResult, Task, as_str_id

SPLITS = ("adversarial", "popular", "random")


def pope_parse_llava(text: str) -> str:
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_parse_strict(text: str) -> str:
    return text.strip().lower()


def binary_metrics(pairs: list[tuple[str, str]]) -> dict:
    """pairs of (prediction, label) in {yes, no, other}; 'yes' is the positive class."""
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    tn = sum(p != "yes" and g == "no" for p, g in pairs)
    fn = sum(p != "yes" and g == "yes" for p, g in pairs)
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    correct = sum(p == g for p, g in pairs)
    return {"accuracy": 100.0 * correct / n if n else 0.0, "precision": 100.0 * precision, "recall": 100.0 * recall,
            "f1": 100.0 * f1, "yes_ratio": 100.0 * sum(p == "yes" for p, _ in pairs) / n if n else 0.0,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n}


class POPE(Task):
    name = "pope"
    folder = "pope"
    description = "POPE adversarial/popular/random: acc, precision, recall, F1, yes-ratio per split + mean (LLaVA parsing)"
    official_files = "coco_pope_{adversarial,popular,random}.json (JSON lines {question_id, image, text, label}), images val2014/<image>"
    row_fields = "question_id, question, answer, category, image"
    primary_metric = "f1"
    strict = False

    def config(self) -> dict:
        return {**super().config(), "parsing": "strict" if self.strict else "llava"}

    def read_official(self, root: Path) -> LoadResult | None:
        files = [(s, root / f"coco_pope_{s}.json") for s in SPLITS]
        if not any(f.is_file() for _, f in files):
            return None
        docs, errors = [], []
        base_dirs = [root / "val2014", root / "images", root]
        for split, path in files:
            if not path.is_file():
                errors.append(SampleError(f"{split}/*", f"split file missing: {path}", str(root)))
                continue
            rows, bad = read_jsonl(path)
            errors += [SampleError(f"{split}/{e.id}", e.message, e.source) for e in bad]
            for line_no, row in rows:
                self.add_doc(docs, errors, {**row, "category": split}, f"{path}:{line_no}", base_dirs)
        return LoadResult(docs, errors)

    def from_row(self, row: dict, base_dirs: list[Path]) -> dict:
        split = row["category"]
        return {"id": f"{split}/{as_str_id(row['question_id'])}", "split": split,
                "question": row.get("text", row.get("question")), "label": str(row.get("label", row.get("answer"))).strip().lower(),
                "image": image_ref(row.get("image", row.get("image_source")), base_dirs)}

    def validate(self, doc: dict) -> str | None:
        if doc["label"] not in ("yes", "no"):
            return f"label must be yes or no, got {doc['label']!r}"
        if not doc["question"]:
            return "empty question"
        return None if doc["image"] is not None else "no image"

    def prompt(self, doc: dict) -> str:
        return doc["question"] + SHORT_ANSWER

    def target(self, doc: dict):
        return doc["label"]

    def score(self, doc: dict, prediction: str) -> dict:
        parsed = pope_parse_strict(prediction) if self.strict else pope_parse_llava(prediction)
        return {"score": float(parsed == doc["label"]), "parsed": parsed, "label": doc["label"], "split": doc["split"]}

    def aggregate(self, records: list[dict]) -> dict:
        splits = sorted({r["split"] for r in records})
        per_split = {s: binary_metrics([(r["parsed"], r["label"]) for r in records if r["split"] == s]) for s in splits}
        means = {key: sum(per_split[s][key] for s in splits) / len(splits) if splits else 0.0
                 for key in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
        return {**means, **per_split}


class POPEStrict(POPE):
    name = "pope-strict"
    description = "POPE with lmms-eval's verbatim yes/no comparison"
    strict = True
