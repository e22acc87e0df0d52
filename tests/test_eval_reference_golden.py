"""Golden cases per task, transcribed from the reference evaluator each task names (file and lines cited).

Commits read: haotian-liu/LLaVA c121f043, EvolvingLMMs-Lab/lmms-eval 75571cfe, open-compass/VLMEvalKit e8e78f05,
GT-Vision-Lab/VQA a013f004. LLaVA writes `tokenizer.batch_decode(...)[0].strip()` (llava/eval/model_vqa_loader.py
line 116) before any of its scorers run, so every LLaVA-referenced rule sees the stripped text.
"""
import pytest

from tokenomy.eval import tasks
from tokenomy.eval.choices import first_letter, option_letter_static, scienceqa_letter
from tokenomy.eval.tasks.gqa import GQA
from tokenomy.eval.tasks.mme import mme_parse, mme_parse_lmms_eval
from tokenomy.eval.tasks.pope import POPE, POPEStrict, pope_parse_llava, pope_parse_strict
from tokenomy.eval.vqa_normalize import normalize_answer, vqa_soft_accuracy, vqaeval_soft_accuracy


# ---- VQA: EvalAI (LLaVA llava/eval/m4c_evaluator.py 181-218, 225-257) vs vqaEval.py (lines 86-155) -------------
@pytest.mark.parametrize("raw, expected", [
    ("  Two.\n", "2"), ("YES", "yes"), ("\tAn apple ", "apple"), ("hot-dog", "hot dog"), ("(left)", "left"),
    ("", ""), ("what's", "what 's"),  # word_tokenize splits "'s" (m4c_evaluator.py line 183)
])
def test_evalai_normaliser(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("prediction, answers, evalai, vqaeval", [
    # all ten identical: vqaEval.py (line 98) normalises nothing, so case and punctuation must match verbatim
    ("dog", ["Dog"] * 10, 1.0, 0.0),
    ("  Yes \n", ["yes"] * 10, 1.0, 0.0),
    ("yes", ["yes"] * 10, 1.0, 1.0),
    ("yes.", ["yes"] * 10, 1.0, 0.0),
    # answers disagree: both normalise; EvalAI's word_tokenize turns "what's" into "what 's", vqaEval.py does not
    ("what's", ["whats"] * 4 + ["nothing"] * 6, 0.0, 1.0),
    ("A dog.", ["dog"] * 2 + ["puppy"] * 8, 0.6, 0.6),
    ("two dogs", ["2 dogs"] * 3 + ["dogs"] * 7, 0.9, 0.9),
    ("", ["unanswerable"] * 9 + ["dog"], 0.0, 0.0),
    ("I don't know", ["unanswerable"] * 10, 0.0, 0.0),  # refusal
    ("Unanswerable", ["unanswerable"] * 10, 1.0, 0.0),
])
def test_soft_accuracy_conventions(prediction, answers, evalai, vqaeval):
    assert vqa_soft_accuracy(prediction, answers) == pytest.approx(evalai)
    assert vqaeval_soft_accuracy(prediction, answers) == pytest.approx(vqaeval)


def test_vqa_variants_score_with_their_convention():
    doc = {"answers": ["Dog"] * 10}
    assert tasks.get("vqav2").score(doc, "dog")["score"] == 1.0
    assert tasks.get("vqav2-vqaeval").score(doc, "dog")["score"] == 0.0
    assert tasks.get("vizwiz-vqaeval").config()["scoring"] == "vqaeval"
    assert tasks.get("textvqa-vqaeval").config()["scoring"] == "vqaeval"


# ---- POPE: LLaVA llava/eval/eval_pope.py lines 11-20 ------------------------------------------------------------
@pytest.mark.parametrize("text, parsed", [
    ("No\n", "no"), ("\nNo", "no"), ("\tNo", "no"), (" no ", "no"),  # stripped first (model_vqa_loader.py:116)
    ("Yes.", "yes"), ("No, there is not.", "no"), ("Yes, there is no dog.", "no"),
    ("Yes. No.", "yes"),  # only the first sentence
    ("NO", "yes"), ("Nope", "yes"),  # only the words "No", "not", "no" mean no
    ("", "yes"), ("I cannot tell", "yes"), ("not sure", "no"),
])
def test_pope_llava_parse(text, parsed):
    assert pope_parse_llava(text) == parsed


# ---- POPE strict: lmms-eval lmms_eval/tasks/pope/utils.py lines 17-84 -------------------------------------------
@pytest.mark.parametrize("text, parsed", [(" Yes\n", "yes"), ("NO", "no"), ("Yes.", "yes."), ("", ""),
                                          ("No, there is not.", "no, there is not.")])
def test_pope_strict_parse(text, parsed):
    assert pope_parse_strict(text) == parsed


def _records(task, split, pairs):
    return [{**task.score({"label": label, "split": split}, pred)} for pred, label in pairs]


def test_pope_strict_metrics_are_lmms_evals():
    task = POPEStrict()
    # nine yes questions: one "yes", one "no", seven unparsed "yes." -> recall counts only exact "no" as FN
    out = task.aggregate(_records(task, "random", [("yes", "yes"), ("no", "yes")] + [("Yes.", "yes")] * 7))
    assert out["recall"] == pytest.approx(50.0) and out["precision"] == pytest.approx(100.0)
    assert out["f1"] == pytest.approx(200 / 3)
    assert out["accuracy"] == pytest.approx(100 / 9)
    assert out["yes_ratio"] == pytest.approx(100.0)  # share of ground-truth yes (utils.py lines 74-84)
    llava = POPE().aggregate(_records(POPE(), "random", [("yes", "yes"), ("no", "yes")] + [("Yes.", "yes")] * 7))
    assert llava["recall"] == pytest.approx(800 / 9)


def test_pope_strict_pools_splits_where_llava_averages():
    def both(task):
        return task.aggregate(_records(task, "popular", [("yes", "yes")] * 3) +
                              _records(task, "random", [("yes", "no"), ("no", "yes")]))
    strict, llava = both(POPEStrict()), both(POPE())
    assert strict["f1"] == pytest.approx(75.0)  # TP 3, FP 1, FN 1 pooled
    assert llava["f1"] == pytest.approx(50.0)  # (100 + 0) / 2
    assert strict["popular"]["f1"] == pytest.approx(100.0) and strict["random"]["f1"] == 0.0


# ---- MME: calculation.py parse_pred_ans; lmms-eval lmms_eval/tasks/mme/utils.py lines 48-69 ---------------------
@pytest.mark.parametrize("text, official, lmms_eval", [
    ("Yes", "yes", "yes"), (" no\n", "no", "no"), ("Yes, there is.", "yes", "yes"),
    ("n.o", "other", "no"), ("...yes", "other", "yes"), ("y", "other", "yes"), ("n", "other", "no"),
    ("The answer is yes", "other", "other"), ("", "other", "other"), ("Not at all", "no", "no"),
    ("I don't know", "other", "other"), ("YES.", "yes", "yes"),
])
def test_mme_parsers(text, official, lmms_eval):
    assert mme_parse(text) == official
    assert mme_parse_lmms_eval(text) == lmms_eval


def test_mme_variant_uses_lmms_eval_parsing():
    doc = {"answer": "no", "subtask": "existence", "image_key": "existence/1.jpg"}
    assert tasks.get("mme").score(doc, "n")["score"] == 0.0
    assert tasks.get("mme-lmms-eval").score(doc, "n")["score"] == 1.0


# ---- GQA: LLaVA scripts/convert_gqa_for_eval.py line 14 + official exact match ---------------------------------
@pytest.mark.parametrize("prediction, correct", [
    ("Yes.", True), (" yes\n", True), ("Yes..", True), ("yes .", False), ("Yes!", False), ("(yes)", False),
    ("the yes", False), ("", False), ("yes, it is", False),
])
def test_gqa_exact_match(prediction, correct):
    assert GQA().score({"answer": "yes", "structural": "verify"}, prediction)["score"] == float(correct)


# ---- ScienceQA: LLaVA llava/eval/eval_science_qa.py lines 28-36, 65-77 -----------------------------------------
@pytest.mark.parametrize("text, letter", [
    (" A", "A"), ("A\n", "A"), ("B. a dog", "B"), ("The answer is C.", "C"), ("the answer is C.", None),
    ("(A)", None), ("a", None), ("B.", None), ("The answer is B", None),  # the regex needs a character after X
    ("The answer is A. The answer is B.", None), ("E", None), ("", None), ("I cannot determine the answer.", None),
])
def test_scienceqa_letter(text, letter):
    assert scienceqa_letter(text, 3) == letter


# ---- MMBench: VLMEvalKit vlmeval/utils/matching_util.py lines 18-127 (VERBOSE unset) ----------------------------
OPTIONS = {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}


@pytest.mark.parametrize("text, letter", [
    ("The answer is A.", "A"), ("A", "A"), ("(B)", "B"), ("B.", "B"), (" C\n", "C"), ("Answer: D", "D"),
    ("A cat is on the mat.", "B"),  # "A" is word 1 of 6, not among the last four: the option text decides
    ("I think the answer is B because it purrs at night", "B"),  # too early for the token rule; "answer is B"
    ("b", "Z"), ("A and B", "Z"), ("", "Z"), ("Z", "Z"),
    ("Sorry, I can't help with images of people yet.", "Z"),  # refusal list, line 24-30
    ("a bird", "C"), ("cat or dog", "Z"),
])
def test_mmbench_can_infer(text, letter):
    assert option_letter_static(text, dict(OPTIONS)) == letter


def test_mmbench_text_match_skips_long_predictions():
    assert option_letter_static("cat " * 20, {"A": "dog", "B": "cat"}) == "Z"  # longer than 2x the option texts


# ---- SEED-Bench: lmms-eval lmms_eval/tasks/seedbench/utils.py lines 17-34 ---------------------------------------
@pytest.mark.parametrize("text, answer, correct", [
    ("a", "A", True), ("b.", "B", True), (" C) fish", "C", True), ("d\n", "D", True), ("", "A", False),
    ("The answer is A", "A", False), ("B", "A", False),
])
def test_seedbench_first_letter(text, answer, correct):
    task = tasks.get("seed-bench")
    assert task.score({"answer": answer, "question_type": "1"}, text)["score"] == float(correct)
    assert first_letter(text) == text.strip()[:1]


def test_every_task_names_its_reference():
    for name in tasks.available():
        assert tasks.get(name).reference, name
