"""Video-MME and GQA score as their reference evaluators, checked against transcriptions of those evaluators.

The transcriptions below are references, kept inside the test as the issue asks:
- ``reference_extract_mcq_answer``: EvolvingLMMs-Lab/lmms-eval 75571cfe lmms_eval/tasks/_task_utils/mcq_extract.py
  lines 17-63 (choices, phrases, priorities) and 66-158 (extract_mcq_answer), called by
  lmms_eval/tasks/videomme/utils.py lines 256-259 with choices A-D.
- ``reference_videomme_accuracy``: the same repository, lmms_eval/tasks/videomme/utils.py lines 304-371
  (videomme_aggregate_results: correct/answered over every question, x 100; 0 when empty).
- ``reference_lmms_eval_gqa``: lmms_eval/tasks/gqa/gqa.yaml lines 18-23 (exact_match, ignore_case,
  ignore_punctuation) through lmms_eval/api/metrics.py lines 188-220 (exact_match_hf_evaluate), on the text
  stripped by lmms_eval/api/task.py line 1675.
- ``reference_strip_reasoning_tags``: lmms_eval/api/reasoning.py lines 21-36, applied by lmms_eval/evaluator.py
  lines 1225-1233 with the default tag pairs of lmms_eval/__main__.py lines 309-314 to every answer of every task.
- ``reference_gqa_eval``: the official GQA eval.py as LLaVA's setup runs it (copy at SHI-Labs/VCoder 4e85acef
  playground/data/eval/gqa/data/eval/eval.py lines 357-374 and 435-437), fed by haotian-liu/LLaVA c121f043
  scripts/convert_gqa_for_eval.py line 14 on the text stripped by llava/eval/model_vqa_loader.py line 116.
"""
import json
import random
import re
import string

import numpy as np
import pytest
from PIL import Image

from tokenomy.eval import tasks
from tokenomy.eval.choices import mcq_extract_letter
from tokenomy.eval.tasks.lmms_eval_response import lmms_eval_response
from tokenomy.eval.cli import run_eval_command


# ---- reference: lmms-eval mcq_extract.py lines 17-158 -----------------------------------------------------------
_REF_ANSWER_PHRASES = [
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is", "best answer is",
    "the correct option is", "correct option is", "the best option is", "best option is", "the choice is", "choice is",
    "the correct choice is", "correct choice is", "i choose", "i select", "i pick", "my answer is", "my choice is",
    "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
]
_REF_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
                 "space": 2, "fallback": 0}


def reference_extract_mcq_answer(response, choices):
    if not response or not response.strip():
        return ""
    text = response.strip()
    for char in [",", ".", "!", "?", ";", ":", "'", '"']:
        text = text.strip(char)
    text = " " + text + " "
    candidates = []
    for ch in choices:
        if f"({ch})" in text:
            candidates.append((ch, text.rfind(f"({ch})"), "parentheses"))
    for ch in choices:
        if f"{ch}." in text:
            candidates.append((ch, text.rfind(f"{ch}."), "period"))
    for ch in choices:
        if f"{ch}:" in text:
            candidates.append((ch, text.rfind(f"{ch}:"), "colon"))
    for ch in choices:
        if f"{ch})" in text:
            candidates.append((ch, text.rfind(f"{ch})"), "right_paren"))
    for ch in choices:
        if f"{ch} " in text:
            candidates.append((ch, text.rfind(f"{ch} "), "space"))
    text_lower = text.lower()
    for phrase in _REF_ANSWER_PHRASES:
        idx = text_lower.find(phrase)
        if idx != -1:
            after = idx + len(phrase)
            for ch in choices:
                ch_pos = text.find(ch, after)
                if ch_pos != -1:
                    candidates.append((ch, ch_pos, "phrase"))
    stripped = text.strip()
    for ch in choices:
        if stripped.startswith(ch) and (len(stripped) == 1 or not stripped[1].isalpha()):
            candidates.append((ch, 0, "start"))
    for ch in choices:
        if stripped.endswith(ch) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            candidates.append((ch, len(text) - 1, "end"))
    if not candidates:
        for ch in choices:
            if ch in text:
                candidates.append((ch, text.rfind(ch), "fallback"))
    if not candidates:
        return ""
    candidates.sort(key=lambda x: (_REF_PRIORITY.get(x[2], 0), x[1]), reverse=True)
    return candidates[0][0]


def reference_videomme_accuracy(pairs):
    correct = sum(pred == answer for pred, answer in pairs)
    return 100 * correct / len(pairs) if pairs else 0


# ---- reference: lmms-eval exact_match with ignore_case + ignore_punctuation --------------------------------------
def reference_lmms_eval_gqa(prediction, answer):
    predictions = np.asarray([prediction.strip()])
    references = np.asarray([answer])
    predictions = np.char.lower(predictions)
    references = np.char.lower(references)
    repl_table = string.punctuation.maketrans("", "", string.punctuation)
    predictions = np.char.translate(predictions, table=repl_table)
    references = np.char.translate(references, table=repl_table)
    return float(np.mean(predictions == references))


# ---- reference: lmms-eval reasoning.py lines 21-36 with the default --reasoning_tags -------------------------
_REF_DEFAULT_TAGS = [["<think>", "</think>"], ["<analysis>", "</analysis>"]]


def reference_strip_reasoning_tags(text, tag_pairs=_REF_DEFAULT_TAGS):
    result = text
    for start_tag, end_tag in tag_pairs:
        while start_tag in result and end_tag in result:
            start = result.find(start_tag)
            end = result.find(end_tag, start)
            if start != -1 and end != -1:
                result = result[:start] + result[end + len(end_tag):]
            else:
                break
        if end_tag in result and start_tag not in result:
            result = result.rsplit(end_tag, 1)[-1]
    return result.strip()


# ---- reference: LLaVA convert_gqa_for_eval.py line 14 + GQA eval.py lines 357-374, 435-437 ---------------------
def reference_gqa_eval(questions, decoded):
    predictions = {qid: text.strip().rstrip(".").lower() for qid, text in decoded.items()}
    scores = {"accuracy": [], "binary": [], "open": []}
    for qid, question in questions.items():
        if question["isBalanced"]:
            score = float(1 if predictions[qid] == question["answer"] else 0)
            scores["accuracy"].append(score)
            scores["open" if question["types"]["structural"] == "query" else "binary"].append(score)
    return {k: (float(sum(v)) / len(v) if v else 0) * 100 for k, v in scores.items()}


# ---- Video-MME -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, letter", [
    ("A", "A"), (" B\n", "B"), ("C.", "C"), ("(D)", "D"), ("D)", "D"), ("b", ""), ("", ""), ("   ", ""),
    ("The best answer is: C.", "C"), ("The answer is (B).", "B"), ("Answer: A", "A"),
    ("Dog", "D"),  # no candidate in any format: the fallback takes a capital inside a word
    ("I think the answer is B", "B"),  # "I " is not a choice; "B" ends the text (rank 9)
    ("A. Because option B is wrong", "A"),  # a standalone start (rank 10) beats everything
    ("The answer is A, not B", "B"),  # both follow the phrase (rank 7): the later one wins
    ("Between (A) and (C), (C) fits", "C"),
    ("The correct answer is Blue", "B"),  # the phrase takes the first capital after it, inside a word too
    ("答案是C", "C"), ("'A'", "A"), ('"B".', "B"), ("A.\"", "A"),
    ("Both A and B", "B"),  # "B" ends the text
    ("Cannot tell", "C"),  # starts with "C" followed by a letter: not a start; "C" fallback
    ("None of these", ""),
    ("Option B: no; C. yes", "C"),  # "X." (rank 5) beats "X:" (rank 4) wherever they are
    ("so C) or maybe B:", "B"),  # "X:" (4) beats "X)" (3)
])
def test_videomme_letter_golden(text, letter):
    assert reference_extract_mcq_answer(text, ["A", "B", "C", "D"]) == letter
    assert mcq_extract_letter(text, "ABCD") == letter


def _tricky_predictions(count, seed=0):
    rng = random.Random(seed)
    pieces = ["A", "B", "C", "D", "E", "a", "b", "(", ")", ".", ":", ",", "!", "?", ";", "'", '"', " ", "\n", "\t",
              "the answer is ", "The Best Answer is", "I choose ", "option", "Dog", "Cat", "答案是", "选", "İ", "ß",
              "best option is ", "correct", "Ab", "x", "1", "**"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 9))) for _ in range(count)]


def test_videomme_letter_equals_reference_on_random_text():
    for text in _tricky_predictions(20000):
        assert mcq_extract_letter(text, "ABCD") == reference_extract_mcq_answer(text, ["A", "B", "C", "D"]), repr(text)


def test_videomme_task_scores_and_aggregates_as_lmms_eval():
    task = tasks.get("videomme")
    docs = [{"answer": answer, "duration": duration, "domain": domain, "task_type": "OCR Problems"}
            for answer, duration, domain in [("A", "short", "Knowledge"), ("B", "short", "Knowledge"),
                                             ("C", "long", "Multilingual"), ("D", "medium", "Knowledge")]]
    predictions = ["(A) a cat", "The answer is C", "Dog", "d"]
    records = [task.score(doc, text) for doc, text in zip(docs, predictions)]
    assert [r["parsed"] for r in records] == ["A", "C", "D", ""]
    pairs = [(reference_extract_mcq_answer(text, ["A", "B", "C", "D"]), doc["answer"])
             for doc, text in zip(docs, predictions)]
    metrics = task.aggregate(records)
    assert metrics["accuracy"] == pytest.approx(reference_videomme_accuracy(pairs)) == pytest.approx(25.0)
    assert metrics["by_duration"] == {"long": 0.0, "medium": 0.0, "short": 50.0}
    assert metrics["by_domain"] == {"Knowledge": pytest.approx(100 / 3), "Multilingual": 0.0}
    assert metrics["by_task_type"] == {"OCR Problems": 25.0}


def test_videomme_names_its_reference():
    assert "videomme/utils.py" in tasks.get("videomme").reference


# ---- GQA: official pipeline vs lmms-eval -----------------------------------------------------------------------
GQA_CASES = [  # prediction, answer, official pipeline, lmms-eval
    ("Yes.", "yes", True, True), (" yes\n", "yes", True, True), ("Yes..", "yes", True, True),
    ("yes .", "yes", False, False),  # lmms-eval strips before deleting the period: "yes " is left
    ("Yes!", "yes", False, True), ("No,", "no", False, True), ("(red)", "red", False, True),
    ("t-shirt", "t-shirt", True, True), ("tshirt", "t-shirt", False, True),
    ("T-Shirt.", "t-shirt", True, True), ("the left", "left", False, False), ("", "yes", False, False),
    ("yes, it is", "yes", False, False), ("Left side", "left", False, False), ("LEFT", "left", True, True),
    ("yes\x00", "yes", False, True),  # numpy's fixed-width strings drop a trailing NUL
]


@pytest.mark.parametrize("prediction, answer, official, lmms_eval", GQA_CASES)
def test_gqa_conventions(prediction, answer, official, lmms_eval):
    doc = {"answer": answer, "structural": "verify"}
    question = {"q": {"isBalanced": True, "answer": answer, "types": {"structural": "verify"}}}
    assert reference_gqa_eval(question, {"q": prediction})["accuracy"] == 100.0 * official
    assert tasks.get("gqa").score(doc, prediction)["score"] == float(official)
    assert reference_lmms_eval_gqa(prediction, answer) == float(lmms_eval)
    assert tasks.get("gqa-lmms-eval").score(doc, prediction)["score"] == float(lmms_eval)


def test_gqa_lmms_eval_equals_reference_on_random_text():
    task = tasks.get("gqa-lmms-eval")
    for text in _tricky_predictions(5000, seed=1):
        for answer in ("yes", "t-shirt", "A"):
            expected = reference_lmms_eval_gqa(text, answer)
            assert task.score({"answer": answer, "structural": ""}, text)["score"] == expected, (repr(text), answer)


def test_gqa_official_aggregation_splits_binary_and_open(tmp_path):
    questions = {
        "1": {"isBalanced": True, "answer": "yes", "types": {"structural": "verify"}, "question": "Is it?", "imageId": "n1"},
        "2": {"isBalanced": True, "answer": "red", "types": {"structural": "query"}, "question": "Color?", "imageId": "n1"},
        "3": {"isBalanced": True, "answer": "left", "types": {"structural": "query"}, "question": "Side?", "imageId": "n1"},
        "4": {"isBalanced": True, "answer": "no", "types": {"structural": "logical"}, "question": "Both?", "imageId": "n1"},
        "5": {"isBalanced": False, "answer": "cat", "types": {"structural": "query"}, "question": "What?", "imageId": "n1"},
    }
    decoded = {"1": "Yes.", "2": "Red", "3": "right", "4": "yes", "5": "cat"}
    (tmp_path / "gqa").mkdir()
    (tmp_path / "gqa" / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    (tmp_path / "gqa" / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "gqa" / "images" / "n1.jpg")
    task = tasks.get("gqa")
    docs = task.load(tmp_path).docs
    assert sorted(d["id"] for d in docs) == ["1", "2", "3", "4"]  # eval.py skips unbalanced questions
    metrics = task.aggregate([task.score(d, decoded[d["id"]]) for d in docs])
    expected = reference_gqa_eval(questions, decoded)
    assert metrics == pytest.approx(expected)
    assert expected == pytest.approx({"accuracy": 50.0, "binary": 50.0, "open": 50.0})


def test_gqa_rows_without_types_report_accuracy_only():
    task = tasks.get("gqa")
    metrics = task.aggregate([task.score({"answer": "red", "structural": ""}, "Red.")])
    assert metrics == {"accuracy": 100.0}


def test_gqa_lmms_eval_reports_its_one_metric():
    task = tasks.get("gqa-lmms-eval")
    docs = [{"answer": "red", "structural": "query"}, {"answer": "yes", "structural": "verify"}]
    records = [task.score(docs[0], "Red!"), task.score(docs[1], "no")]
    assert task.aggregate(records) == {"accuracy": 100 * np.mean([reference_lmms_eval_gqa("Red!", "red"),
                                                                  reference_lmms_eval_gqa("no", "yes")])}


# ---- lmms-eval's reasoning-block removal, before every lmms-eval task scores -------------------------------
@pytest.mark.parametrize("text, kept", [
    ("<think>maybe B</think> A", "A"), ("</think>\nYes", "Yes"), ("plan</think>no</think> C ", "C"),
    ("<think>unclosed B", "<think>unclosed B"), ("</think>x<think>", "</think>x<think>"),
    ("<think>a</think>B<think>c</think>", "B"), ("<analysis>x</analysis><think>y</think> D", "D"),
    ("<THINK>B</THINK> A", "<THINK>B</THINK> A"),  # tags match case-sensitively
    ("  plain\n", "plain"),
])
def test_lmms_eval_response_golden(text, kept):
    assert reference_strip_reasoning_tags(text) == kept
    assert lmms_eval_response(text) == kept


def test_lmms_eval_response_equals_reference_on_random_text():
    rng = random.Random(2)
    pieces = ["<think>", "</think>", "<analysis>", "</analysis>", "<think", "think>", "A", " ", "\n", "yes"]
    for _ in range(20000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        assert lmms_eval_response(text) == reference_strip_reasoning_tags(text), repr(text)


@pytest.mark.parametrize("name, doc, prediction, score", [
    ("videomme", {"answer": "C", "duration": "short", "domain": "", "task_type": ""}, "<think>A? B?</think> C", 1.0),
    ("gqa-lmms-eval", {"answer": "yes", "structural": ""}, "<think>no</think>\nYes!", 1.0),
    ("gqa", {"answer": "yes", "structural": ""}, "<think>no</think>\nYes", 0.0),  # LLaVA's pipeline keeps the tags
    ("pope-strict", {"label": "no", "split": "random"}, "</think>No", 1.0),
    ("pope", {"label": "no", "split": "random"}, "</think>No", 0.0),  # one word "</think>No": read as yes
    ("mme-lmms-eval", {"answer": "yes", "subtask": "OCR", "image_key": "k"}, "<think>no</think>yes", 1.0),
    ("mme", {"answer": "yes", "subtask": "OCR", "image_key": "k"}, "<think>no</think>yes", 0.0),
    ("seed-bench", {"answer": "B", "question_type": "1"}, "<think>A</think> b", 1.0),
])
def test_lmms_eval_tasks_drop_reasoning_blocks(name, doc, prediction, score):
    assert tasks.get(name).score(doc, prediction)["score"] == score


# ---- every task: a reference file named, shown by `tokenomy eval --tasks list` ----------------------------------
_REFERENCE_FILE = re.compile(r"[\w/.-]+\.(py|yaml)\b")


@pytest.mark.parametrize("name", tasks.available())
def test_task_reference_names_a_file(name):
    task = tasks.get(name)
    if name == "synthvqa":
        assert "tokenomy" in task.reference  # its own benchmark: the reference is tokenomy/eval/synthvqa_eval.py
        return
    assert _REFERENCE_FILE.search(task.reference), task.reference


def test_tasks_list_prints_each_convention(capsys):
    class Args:
        tasks = "list"
        reducer = "none"

    assert run_eval_command(Args()) == 0
    printed = capsys.readouterr().out
    for name in tasks.available():
        assert f"{name} " in printed
        assert tasks.get(name).reference in printed
    assert "gqa-lmms-eval" in printed and "gqa/gqa.yaml" in printed
