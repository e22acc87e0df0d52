"""What lmms-eval does to every generated answer before a task's own scoring sees it.

EvolvingLMMs-Lab/lmms-eval at 75571cfe: lmms_eval/evaluator.py lines 1225-1233 run
lmms_eval/api/reasoning.py ``strip_reasoning_tags`` (lines 5-36) with the tag pairs of the default
``--reasoning_tags`` (lmms_eval/__main__.py lines 309-314; none of the tasks scored here overrides it), and then
lmms_eval/api/task.py lines 1586-1590 strip the text again.
"""
from __future__ import annotations

DEFAULT_REASONING_TAGS = (("<think>", "</think>"), ("<analysis>", "</analysis>"))


def lmms_eval_response(text: str) -> str:
    """Drop each complete ``<think>...</think>`` (then ``<analysis>...</analysis>``) block, the first opening tag to
    the next closing tag, while the text holds both tags; when only closing tags are left, keep what follows the
    last one. Then strip whitespace."""
    for opening, closing in DEFAULT_REASONING_TAGS:
        while opening in text and closing in text:
            start = text.find(opening)
            end = text.find(closing, start)
            if end == -1:  # the closing tags all come before the first opening one
                break
            text = text[:start] + text[end + len(closing):]
        if closing in text and opening not in text:
            # chat templates that pre-fill the opening tag leave the model only the closing one
            text = text.rsplit(closing, 1)[-1]
    return text.strip()
