"""POPE (COCO): yes/no object hallucination over the adversarial, popular and random splits.

``pope`` follows haotian-liu/LLaVA llava/eval/eval_pope.py, the rule papers follow: first sentence, any word
No/not/no -> "no", else "yes"; metrics per split, and the mean over the splits that papers report.
``pope-strict`` follows lmms-eval lmms_eval/tasks/pope/utils.py: the whole lowercased answer must be "yes" or
"no"; its headline metrics pool the three splits (lmms-eval's ``pope`` task, one test split of all 9,000),
and each split's metrics are those of ``pope_adv`` / ``pope_pop`` / ``pope_random``. Positive class is "yes".
Like every lmms-eval task it reads the answer after lmms-eval's reasoning-block removal (lmms_eval_response.py).
"""
from __future__ import annotations

from pathlib import Path

from tokenomy.eval.data import SampleError, image_ref, read_jsonl
from tokenomy.eval.tasks.base import SHORT_ANSWER, LoadResult, Task, as_str_id
from tokenomy.eval.tasks.lmms_eval_response import lmms_eval_response

SPLITS = ("adversarial", "popular", "random")


def pope_parse_llava(text: str) -> str:
    """haotian-liu/LLaVA llava/eval/eval_pope.py lines 11-20, on the stripped decoded text (model_vqa_loader.py:116)."""
    text = text.strip()
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_parse_strict(text: str) -> str:
    """lmms-eval lmms_eval/tasks/pope/utils.py line 18: the whole answer, lowercased and stripped."""
    return text.lower().strip()


def binary_metrics(pairs: list[tuple[str, str]]) -> dict:
    """LLaVA eval_pope.py lines 28-61: pairs of (parsed prediction, label); every non-"no" prediction is yes."""
    tp = sum(p != "no" and g == "yes" for p, g in pairs)
    fp = sum(p != "no" and g == "no" for p, g in pairs)
    tn = sum(p == "no" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    n = len(pairs)
    return {"accuracy": 100.0 * (tp + tn) / n if n else 0.0, **_precision_recall_f1(tp, fp, fn),
            "yes_ratio": 100.0 * sum(p != "no" for p, _ in pairs) / n if n else 0.0,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": n}


def _precision_recall_f1(tp: int, fp: int, fn: int) -> dict:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": 100.0 * precision, "recall": 100.0 * recall, "f1": 100.0 * f1}


def lmms_eval_metrics(pairs: list[tuple[str, str]]) -> dict:
    """lmms-eval pope/utils.py lines 31-84 on (prediction, ground truth) pairs of one task.

    Only an exact "yes" is a positive and only an exact "no" a false negative (an unparsed answer to a yes
    question counts in neither recall term); the yes-ratio is the share of ground-truth yes.
    """
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    n = len(pairs)
    return {"accuracy": 100.0 * sum(p == g for p, g in pairs) / n if n else 0.0, **_precision_recall_f1(tp, fp, fn),
            "yes_ratio": 100.0 * sum(g == "yes" for _, g in pairs) / n if n else 0.0, "n": n}


class POPE(Task):
    name = "pope"
    reference = "LLaVA llava/eval/eval_pope.py (per split; mean over splits)"
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
        parsed = pope_parse_strict(lmms_eval_response(prediction)) if self.strict else pope_parse_llava(prediction)
        return {"score": float(parsed == doc["label"]), "parsed": parsed, "label": doc["label"], "split": doc["split"]}

    def aggregate(self, records: list[dict]) -> dict:
        metrics = lmms_eval_metrics if self.strict else binary_metrics
        splits = sorted({r["split"] for r in records})
        per_split = {s: metrics([(r["parsed"], r["label"]) for r in records if r["split"] == s]) for s in splits}
        keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
        if self.strict:
            pooled = metrics([(r["parsed"], r["label"]) for r in records])
            return {**{k: pooled[k] for k in keys}, **per_split}
        means = {k: sum(per_split[s][k] for s in splits) / len(splits) if splits else 0.0 for k in keys}
        return {**means, **per_split}


class POPEStrict(POPE):
    name = "pope-strict"
    reference = "lmms-eval lmms_eval/tasks/pope/utils.py (exact yes/no; splits pooled)"
    description = "POPE with lmms-eval's verbatim yes/no comparison and metrics, splits pooled"
    strict = True
