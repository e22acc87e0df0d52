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


# Word for word as lmms-eval lists them: the list order decides nothing, but a phrase missing here would.
_MCQ_ANSWER_PHRASES = ("the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
                       "best answer is", "the correct option is", "correct option is", "the best option is",
                       "best option is", "the choice is", "choice is", "the correct choice is", "correct choice is",
                       "i choose", "i select", "i pick", "my answer is", "my choice is",
                       "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは")
# (text before the letter, text after it, rank): a higher rank wins, then the later position.
_MCQ_MARKED_FORMS = (("(", ")", 6), ("", ".", 5), ("", ":", 4), ("", ")", 3), ("", " ", 2))
_MCQ_RANK_START, _MCQ_RANK_END, _MCQ_RANK_PHRASE = 10, 9, 7


def mcq_extract_letter(prediction: str, choices: str = "ABCD") -> str:
    """lmms-eval lmms_eval/tasks/_task_utils/mcq_extract.py ``extract_mcq_answer`` (lines 66-158, at 75571cfe), as
    lmms_eval/tasks/videomme/utils.py lines 256-259 call it with choices A-D; "" when no letter is found.

    The text is stripped, then ``,.!?;:'"`` are stripped from its ends one after the other and it is padded with a
    space each side. Candidates: the last "(X)", "X.", "X:", "X)", "X " (ranks 6 to 2); the first X anywhere after
    the first occurrence of each answer phrase (rank 7, phrase found case-insensitively, X case-sensitively);
    a standalone X at the start (10) or end (9). The highest rank wins, then the later position. Only when there is
    no candidate at all does the last X anywhere, even inside a word ("Dog" -> D), count.
    """
    if not prediction.strip():
        return ""
    text = prediction.strip()
    for mark in ",.!?;:'\"":
        text = text.strip(mark)
    padded = f" {text} "
    candidates: list[tuple[int, int, str]] = []  # (rank, position, letter)
    for before, after, rank in _MCQ_MARKED_FORMS:
        for letter in choices:
            position = padded.rfind(before + letter + after)
            if position != -1:
                candidates.append((rank, position, letter))
    lowered = padded.lower()
    for phrase in _MCQ_ANSWER_PHRASES:
        phrase_at = lowered.find(phrase)
        if phrase_at == -1:
            continue
        for letter in choices:
            # the offset found in the lowered text indexes the original one, as upstream does
            position = padded.find(letter, phrase_at + len(phrase))
            if position != -1:
                candidates.append((_MCQ_RANK_PHRASE, position, letter))
    core = padded.strip()
    for letter in choices:
        if core.startswith(letter) and (len(core) == 1 or not core[1].isalpha()):
            candidates.append((_MCQ_RANK_START, 0, letter))
        if core.endswith(letter) and (len(core) == 1 or not core[-2].isalpha()):
            candidates.append((_MCQ_RANK_END, len(padded) - 1, letter))
    if not candidates:
        candidates = [(0, padded.rfind(letter), letter) for letter in choices if letter in padded]
    return max(candidates)[2] if candidates else ""
