"""Golden vectors for the reference scoring rules (normalisation, soft accuracy, POPE/MME/MMBench aggregation)."""
import itertools

import pytest

from tokenomy.eval.choices import first_letter, mcq_extract_letter, option_letter_static, scienceqa_letter
from tokenomy.eval.tasks.gqa import gqa_normalize
from tokenomy.eval.tasks.mme import MME, mme_parse
from tokenomy.eval.tasks.multiple_choice import MMBench
from tokenomy.eval.tasks.pope import POPE, binary_metrics, pope_parse_llava
from tokenomy.eval.vqa_normalize import normalize_answer, vqa_soft_accuracy


@pytest.mark.parametrize("raw, expected", [
    ("Two.", "2"), ("a dog", "dog"), ("dont", "don't"), ("isnt", "isn't"), ("Whats", "what's"),
    ("The man's hat", "man 's hat"),  # 's split off, article dropped
    ("Yes!", "yes"), ("red, white", "red white"), ("1,000", "1000"), ("3.5", "3.5"),
    ("t-shirt", "t shirt"),  # punctuation not touching a space becomes a space
    ("hot - dog", "hot dog"),  # punctuation next to a space is deleted
    ("None", "0"), ("ten", "10"), ("eleven", "eleven"), ("\tAn apple\n", "apple"),
    ("Is it?", "is it"), ("(left)", "left"), ("end.", "end"), ("e.g.", "eg"),
])
def test_vqa_normalisation_cases(raw, expected):
    assert normalize_answer(raw) == expected


def test_period_quirk_removes_at_most_32_periods():
    # The reference passes re.UNICODE (32) as `count` to re.sub; the 33rd period survives.
    assert normalize_answer("." * 33 + "x") == ".x"


@pytest.mark.parametrize("m, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_soft_accuracy_ten_choose_nine(m, expected):
    answers = ["two"] * m + [f"other{i}" for i in range(10 - m)]
    assert vqa_soft_accuracy("2", answers) == pytest.approx(expected)


def test_soft_accuracy_matches_leave_one_out_definition():
    pool = ["dog", "Dog.", "a dog", "cat", "puppy"]
    for answers in itertools.islice(itertools.product(pool, repeat=10), 0, 400, 7):
        for pred in ("dog", "cat", "bird"):
            norm = [normalize_answer(a) for a in answers]
            brute = sum(min(1.0, sum(norm[j] == normalize_answer(pred) for j in range(10) if j != i) / 3) for i in range(10)) / 10
            assert vqa_soft_accuracy(pred, list(answers)) == pytest.approx(brute)


def test_soft_accuracy_rejects_empty_answers():
    with pytest.raises(ValueError):
        vqa_soft_accuracy("x", [])


def test_gqa_exact_match_normalisation():
    assert gqa_normalize("Yes.") == "yes" and gqa_normalize(" left ") == "left"
    assert gqa_normalize("the left") != gqa_normalize("left")  # GQA matches exactly, no article stripping


@pytest.mark.parametrize("text, parsed", [
    ("No, there is not.", "no"), ("Yes, there is a dog.", "yes"), ("There is no dog", "no"), ("not really", "no"),
    ("Yes. No.", "yes"),  # only the first sentence counts
    ("Nope", "yes"),  # LLaVA's rule looks for the words No/not/no only
])
def test_pope_llava_parsing(text, parsed):
    assert pope_parse_llava(text) == parsed


def test_pope_metrics_and_split_mean():
    pairs = [("yes", "yes")] * 3 + [("yes", "no")] + [("no", "no")] * 2 + [("no", "yes")] * 2
    m = binary_metrics(pairs)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 1, 2, 2)
    assert m["accuracy"] == pytest.approx(62.5)
    assert m["precision"] == pytest.approx(75.0)
    assert m["recall"] == pytest.approx(60.0)
    assert m["f1"] == pytest.approx(100 * 2 * 0.75 * 0.6 / 1.35)
    assert m["yes_ratio"] == pytest.approx(50.0)
    task = POPE()
    records = [{"split": "random", "parsed": p, "label": g} for p, g in pairs] + \
              [{"split": "popular", "parsed": "yes", "label": "yes"}, {"split": "popular", "parsed": "no", "label": "no"}]
    out = task.aggregate(records)
    assert out["popular"]["f1"] == pytest.approx(100.0)
    assert out["f1"] == pytest.approx((out["random"]["f1"] + 100.0) / 2)
    assert out["accuracy"] == pytest.approx((62.5 + 100.0) / 2)


@pytest.mark.parametrize("text, parsed", [("Yes.", "yes"), ("no", "no"), ("No, it isn't", "no"), ("yes, it is", "yes"),
                                          ("The answer is yes", "other"), ("", "other")])
def test_mme_parsing(text, parsed):
    assert mme_parse(text) == parsed


def test_mme_acc_plus_and_category_sums():
    def rec(subtask, image, score):
        return {"subtask": subtask, "image_key": image, "score": score}
    records = [rec("existence", "e1", 1.0), rec("existence", "e1", 1.0), rec("existence", "e2", 1.0), rec("existence", "e2", 0.0),
               rec("count", "c1", 0.0), rec("count", "c1", 0.0),
               rec("code_reasoning", "r1", 1.0), rec("code_reasoning", "r1", 1.0)]
    out = MME().aggregate(records)
    assert out["subtasks"]["existence"]["acc"] == pytest.approx(75.0)
    assert out["subtasks"]["existence"]["acc_plus"] == pytest.approx(50.0)
    assert out["subtasks"]["existence"]["score"] == pytest.approx(125.0)
    assert out["subtasks"]["count"]["score"] == 0.0
    assert out["perception"] == pytest.approx(125.0)
    assert out["cognition"] == pytest.approx(200.0)


@pytest.mark.parametrize("text, n, letter", [("A", 3, "A"), ("B. a dog", 3, "B"), ("The answer is C.", 3, "C"),
                                             ("The answer is A. The answer is B.", 3, None), ("E", 3, None),
                                             ("b", 3, None), ("B.", 3, None)])
def test_scienceqa_letter_rule(text, n, letter):
    assert scienceqa_letter(text, n) == letter


OPTIONS = {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}


@pytest.mark.parametrize("text, letter", [("B", "B"), ("(C) bird", "C"), ("Answer: D.", "D"), ("The answer is C.", "C"),
                                          ("A cat sits on the mat", "B"),  # "A" is the article here; the option text decides
                                          ("A", "A"), ("A or B", "Z"), ("a fish and a bird", "Z"), ("nothing", "Z")])
def test_mmbench_static_extraction(text, letter):
    assert option_letter_static(text, OPTIONS) == letter


def test_mmbench_rotations_and_circular_rule():
    doc = {"id": "7", "index": 7, "group": "7", "question": "q", "hint": "", "options": dict(OPTIONS), "answer": "B",
           "category": "x", "image": None}
    rotations = MMBench.with_rotations([doc])
    assert [d["index"] for d in rotations] == [7, 1_000_007, 2_000_007, 3_000_007]
    assert [d["answer"] for d in rotations] == ["B", "A", "D", "C"]
    assert all(d["options"][d["answer"]] == "cat" for d in rotations)
    assert {d["group"] for d in rotations} == {"7"}
    task = MMBench()
    records = [{**task.score(d, d["answer"]), "rotation": d["index"] // 1_000_000} for d in rotations]
    other = [{**task.score(dict(d, group="8"), "A"), "rotation": d["index"] // 1_000_000} for d in rotations]
    out = task.aggregate(records + other)
    assert out["groups"] == 2
    assert out["accuracy"] == pytest.approx(50.0)  # group 8 answered "A" every time: right once, so it fails
    assert out["single_pass_accuracy"] == pytest.approx(50.0)


def test_first_letter_and_videomme_letter():
    assert first_letter("  B) cat") == "B" and first_letter("") == ""
    assert mcq_extract_letter("The best answer is: C.") == "C"
    assert mcq_extract_letter("(B)") == "B"
    assert mcq_extract_letter("Dog") == "D"  # lmms-eval's last resort: any capital choice letter, even in a word
