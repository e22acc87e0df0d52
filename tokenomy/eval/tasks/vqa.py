"""Open-ended VQA with soft accuracy: VQAv2, TextVQA (with / without OCR tokens), VizWiz, and user JSONL.

Each task scores in one of the two conventions of tokenomy/eval/vqa_normalize.py: ``evalai`` (the default:
EvalAI server / LLaVA m4c_evaluator.py / lmms-eval) or ``vqaeval`` (the ``-vqaeval`` variants: GT-Vision-Lab
vqaEval.py, the evaluator distributed with VQAv2).
"""
from __future__ import annotations

import re
from pathlib import Path

from tokenomy.errors import InputError
from tokenomy.eval.data import image_ref, read_json
from tokenomy.eval.tasks.base import SHORT_ANSWER, LoadResult, Task, as_str_id, mean_percent
from tokenomy.eval.vqa_normalize import SOFT_ACCURACY, normalize_answer


def answer_strings(answers) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    return [a["answer"] if isinstance(a, dict) else str(a) for a in answers]


class SoftAccuracyTask(Task):
    """Docs carry `question` and 10 (or any number of) human `answers`; the score is VQA soft accuracy."""

    row_fields = "question_id|id, question, answers, image"
    suffix = SHORT_ANSWER
    convention = "evalai"

    @property
    def reference(self) -> str:
        if self.convention == "vqaeval":
            return "vqaEval.py (GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py)"
        return "EvalAI processor (LLaVA llava/eval/m4c_evaluator.py, as lmms-eval and the EvalAI server)"

    def config(self) -> dict:
        return {**super().config(), "scoring": self.convention}

    def from_row(self, row: dict, base_dirs: list[Path]) -> dict:
        return {
            "id": as_str_id(row.get("question_id", row.get("id"))),
            "question": row["question"],
            "answers": answer_strings(row.get("answers") or []),
            "image": image_ref(row.get("image", row.get("image_path")), base_dirs),
            "ocr_tokens": list(row["ocr_tokens"]) if row.get("ocr_tokens") is not None else None,
        }

    def validate(self, doc: dict) -> str | None:
        if not doc["answers"]:
            return "empty answers list"
        if doc["image"] is None:
            return "no image"
        return None

    def prompt(self, doc: dict) -> str:
        return doc["question"] + self.suffix

    def target(self, doc: dict):
        return doc["answers"]

    def score(self, doc: dict, prediction: str) -> dict:
        record = {"score": SOFT_ACCURACY[self.convention](prediction, doc["answers"])}
        if self.convention == "evalai":
            record["normalized_prediction"] = normalize_answer(prediction)
        return record

    def aggregate(self, records: list[dict]) -> dict:
        return {"accuracy": mean_percent([r["score"] for r in records])}


class VQAv2(SoftAccuracyTask):
    name = "vqav2"
    folder = "vqav2"
    description = "VQAv2 (local split with annotations, e.g. val2014): soft accuracy"
    official_files = ("v2_OpenEnded_mscoco_<split>_questions.json + v2_mscoco_<split>_annotations.json, "
                      "images <split>/COCO_<split>_<image_id:012d>.jpg")

    def read_official(self, root: Path) -> LoadResult | None:
        questions_files = sorted(root.glob("v2_OpenEnded_mscoco_*_questions.json"))
        if not questions_files:
            return None
        docs = []
        for qfile in questions_files:
            split = re.match(r"v2_OpenEnded_mscoco_(.+)_questions\.json", qfile.name).group(1)
            afile = root / f"v2_mscoco_{split}_annotations.json"
            if not afile.is_file():
                raise InputError(f"task vqav2: {qfile} has no annotation file {afile} (soft accuracy needs the answers)")
            answers = {a["question_id"]: a["answers"] for a in read_json(afile)["annotations"]}
            base_dirs = [root / split, root / "images" / split, root / "images", root]
            for q in read_json(qfile)["questions"]:
                name = f"COCO_{split}_{int(q['image_id']):012d}.jpg"
                docs.append({"id": str(q["question_id"]), "question": q["question"],
                             "answers": answer_strings(answers.get(q["question_id"], [])),
                             "image": image_ref(name, base_dirs), "origin": str(qfile)})
        return LoadResult(docs)


class TextVQA(SoftAccuracyTask):
    """TextVQA val. With `ocr=True` (the default, LLaVA-1.5's protocol behind its 58.2) the prompt carries a
    `Reference OCR token:` line; `textvqa-no-ocr` is lmms-eval's default protocol."""

    name = "textvqa"
    folder = "textvqa"
    description = "TextVQA val, LLaVA-1.5 protocol: OCR tokens in the prompt; soft accuracy"
    official_files = ("TextVQA_0.5.1_val.json (+ TextVQA_Rosetta_OCR_v0.2_val.json for OCR tokens), "
                      "images train_images/<image_id>.jpg")
    row_fields = "question_id, question, answers, ocr_tokens, image"
    ocr = True

    def config(self) -> dict:
        return {**super().config(), "ocr_tokens_in_prompt": self.ocr,
                "protocol": "llava-1.5" if self.ocr else "lmms-eval"}

    def read_official(self, root: Path) -> LoadResult | None:
        qfile = root / "TextVQA_0.5.1_val.json"
        if not qfile.is_file():
            return None
        ocr_file = root / "TextVQA_Rosetta_OCR_v0.2_val.json"
        ocr = {}
        if ocr_file.is_file():
            ocr = {r["image_id"]: r.get("ocr_tokens", []) for r in read_json(ocr_file)["data"]}
        base_dirs = [root / "train_images", root / "images", root]
        docs = []
        for q in read_json(qfile)["data"]:
            tokens = q.get("ocr_tokens", ocr.get(q["image_id"]))
            docs.append({"id": str(q["question_id"]), "question": q["question"], "answers": answer_strings(q.get("answers", [])),
                         "image": image_ref(f"{q['image_id']}.jpg", base_dirs), "ocr_tokens": tokens, "origin": str(qfile)})
        return LoadResult(docs)

    def validate_all(self, result: LoadResult) -> LoadResult:
        if self.ocr and result.docs and all(d.get("ocr_tokens") is None for d in result.docs):
            raise InputError(f"task {self.name} puts OCR tokens in the prompt but the data has none: add "
                             "TextVQA_Rosetta_OCR_v0.2_val.json or an `ocr_tokens` field, or run textvqa-no-ocr")
        return super().validate_all(result)

    def prompt(self, doc: dict) -> str:
        if self.ocr and doc.get("ocr_tokens"):
            return f"{doc['question']}\nReference OCR token: {', '.join(doc['ocr_tokens'])}{SHORT_ANSWER}"
        return doc["question"] + SHORT_ANSWER


class TextVQANoOCR(TextVQA):
    name = "textvqa-no-ocr"
    description = "TextVQA val, lmms-eval protocol: no OCR tokens in the prompt; soft accuracy"
    ocr = False


class VQAv2VQAEval(VQAv2):
    name = "vqav2-vqaeval"
    description = "VQAv2 scored with vqaEval.py's rules (normalise only when the human answers disagree)"
    convention = "vqaeval"


class TextVQAVQAEval(TextVQA):
    name = "textvqa-vqaeval"
    description = "TextVQA val with OCR tokens, scored with vqaEval.py's rules"
    convention = "vqaeval"


class VizWiz(SoftAccuracyTask):
    name = "vizwiz"
    folder = "vizwiz"
    description = "VizWiz-VQA val: soft accuracy, 'Unanswerable' prompt"
    official_files = "val.json (list of {image, question, answers}), images val/<image>"
    suffix = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT_ANSWER

    def read_official(self, root: Path) -> LoadResult | None:
        qfile = root / "val.json"
        if not qfile.is_file():
            return None
        base_dirs = [root / "val", root / "images", root]
        docs = [{"id": q["image"], "question": q["question"], "answers": answer_strings(q.get("answers", [])),
                 "image": image_ref(q["image"], base_dirs), "origin": str(qfile)} for q in read_json(qfile)]
        return LoadResult(docs)


class VQAJsonl(SoftAccuracyTask):
    """Bring-your-own data: any JSONL of {id, image, question, answers} (image paths relative to the file)."""

    name = "vqa-jsonl"
    folder = "vqa-jsonl"
    description = "generic JSONL of {id, image, question, answers}: soft accuracy"
    row_fields = "id, image, question, answers"


class VizWizVQAEval(VizWiz):
    name = "vizwiz-vqaeval"
    description = "VizWiz-VQA val scored with vqaEval.py's rules"
    convention = "vqaeval"
