"""Multiple-choice prompt formatting and the static answer-letter extraction rules of the reference evaluators."""
from __future__ import annotations

import re

LETTERS = "ABCDEFGHIJ"


def format_options(options: list[str]) -> str:
    return "".join(f"\n{LETTERS[i]}. {text}" for i, text in enumerate(options))


def scienceqa_letter(prediction: str, n_choices: int) -> str | None:
    """LLaVA `eval_science_qa.py`: a bare letter, an `X. ` prefix, or exactly one `The answer is X.`; else failed."""
    options = LETTERS[:5]
    if prediction in options:
        letter = prediction
    elif len(prediction) >= 3 and prediction[0] in options and prediction[1:3] == ". ":
        letter = prediction[0]
    else:
        found = re.findall(r"The answer is ([A-Z]).", prediction)
        letter = found[0] if len(found) == 1 else None
    # A letter beyond the question's choices counts as failed, as in get_pred_idx.
    return letter if letter is not None and letter in LETTERS[:n_choices] else None


_OPTION_PUNCTUATION = ".()[],:;!*#{}"


def option_letter_static(prediction: str, options: dict[str, str]) -> str | None:
    """MMBench static extraction (no judge): one option letter standing alone among the words (`A`, `A.`, `(A)`,
    `A:` ...), else one option text contained in the prediction; otherwise None (counted wrong).

    A lone "A" inside a longer sentence is read as the article, not the option, as VLMEvalKit does.
    """
    words = prediction
    for ch in _OPTION_PUNCTUATION:
        words = words.replace(ch, " ")
    tokens = words.split()
    letters = [letter for letter in options if letter in tokens]
    if len(letters) == 1 and not (letters[0] == "A" and len(tokens) > 3):
        return letters[0]
    lowered = prediction.lower()
    matched = [letter for letter, text in options.items() if text and str(text).lower() in lowered]
    return matched[0] if len(matched) == 1 else None


def first_letter(prediction: str) -> str:
    """SEED-Bench: the first character of the stripped prediction."""
    stripped = prediction.strip()
    return stripped[0] if stripped else ""


_VIDEOMME_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                      "The best option is", "The correct option is", "Best answer:", "Best option:")


def videomme_letter(prediction: str) -> str:
    """Video-MME: drop answer prefixes, then the first standalone letter A-D ('' when none)."""
    text = prediction.strip()
    for prefix in _VIDEOMME_PREFIXES:
        text = text.replace(prefix, "")
    found = re.search(r"\b([ABCD])\b", text)
    return found.group(1) if found else ""
