"""GQA testdev-balanced: exact match, in the two conventions papers report.

``gqa`` is the official pipeline LLaVA runs (scripts/v1_5/eval/gqa.sh): haotian-liu/LLaVA
scripts/convert_gqa_for_eval.py line 14 turns the stripped decoded text (model_vqa_loader.py line 116) into
``text.rstrip('.').lower()``, and the official GQA eval.py compares that to the answer as is (``correct =
(predicted == gold)``) over the balanced questions, reporting accuracy and its binary / open split. eval.py is
distributed on gqadataset.org, not in a git repository; the copy read is the one LLaVA's setup produces (with
LLaVA's testdev patch), committed at SHI-Labs/VCoder 4e85acef playground/data/eval/gqa/data/eval/eval.py:
lines 357-374 (balanced questions only; exact match; "open" when the structural type is "query", else
"binary") and 435-437 (mean x 100). Nothing is stripped after the periods go, so "yes ." stays wrong.

``gqa-lmms-eval`` is lmms-eval's ``gqa`` task (EvolvingLMMs-Lab/lmms-eval 75571cfe): lmms_eval/tasks/gqa/gqa.yaml
lines 18-23 (exact_match with ignore_case and ignore_punctuation, mean), i.e. lmms_eval/api/metrics.py
``exact_match_hf_evaluate`` lines 188-220 on the text lmms-eval hands every task (reasoning blocks dropped,
stripped: tokenomy/eval/tasks/lmms_eval_response.py; lmms_eval/api/task.py line 1675 strips again): both sides
lowercased, then every ``string.punctuation`` character deleted anywhere, so "Yes!", "No," and "(red)" count
where the official pipeline marks them wrong, and "t-shirt" equals "tshirt".
"""
from __future__ import annotations

import string
from pathlib import Path

from tokenomy.eval.data import image_ref, read_json
from tokenomy.eval.tasks.base import SHORT_ANSWER, LoadResult, Task, as_str_id, mean_percent
from tokenomy.eval.tasks.lmms_eval_response import lmms_eval_response


def gqa_normalize(text: str) -> str:
    return text.strip().rstrip(".").lower()


_PUNCTUATION_DELETION = str.maketrans("", "", string.punctuation)


def lmms_eval_exact_match_text(text: str) -> str:
    # numpy's fixed-width strings, which exact_match_hf_evaluate compares, drop trailing NUL characters
    return text.lower().translate(_PUNCTUATION_DELETION).rstrip("\x00")


def structural_type(question: dict) -> str:
    """The question's structural type ("query" makes it open, anything else binary); "" when the rows lack it."""
    types = question.get("types")
    return str(types.get("structural") or "") if isinstance(types, dict) else ""


class GQA(Task):
    name = "gqa"
    reference = "LLaVA scripts/convert_gqa_for_eval.py + official GQA eval.py (strip, trailing periods, lowercase; exact)"
    folder = "gqa"
    description = "GQA testdev-balanced: exact match after LLaVA's conversion; accuracy, binary, open (official)"
    matching = "official eval.py"
    official_files = "testdev_balanced_questions.json (dict questionId -> {imageId, question, answer}), images images/<imageId>.jpg"
    row_fields = "question_id|id, question, answer, image|imageId"

    def config(self) -> dict:
        return {**super().config(), "matching": self.matching}

    def read_official(self, root: Path) -> LoadResult | None:
        qfile = root / "testdev_balanced_questions.json"
        if not qfile.is_file():
            return None
        base_dirs = [root / "images", root]
        # eval.py scores only balanced questions (every one of testdev_balanced_questions.json is)
        docs = [{"id": str(qid), "question": q["question"], "answer": q["answer"],
                 "image": image_ref(f"{q['imageId']}.jpg", base_dirs), "origin": str(qfile),
                 "structural": structural_type(q)}
                for qid, q in read_json(qfile).items() if q.get("isBalanced", True)]
        return LoadResult(docs)

    def from_row(self, row: dict, base_dirs: list[Path]) -> dict:
        image = row.get("image")
        if image is None and row.get("imageId") is not None:
            image = f"{row['imageId']}.jpg"
            base_dirs = [base_dirs[-1] / "images", *base_dirs]
        return {"id": as_str_id(row.get("question_id", row.get("id"))), "question": row["question"],
                "answer": str(row["answer"]), "image": image_ref(image, base_dirs), "structural": structural_type(row)}

    def validate(self, doc: dict) -> str | None:
        if not doc["answer"].strip():
            return "empty answer"
        return None if doc["image"] is not None else "no image"

    def prompt(self, doc: dict) -> str:
        return doc["question"] + SHORT_ANSWER

    def target(self, doc: dict):
        return doc["answer"]

    def score(self, doc: dict, prediction: str) -> dict:
        return {"score": float(self.matches(prediction, doc["answer"])), "structural": doc["structural"]}

    def matches(self, prediction: str, answer: str) -> bool:
        return gqa_normalize(prediction) == answer

    def aggregate(self, records: list[dict]) -> dict:
        metrics = {"accuracy": mean_percent([r["score"] for r in records])}
        typed = [r for r in records if r.get("structural")]
        if typed:
            metrics["binary"] = mean_percent([r["score"] for r in typed if r["structural"] != "query"])
            metrics["open"] = mean_percent([r["score"] for r in typed if r["structural"] == "query"])
        return metrics


class GQALmmsEval(GQA):
    name = "gqa-lmms-eval"
    reference = "lmms-eval lmms_eval/tasks/gqa/gqa.yaml exact_match (strip; ignore case and all punctuation)"
    description = "GQA testdev-balanced: exact match ignoring case and punctuation (lmms-eval)"
    matching = "lmms-eval exact_match"

    def matches(self, prediction: str, answer: str) -> bool:
        return lmms_eval_exact_match_text(lmms_eval_response(prediction)) == lmms_eval_exact_match_text(answer)

    def aggregate(self, records: list[dict]) -> dict:
        # gqa.yaml lines 18-21: exact_match is the only metric, its mean the only number
        return {"accuracy": mean_percent([r["score"] for r in records])}
