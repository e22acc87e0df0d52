"""tokenomy inside lmms-eval: `lmms-eval --model tokenomy --model_args pretrained=DIR,reducer=SPEC,keep=K --tasks ...`.

lmms-eval finds this model through its `lmms_eval.models` entry-point group (pyproject.toml ->
tokenomy/eval/lmms_eval_model.py, which names this class without importing it); the class is lmms-eval's "simple"
kind (a prompt string plus the task's visuals per request). Its harness does everything else (tasks, filters,
scoring, output files). Each batch of `--batch_size` requests that share generation settings is one
`Pipeline.generate` call. Only imported by lmms-eval (it needs lmms_eval).
"""
from __future__ import annotations

import json

from lmms_eval.api.model import lmms

import tokenomy
from tokenomy.errors import InputError

DEFAULT_MAX_NEW_TOKENS = 128  # lmms-eval's models generate this many when a task does not say


class TokenomyLMMS(lmms):
    """pretrained: a local model folder or a built-in name (ref-llava-e2e, tiny-llava, ...). reducer: a registered reducer
    or a stacked spec. keep: the last stage's budget. Other keys are reducer options (`name.key=value` for one stage of
    a stacked spec), as `tokenomy.load` takes them. batch_size, max_batch_size and device come from lmms-eval's own
    flags; max_batch_size only caps `--batch_size auto`, which this model refuses (give a number)."""

    is_simple = True

    def __init__(self, pretrained: str = "ref-llava-e2e", reducer: str = "none", keep=None, position_policy=None,
                 device=None, dtype=None, batch_size=1, max_batch_size=None, **reducer_options):
        super().__init__()
        try:
            self.batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise InputError(f"batch_size must be a whole number for the tokenomy model, got {batch_size!r}") from None
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}")
        self.pipeline = tokenomy.load(str(pretrained), reducer=reducer, keep=keep, position_policy=position_policy,
                                      device=device, dtype=dtype, **reducer_options)

    def generate_until(self, requests) -> list:
        answers = [None] * len(requests)
        for indices in self._batches(requests):
            kwargs = requests[indices[0]].args[1]
            until, generate_kwargs = _generation_settings(kwargs)
            prompts, images, videos = [], [], []
            for index in indices:
                context, _, doc_to_visual, doc_id, task, split = requests[index].args
                visuals = _flat(doc_to_visual(self.task_dict[task][split][doc_id])) if doc_to_visual else []
                prompts.append(context)
                images.append([v for v in visuals if not isinstance(v, str)] or None)
                videos.append([v for v in visuals if isinstance(v, str)] or None)
            if not any(videos):
                videos = None
            generations = self.pipeline.generate(images, prompts, videos=videos, **generate_kwargs)
            for index, generation in zip(indices, generations):
                text = generation.text
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                answers[index] = text
                self.cache_hook.add_partial("generate_until", (requests[index].args[0], kwargs), text)
        return answers

    def _batches(self, requests) -> list:
        """Request indices in runs of at most batch_size with identical generation settings, in request order."""
        groups = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        return [group[start:start + self.batch_size] for group in groups.values() for start in range(0, len(group), self.batch_size)]

    def loglikelihood(self, requests):
        raise NotImplementedError("the tokenomy model answers generate_until tasks only (no loglikelihood scoring)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the tokenomy model answers single-round generate_until tasks only")


def _flat(visuals) -> list:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return [item for visual in visuals for item in _flat(visual)]
    return [visuals]


def _generation_settings(kwargs: dict) -> tuple:
    """(stop strings, Pipeline.generate keyword arguments) from a task's generation_kwargs."""
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(kwargs.get("temperature", 0) or 0)
    sample = bool(kwargs.get("do_sample", False)) or temperature > 0
    settings = dict(max_new_tokens=int(kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)), do_sample=sample)
    if sample:
        settings["temperature"] = temperature or 1.0
        if kwargs.get("top_p") is not None:
            settings["top_p"] = float(kwargs["top_p"])
    if int(kwargs.get("num_beams", 1) or 1) > 1:
        settings["num_beams"] = int(kwargs["num_beams"])
    return until, settings
