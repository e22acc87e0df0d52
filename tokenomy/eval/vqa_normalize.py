"""VQA answer normalisation and the 10-choose-9 soft accuracy, in the two conventions papers use.

- EvalAI (``vqa_soft_accuracy``): haotian-liu/LLaVA ``llava/eval/m4c_evaluator.py`` lines 7-257
  (``EvalAIAnswerProcessor`` + ``TextVQAAccuracyEvaluator``, copied from facebookresearch/mmf): the
  prediction and every ground truth go through word_tokenize, punctuation, digits/articles/contractions.
  LLaVA submits VQAv2 / VizWiz predictions through the same processor (scripts/convert_*_for_submission.py).
- vqaEval.py (``vqaeval_soft_accuracy``): GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``
  lines 69-155: only newline/tab replacement and strip, and punctuation + digits/articles on both sides only
  when the ground truths are not all identical; no word_tokenize (no lowercasing of the raw text, no "'s"
  split), and its own digit-comma pattern.

Quirks of the reference code are kept on purpose because published numbers were computed with them.
"""
from __future__ import annotations

import re

PUNCTUATIONS = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The reference look-behind is written `(?!<=\d)`, which is a look-ahead for the literal "<=": in effect every
# period not followed by a digit is removed. Kept verbatim for parity.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
VQAEVAL_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")  # vqaEval.py line 63: exactly one comma between digits
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}

# Spellings without apostrophe -> the apostrophe form, as in the reference table (including its oddities such as
# "somebody'd" -> "somebodyd" and capitalised keys that never match lowercased text).
_CONTRACTION_PAIRS = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|couldnt've couldn't've
didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|hadn'tve hadn't've|hasnt hasn't
havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's
Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|itd've it'd've|it'dve it'd've|itll it'll
let's let's|maam ma'am|mightnt mightn't|mightnt've mightn't've|mightn'tve mightn't've|mightve might've
mustnt mustn't|mustve must've|neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't
ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's
shouldve should've|shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd
somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's
someoned someone'd|someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's
somethingd something'd|somethingd've something'd've|something'dve something'd've|somethingll something'll
thats that's|thered there'd|thered've there'd've|there'dve there'd've|therere there're|theres there's
theyd they'd|theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas
wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're
whats what's|whatve what've|whens when's|whered where'd|wheres where's|whereve where've|whod who'd
whod've who'd've|who'dve who'd've|wholl who'll|whos who's|whove who've|whyll why'll|whyre why're|whys why's
wont won't|wouldve would've|wouldnt wouldn't|wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all
yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd
youd've you'd've|you'dve you'd've|youll you'll|youre you're|youve you've
"""
CONTRACTIONS = dict(pair.split() for line in _CONTRACTION_PAIRS.split("\n") for pair in line.split("|") if pair.strip())


def word_tokenize(text: str) -> str:
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def process_punctuation(text: str, comma_strip: re.Pattern = COMMA_STRIP) -> str:
    out = text
    has_digit_comma = comma_strip.search(text) is not None
    for p in PUNCTUATIONS:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The reference passes re.UNICODE (== 32) as the `count` argument: at most 32 periods are removed.
    return PERIOD_STRIP.sub("", out, re.UNICODE)


def process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """EvalAI answer processor: tokenise, whitespace, punctuation, number words / articles / contractions."""
    text = word_tokenize(text)
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_soft_accuracy(prediction: str, answers: list[str]) -> float:
    """Mean over the human answers g_i of min(1, #{j != i: g_j == pred} / 3); both sides normalised.

    Prediction and ground truth are both normalised always (the EvalAI server / lmms-eval / TextVQA-evaluator
    convention).
    """
    if not answers:
        raise ValueError("vqa_soft_accuracy needs at least one ground-truth answer")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    matches = sum(g == pred for g in gts)
    total = 0.0
    for g in gts:
        others_matching = matches - (g == pred)
        total += min(1.0, others_matching / 3.0)
    return total / len(gts)


def vqaeval_soft_accuracy(prediction: str, answers: list[str]) -> float:
    """GT-Vision-Lab vqaEval.py ``evaluate`` (lines 86-112) for one question.

    Leave-one-out is by answer position: upstream compares answer dicts that carry a unique answer_id.
    """
    if not answers:
        raise ValueError("vqaeval_soft_accuracy needs at least one ground-truth answer")

    def clean(text: str) -> str:
        return text.replace("\n", " ").replace("\t", " ").strip()

    def normalise(text: str) -> str:
        return process_digit_article(process_punctuation(text, VQAEVAL_COMMA_STRIP))

    pred, gts = clean(prediction), [clean(a) for a in answers]
    if len(set(gts)) > 1:
        pred, gts = normalise(pred), [normalise(g) for g in gts]
    matches = sum(g == pred for g in gts)
    return sum(min(1.0, (matches - (g == pred)) / 3.0) for g in gts) / len(gts)


SOFT_ACCURACY = {"evalai": vqa_soft_accuracy, "vqaeval": vqaeval_soft_accuracy}
