"""MME: yes/no pairs per image; per subtask acc + acc+ (max 200), perception (10 subtasks) and cognition (4).

``mme`` parses answers as the official MME eval_tool/calculation.py (``parse_pred_ans``; LLaVA's
scripts/v1_5/eval/mme.sh runs it on the stripped decoded text): lowercase, exact yes/no, else yes/no among the
first 4 characters. ``mme-lmms-eval`` parses as lmms-eval lmms_eval/tasks/mme/utils.py lines 48-69, which also
deletes every period first and reads a lone "y"/"n", on the answer after lmms-eval's reasoning-block removal
(lmms_eval_response.py). Aggregation (acc, acc+, sums) is the same in both.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tokenomy.eval.data import SampleError, image_ref
from tokenomy.eval.tasks.base import SHORT_ANSWER, LoadResult, Task, as_str_id
from tokenomy.eval.tasks.lmms_eval_response import lmms_eval_response

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


def mme_parse(text: str) -> str:
    """MME calculation.py ``parse_pred_ans`` after its ``pred_ans.lower()``, on the stripped decoded text."""
    return _yes_no_in_prefix(text.strip().lower())


def mme_parse_lmms_eval(text: str) -> str:
    """lmms-eval lmms_eval/tasks/mme/utils.py ``parse_pred_ans`` (lines 48-69)."""
    text = text.lower().strip().replace(".", "")
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    return _yes_no_in_prefix(text)


def _yes_no_in_prefix(text: str) -> str:
    """The rule both references share: an exact yes/no, else 'yes' or 'no' within the first four characters."""
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


class MME(Task):
    name = "mme"
    reference = "MME eval_tool/calculation.py (as run by LLaVA scripts/v1_5/eval/mme.sh)"
    folder = "mme"
    description = "MME: perception and cognition scores (acc + acc+ per subtask)"
    official_files = ("one folder per subtask (existence, count, ..., code_reasoning) holding images and "
                      "<image>.txt or questions_answers_YN/<image>.txt with lines 'question<TAB>Yes|No'")
    row_fields = "question_id, question, answer, category, image"
    primary_metric = "perception"
    lmms_eval_parsing = False

    def config(self) -> dict:
        return {**super().config(), "parsing": "lmms-eval" if self.lmms_eval_parsing else "calculation.py"}

    def read_official(self, root: Path) -> LoadResult | None:
        subtasks = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name in PERCEPTION + COGNITION]
        if not subtasks:
            return None
        docs, errors = [], []
        for folder in subtasks:
            qa_dir = folder / "questions_answers_YN"
            txt_files = sorted(qa_dir.glob("*.txt")) if qa_dir.is_dir() else sorted(folder.glob("*.txt"))
            image_dirs = [folder / "images", folder]
            for txt in txt_files:
                image_name = next((txt.stem + s for s in IMAGE_SUFFIXES if any((d / (txt.stem + s)).is_file() for d in image_dirs)),
                                  txt.stem + ".jpg")
                for line_no, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                    if not line.strip():
                        continue
                    fields = line.split("\t")
                    if len(fields) == 3:  # eval_tool layout: image, question, answer
                        fields = fields[1:]
                    origin = f"{txt}:{line_no}"
                    if len(fields) != 2:
                        errors.append(SampleError(f"{folder.name}/{image_name}#{line_no - 1}",
                                                  "expected 'question<TAB>answer'", origin))
                        continue
                    row = {"question_id": f"{folder.name}/{image_name}", "question": fields[0], "answer": fields[1],
                           "category": folder.name, "image": image_name}
                    self.add_doc(docs, errors, row, origin, image_dirs)
        return LoadResult(self.number_pairs(docs), errors)

    def read_generic(self, root: Path) -> LoadResult | None:
        result = super().read_generic(root)
        return None if result is None else LoadResult(self.number_pairs(result.docs), result.errors)

    @staticmethod
    def number_pairs(docs: list[dict]) -> list[dict]:
        # Both questions of an image share question_id upstream; the pair index makes sample ids unique.
        seen: dict[str, int] = defaultdict(int)
        for doc in docs:
            doc["id"] = f"{doc['image_key']}#{seen[doc['image_key']]}"
            seen[doc["image_key"]] += 1
        return docs

    def from_row(self, row: dict, base_dirs: list[Path]) -> dict:
        image_key = as_str_id(row["question_id"])
        return {"id": image_key, "image_key": image_key, "subtask": row["category"], "question": row["question"].strip(),
                "answer": str(row["answer"]).strip().lower(), "image": image_ref(row["image"], base_dirs)}

    def validate(self, doc: dict) -> str | None:
        if doc["answer"] not in ("yes", "no"):
            return f"answer must be Yes or No, got {doc['answer']!r}"
        if doc["subtask"] not in PERCEPTION + COGNITION:
            return f"unknown MME subtask {doc['subtask']!r}"
        return None if doc["image"] is not None else "no image"

    def prompt(self, doc: dict) -> str:
        return doc["question"].replace(" Please answer yes or no.", "") + SHORT_ANSWER

    def target(self, doc: dict):
        return doc["answer"]

    def score(self, doc: dict, prediction: str) -> dict:
        parsed = mme_parse_lmms_eval(lmms_eval_response(prediction)) if self.lmms_eval_parsing else mme_parse(prediction)
        return {"score": float(parsed == doc["answer"]), "parsed": parsed, "subtask": doc["subtask"], "image_key": doc["image_key"]}

    def aggregate(self, records: list[dict]) -> dict:
        by_subtask: dict[str, list[dict]] = defaultdict(list)
        for r in records:
            by_subtask[r["subtask"]].append(r)
        subtasks = {}
        for name, rows in sorted(by_subtask.items()):
            per_image: dict[str, list[float]] = defaultdict(list)
            for r in rows:
                per_image[r["image_key"]].append(r["score"])
            acc = 100.0 * sum(r["score"] for r in rows) / len(rows)
            acc_plus = 100.0 * sum(all(s == 1.0 for s in scores) for scores in per_image.values()) / len(per_image)
            subtasks[name] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "n": len(rows)}
        return {
            "perception": sum(v["score"] for k, v in subtasks.items() if k in PERCEPTION),
            "cognition": sum(v["score"] for k, v in subtasks.items() if k in COGNITION),
            "accuracy": 100.0 * sum(r["score"] for r in records) / len(records) if records else 0.0,
            "subtasks": subtasks,
        }


class MMELmmsEval(MME):
    name = "mme-lmms-eval"
    reference = "lmms-eval lmms_eval/tasks/mme/utils.py"
    description = "MME with lmms-eval's answer parsing (periods removed, lone y/n accepted)"
    lmms_eval_parsing = True
