"""Task registry: `get(name)` returns a fresh task object, `available()` lists the names."""
from __future__ import annotations

from tokenomy.errors import UnknownNameError
from tokenomy.eval.tasks.base import LoadResult, Task
from tokenomy.eval.tasks.gqa import GQA, GQALmmsEval
from tokenomy.eval.tasks.mme import MME, MMELmmsEval
from tokenomy.eval.tasks.multiple_choice import MMBench, MMBenchJudge, ScienceQAImg, SEEDBenchImage
from tokenomy.eval.tasks.pope import POPE, POPEStrict
from tokenomy.eval.tasks.videomme import VideoMME
from tokenomy.eval.tasks.synthvqa import SynthVQA
from tokenomy.eval.tasks.vqa import (TextVQA, TextVQANoOCR, TextVQAVQAEval, VizWiz, VizWizVQAEval, VQAJsonl, VQAv2,
                                     VQAv2VQAEval)

_TASKS = {cls.name: cls for cls in (VQAv2, VQAv2VQAEval, TextVQA, TextVQANoOCR, TextVQAVQAEval, VizWiz, VizWizVQAEval,
                                      GQA, GQALmmsEval, POPE, POPEStrict, MME, MMELmmsEval, ScienceQAImg, MMBench, MMBenchJudge,
                                      SEEDBenchImage, VideoMME, VQAJsonl, SynthVQA)}


def available() -> list[str]:
    return list(_TASKS)


def get(name: str) -> Task:
    if name not in _TASKS:
        raise UnknownNameError("task", name, _TASKS)
    return _TASKS[name]()


__all__ = ["LoadResult", "Task", "available", "get"]
