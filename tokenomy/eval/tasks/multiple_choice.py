"""Image multiple-choice tasks: ScienceQA-IMG, MMBench (CircularEval, static extraction), SEED-Bench image.

The answer-letter rules live in tokenomy/eval/choices.py, each transcribed from the evaluator named there.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from tokenomy.eval.choices import LETTERS, first_letter, format_options, option_letter_static, scienceqa_letter
from tokenomy.eval.data import ImageRef, decode_base64, image_ref, read_json, read_tsv
from tokenomy.eval.tasks.base import MULTIPLE_CHOICE, LoadResult, Task, as_str_id, mean_percent
from tokenomy.eval.tasks.lmms_eval_response import lmms_eval_response

CIRCULAR_OFFSET = 1_000_000


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip().lower() in ("", "nan", "none")


class ScienceQAImg(Task):
    """ScienceQA test problems with an image, scored as haotian-liu/LLaVA llava/eval/eval_science_qa.py: the letter
    rule of lines 65-77 (tokenomy.eval.choices.scienceqa_letter) and IMG-Accuracy, the share of correct answers
    among the problems with an image (lines 99-105)."""

    name = "scienceqa-img"
    reference = "LLaVA llava/eval/eval_science_qa.py (IMG-Accuracy)"
    folder = "scienceqa"
    description = "ScienceQA test, image subset: IMG-accuracy (LLaVA letter parsing)"
    official_files = "problems.json + pid_splits.json, images images/test/<pid>/image.png"
    row_fields = "question, choices, answer (int), hint, image"

    def read_official(self, root: Path) -> LoadResult | None:
        problems_file = root / "problems.json"
        if not problems_file.is_file():
            return None
        problems = read_json(problems_file)
        splits_file = root / "pid_splits.json"
        test_pids = read_json(splits_file)["test"] if splits_file.is_file() else [p for p, v in problems.items() if v.get("split") == "test"]
        docs, errors = [], []
        for pid in test_pids:
            problem = problems[pid]
            if not problem.get("image"):
                continue
            self.add_doc(docs, errors, {**problem, "pid": pid, "image": f"{pid}/{problem['image']}"},
                         f"{problems_file}[{pid}]", [root / "images" / "test", root / "test", root])
        return LoadResult(docs, errors)

    def from_row(self, row: dict, base_dirs: list[Path]) -> dict | None:
        if _missing(row.get("image")) and not isinstance(row.get("image"), dict):
            return None  # text-only problems are outside the IMG subset
        return {"id": as_str_id(row.get("pid", row.get("id"))), "question": row["question"], "choices": list(row["choices"]),
                "answer": int(row["answer"]), "hint": "" if _missing(row.get("hint")) else str(row["hint"]),
                "image": image_ref(row["image"], base_dirs)}

    def validate(self, doc: dict) -> str | None:
        if not 0 <= doc["answer"] < len(doc["choices"]):
            return f"answer index {doc['answer']} outside the {len(doc['choices'])} choices"
        return None

    def prompt(self, doc: dict) -> str:
        context = f"Context: {doc['hint']}\n" if doc["hint"] else ""
        return f"{context}{doc['question']}{format_options(doc['choices'])}{MULTIPLE_CHOICE}"

    def target(self, doc: dict):
        return LETTERS[doc["answer"]]

    def score(self, doc: dict, prediction: str) -> dict:
        letter = scienceqa_letter(prediction, len(doc["choices"]))
        return {"score": float(letter == LETTERS[doc["answer"]]), "parsed": letter or "FAILED"}


class MMBench(Task):
    """MMBench dev (EN) with CircularEval: a question counts only if every rotation of its options is right.

    Rotations come from the file when it has them (rows with index >= 1e6, grouped by index % 1e6); otherwise
    they are generated here as LLaVA's `--all-rounds` does. Letters are extracted as VLMEvalKit's exact matching
    does (``can_infer``, no judge; "Z" when nothing matches), and a group passes only when every rotation does.
    References: open-compass/VLMEvalKit vlmeval/utils/matching_util.py ``can_infer`` (lines 124-127) and
    vlmeval/dataset/utils/multiple_choice.py ``extract_answer_from_item`` (lines 359-383) and ``mcq_circular_eval``
    (lines 511-582).
    """

    name = "mmbench"
    reference = "VLMEvalKit vlmeval/utils/matching_util.py can_infer + CircularEval (exact matching, no judge)"
    folder = "mmbench"
    description = "MMBench dev: CircularEval accuracy with static letter extraction"
    official_files = "mmbench_dev*.tsv (index, question, hint, A..E, answer, category, image base64)"
    row_fields = "index, question, hint, A, B, C, D, [E], answer, category, image"

    def config(self) -> dict:
        return {**super().config(), "answer_extraction": "static", "circular": True}

    def read_official(self, root: Path) -> LoadResult | None:
        files = sorted(root.glob("*.tsv"))
        if not files:
            return None
        docs, errors = [], []
        for path in files:
            for i, row in enumerate(read_tsv(path)):
                self.add_doc(docs, errors, row, f"{path}:{i + 2}", [path.parent, root])
        return LoadResult(self.with_rotations(docs), errors)

    def read_generic(self, root: Path) -> LoadResult | None:
        result = super().read_generic(root)
        return None if result is None else LoadResult(self.with_rotations(result.docs), result.errors)

    def from_row(self, row: dict, base_dirs: list[Path]) -> dict:
        index = int(float(row["index"]))
        options = {letter: str(row[letter]) for letter in LETTERS[:5] if letter in row and not _missing(row[letter])}
        return {"id": str(index), "index": index, "group": str(index % CIRCULAR_OFFSET), "question": str(row["question"]),
                "hint": "" if _missing(row.get("hint")) else str(row["hint"]), "options": options,
                "answer": str(row["answer"]).strip(), "category": str(row.get("category", "")),
                "image": ImageRef(data=decode_base64(row["image"])) if isinstance(row["image"], str) else image_ref(row["image"], base_dirs)}

    @staticmethod
    def with_rotations(docs: list[dict]) -> list[dict]:
        if any(d["index"] >= CIRCULAR_OFFSET for d in docs):
            return docs
        rotated = []
        for doc in docs:
            letters = list(doc["options"])
            texts = [doc["options"][k] for k in letters]
            answer_pos = letters.index(doc["answer"]) if doc["answer"] in letters else None
            for shift in range(len(letters)):
                new = dict(doc, index=doc["index"] + shift * CIRCULAR_OFFSET)
                new["id"] = str(new["index"])
                new["options"] = dict(zip(letters, texts[shift:] + texts[:shift]))
                if answer_pos is not None:
                    new["answer"] = letters[(answer_pos - shift) % len(letters)]
                rotated.append(new)
        return rotated

    def validate(self, doc: dict) -> str | None:
        if len(doc["options"]) < 2:
            return "fewer than two options"
        if doc["answer"] not in doc["options"]:
            return f"answer {doc['answer']!r} is not one of the options {sorted(doc['options'])}"
        return None

    def prompt(self, doc: dict) -> str:
        question = f"{doc['hint']}\n{doc['question']}" if doc["hint"] else doc["question"]
        return question + "".join(f"\n{k}. {v}" for k, v in doc["options"].items()) + MULTIPLE_CHOICE

    def target(self, doc: dict):
        return doc["answer"]

    def score(self, doc: dict, prediction: str) -> dict:
        letter = option_letter_static(prediction, doc["options"])
        return {"score": float(letter == doc["answer"]), "parsed": letter, "group": doc["group"],
                "category": doc["category"], "rotation": doc["index"] // CIRCULAR_OFFSET}

    def aggregate(self, records: list[dict]) -> dict:
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in records:
            groups[r["group"]].append(r)
        passed = {g: all(r["score"] == 1.0 for r in rows) for g, rows in groups.items()}
        categories: dict[str, list[bool]] = defaultdict(list)
        for g, rows in groups.items():
            categories[rows[0]["category"]].append(passed[g])
        return {
            "accuracy": mean_percent([float(v) for v in passed.values()]),
            "single_pass_accuracy": mean_percent([r["score"] for r in records if r["rotation"] == 0]),
            "groups": len(groups),
            "by_category": {c: mean_percent([float(v) for v in vs]) for c, vs in sorted(categories.items())},
        }


class MMBenchJudge(MMBench):
    name = "mmbench-judge"
    reference = ("VLMEvalKit vlmeval/dataset/utils/multiple_choice.py extract_answer_from_item "
                 "(GPT judge when can_infer fails; judge not implemented here)")
    description = "MMBench with GPT-assisted answer extraction (needs an LLM judge API; skipped by default)"
    requires_judge = True


class SEEDBenchImage(Task):
    """SEED-Bench v1 image questions scored as lmms-eval's ``seedbench`` task scores ``seed_image``:
    lmms_eval/tasks/seedbench/utils.py ``seed_process_result`` (lines 17-24: first character of the stripped text)
    and ``seed_aggregation_result`` (lines 27-34: lowercased, stripped comparison; mean), on the answer after
    lmms-eval's reasoning-block removal (lmms_eval_response.py)."""

    name = "seed-bench"
    reference = "lmms-eval lmms_eval/tasks/seedbench/utils.py (first character, case-insensitive)"
    folder = "seed-bench"
    description = "SEED-Bench v1 image questions: accuracy (first-letter match), per question type"
    official_files = "SEED-Bench.json ({questions: [...]}), images SEED-Bench-image/<data_id>"
    row_fields = "question_id, question, choice_a..choice_d, answer, data_type, question_type_id, image"

    def read_official(self, root: Path) -> LoadResult | None:
        qfile = root / "SEED-Bench.json"
        if not qfile.is_file():
            return None
        docs, errors = [], []
        for i, row in enumerate(read_json(qfile)["questions"]):
            if row.get("data_type") == "image":
                self.add_doc(docs, errors, {**row, "image": row["data_id"]}, f"{qfile}[{i}]",
                             [root / "SEED-Bench-image", root])
        return LoadResult(docs, errors)

    def from_row(self, row: dict, base_dirs: list[Path]) -> dict | None:
        if row.get("data_type", "image") != "image":
            return None
        image = row["image"]
        if isinstance(image, (list, tuple)):  # lmms-eval stores a list of images; image questions have one
            image = image[0] if image else None
        return {"id": as_str_id(row["question_id"]), "question": row["question"],
                "choices": [str(row[f"choice_{c}"]) for c in "abcd"], "answer": str(row["answer"]).strip(),
                "question_type": str(row.get("question_type_id", "")), "image": image_ref(image, base_dirs)}

    def validate(self, doc: dict) -> str | None:
        if doc["answer"] not in LETTERS[:4]:
            return f"answer must be A-D, got {doc['answer']!r}"
        return None if doc["image"] is not None else "no image"

    def prompt(self, doc: dict) -> str:
        return doc["question"] + format_options(doc["choices"]) + MULTIPLE_CHOICE

    def target(self, doc: dict):
        return doc["answer"]

    def score(self, doc: dict, prediction: str) -> dict:
        letter = first_letter(lmms_eval_response(prediction))
        # seed_aggregation_result (utils.py lines 27-34) compares lowercased, stripped pred and answer
        correct = letter.lower().strip() == doc["answer"].lower().strip()
        return {"score": float(correct), "parsed": letter, "question_type": doc["question_type"]}

    def aggregate(self, records: list[dict]) -> dict:
        types: dict[str, list[float]] = defaultdict(list)
        for r in records:
            types[r["question_type"]].append(r["score"])
        return {"accuracy": mean_percent([r["score"] for r in records]),
                "by_question_type": {t: mean_percent(v) for t, v in sorted(types.items())}}
