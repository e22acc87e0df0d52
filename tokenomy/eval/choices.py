"""Multiple-choice prompt formatting and the static answer-letter extraction rules of the reference evaluators."""
from __future__ import annotations

import re

LETTERS = "ABCDEFGHIJ"


def format_options(options: list[str]) -> str:
    return "".join(f"\n{LETTERS[i]}. {text}" for i, text in enumerate(options))


def scienceqa_letter(prediction: str, n_choices: int) -> str | None:
    """haotian-liu/LLaVA llava/eval/eval_science_qa.py lines 65-77 on the stripped decoded text
    (model_vqa_loader.py line 116): a bare letter A-E, an ``X. `` prefix, or exactly one ``The answer is X.``
    (the regex's ``.`` is any character); a letter outside the question's choices fails (get_pred_idx)."""
    prediction = prediction.strip()
    options = list(LETTERS[:5])  # a list as upstream's --options: "" is not a member
    if prediction in options:
        letter = prediction
    elif len(prediction) >= 3 and prediction[0] in options and prediction[1:3] == ". ":
        letter = prediction[0]
    else:
        found = re.findall(r"The answer is ([A-Z]).", prediction)
        letter = found[0] if len(found) == 1 else None
    return letter if letter is not None and letter in options[:n_choices] else None


_OPTION_PUNCTUATION = ".()[],:;!*#{}"
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def option_letter_static(prediction: str, options: dict[str, str]) -> str:
    """VLMEvalKit's exact matching (no judge), open-compass/VLMEvalKit at e8e78f05:
    vlmeval/utils/matching_util.py ``can_infer`` (lines 18-61 ``can_infer_option``, 107-127 ``can_infer_text``)
    with ``VERBOSE`` unset, and vlmeval/dataset/utils/multiple_choice.py lines 379-383: "Z" when nothing matches.

    A letter standing alone among the words (after deleting ``.()[],:;!*#{}``) counts when it is the only
    option letter present and sits among the last four words; a known refusal or a lone "Z" is "Z"; then
    "answer is X"; then the only option text contained in the prediction (for predictions at most twice as
    long as all option texts together).
    """
    if "Failed to obtain answer via API" in prediction:
        return "Z"
    if any(refusal in prediction for refusal in _REFUSALS):
        return "Z"
    words = prediction
    for ch in _OPTION_PUNCTUATION:
        words = words.replace(ch, " ")
    tokens = words.split()
    present = [letter for letter in options if letter in tokens]
    if len(present) == 1:
        for letter in options:
            if letter in tokens and tokens.index(letter) > len(tokens) - 5:
                return letter
    elif not present and "Z" in tokens:
        return "Z"
    verbose = _VERBOSE_ANSWER.search(prediction)
    if verbose and verbose.group(1).upper() in options:
        return verbose.group(1).upper()
    lowered = prediction.lower()
    if len(lowered) > 2 * sum(len(str(text)) for text in options.values()):
        return "Z"
    matched = [letter for letter, text in options.items() if str(text).lower() in lowered]
    return matched[0] if len(matched) == 1 else "Z"


def first_letter(prediction: str) -> str:
    """lmms-eval lmms_eval/tasks/seedbench/utils.py lines 17-20: the first character of the stripped text."""
    stripped = prediction.strip()
    return stripped[:1]


_VIDEOMME_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                      "The best option is", "The correct option is", "Best answer:", "Best option:")


def videomme_letter(prediction: str) -> str:
    """Video-MME: drop answer prefixes, then the first standalone letter A-D ('' when none)."""
    text = prediction.strip()
    for prefix in _VIDEOMME_PREFIXES:
        text = text.replace(prefix, "")
    found = re.search(r"\b([ABCD])\b", text)
    return found.group(1) if found else ""
