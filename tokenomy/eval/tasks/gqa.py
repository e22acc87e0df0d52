"""GQA testdev-balanced: exact match after LLaVA's conversion.

haotian-liu/LLaVA scripts/convert_gqa_for_eval.py line 14 turns the stripped decoded text (model_vqa_loader.py
line 116) into ``text.rstrip('.').lower()``; the official GQA eval.py then compares it to the answer as is.
Nothing is stripped after the periods go, so "yes ." stays wrong.
"""
from __future__ import annotations

from pathlib import Path

from tokenomy.eval.data import image_ref, read_json
from tokenomy.eval.tasks.base import SHORT_ANSWER, LoadResult, Task, as_str_id, mean_percent


def gqa_normalize(text: str) -> str:
    return text.strip().rstrip(".").lower()


class GQA(Task):
    name = "gqa"
    reference = "LLaVA scripts/convert_gqa_for_eval.py + official GQA eval.py (exact match)"
    folder = "gqa"
    description = "GQA testdev-balanced: exact-match accuracy"
    official_files = "testdev_balanced_questions.json (dict questionId -> {imageId, question, answer}), images images/<imageId>.jpg"
    row_fields = "question_id|id, question, answer, image|imageId"

    def read_official(self, root: Path) -> LoadResult | None:
        qfile = root / "testdev_balanced_questions.json"
        if not qfile.is_file():
            return None
        base_dirs = [root / "images", root]
        docs = [{"id": str(qid), "question": q["question"], "answer": q["answer"],
                 "image": image_ref(f"{q['imageId']}.jpg", base_dirs), "origin": str(qfile)}
                for qid, q in read_json(qfile).items()]
        return LoadResult(docs)

    def from_row(self, row: dict, base_dirs: list[Path]) -> dict:
        image = row.get("image")
        if image is None and row.get("imageId") is not None:
            image = f"{row['imageId']}.jpg"
            base_dirs = [base_dirs[-1] / "images", *base_dirs]
        return {"id": as_str_id(row.get("question_id", row.get("id"))), "question": row["question"],
                "answer": str(row["answer"]), "image": image_ref(image, base_dirs)}

    def validate(self, doc: dict) -> str | None:
        if not doc["answer"].strip():
            return "empty answer"
        return None if doc["image"] is not None else "no image"

    def prompt(self, doc: dict) -> str:
        return doc["question"] + SHORT_ANSWER

    def target(self, doc: dict):
        return doc["answer"]

    def score(self, doc: dict, prediction: str) -> dict:
        return {"score": float(gqa_normalize(prediction) == doc["answer"])}

    def aggregate(self, records: list[dict]) -> dict:
        return {"accuracy": mean_percent([r["score"] for r in records])}
