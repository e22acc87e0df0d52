"""`tokenomy.load` and the `Pipeline`: prompts + images -> reduced LLM inputs -> generated text with stats."""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenomy.errors import InputError, UnknownNameError
from tokenomy.io import load_image
from tokenomy.reducers import create as create_reducer
from tokenomy.reducers.base import PositionPolicy, Selection, Stage
from tokenomy.vision.base import SignalRequest
from tokenomy.vlm.adapters import ADAPTERS, adapter_for
from tokenomy.vlm.assembly import assemble
from tokenomy.vlm.in_llm import InLLMReduction
from tokenomy.vlm.loading import load_local, missing_folder_error, resolve_dtype
from tokenomy.vlm.tiny import BUILDERS


@dataclass
class Generation:
    text: str
    token_ids: list
    stats: dict = field(default_factory=dict)


def available_models() -> list:
    return sorted(BUILDERS)


def _load_local(path: Path, dtype):
    return load_local(path, dtype, sorted(ADAPTERS))


def load(model, reducer="none", device=None, dtype=None, position_policy=None, **reducer_kwargs) -> "Pipeline":
    dtype = resolve_dtype(dtype)
    reducer_obj = reducer if not isinstance(reducer, str) else create_reducer(reducer, **reducer_kwargs)
    if isinstance(model, str) and model in BUILDERS:
        hf_model, processor = BUILDERS[model]()
        name = model
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.is_dir():
            hf_model, processor = _load_local(path, dtype)
            name = path.name
        elif os.sep in str(model) or path.exists():
            raise missing_folder_error(str(model))
        else:
            raise UnknownNameError("model", str(model), BUILDERS)
    else:
        raise InputError(f"model must be a built-in name or a local folder, got {type(model).__name__}")
    if isinstance(dtype, torch.dtype):
        hf_model = hf_model.to(dtype)
    if device is not None:
        try:
            hf_model = hf_model.to(device)
        except (RuntimeError, AssertionError, ValueError) as exc:  # torch's errors for unknown or absent devices
            raise InputError(f"device {device!r} cannot be used: {exc}") from exc
    return Pipeline(hf_model.eval(), processor, reducer_obj, name=name, position_policy=position_policy)


class Pipeline:
    def __init__(self, model, processor, reducer, name="model", position_policy=None):
        self.model = model
        self.processor = processor
        self.reducer = reducer
        self.name = name
        self.adapter = adapter_for(model, processor)
        policy = position_policy or reducer.position_policy or self.adapter.default_policy
        self.position_policy = PositionPolicy(policy)
        if self.position_policy not in self.adapter.supported_policies:
            raise InputError(
                f"position policy {self.position_policy.value!r} is not supported by {self.adapter.family} models;"
                f" supported: {[p.value for p in self.adapter.supported_policies]}"
            )

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def text_config(self):
        return self.adapter.text_config

    # ---- inputs ---------------------------------------------------------------------------------------------------
    def _normalise(self, images, prompts):
        if isinstance(prompts, str):
            prompts, images = [prompts], [images]
        if images is None:
            images = [None] * len(prompts)
        if len(images) != len(prompts):
            raise InputError(f"got {len(prompts)} prompts but {len(images)} image entries; give one entry per prompt")
        per_prompt = []
        for index, (prompt, entry) in enumerate(zip(prompts, images)):
            if not isinstance(prompt, str):
                raise InputError(f"prompt {index} must be a string, got {type(prompt).__name__}")
            entry = [] if entry is None else entry if isinstance(entry, (list, tuple)) else [entry]
            placeholders = prompt.count("<image>")
            if placeholders and placeholders != len(entry):
                raise InputError(f"prompt {index} has {placeholders} '<image>' placeholders but {len(entry)} images")
            per_prompt.append([load_image(image) for image in entry])
        return prompts, per_prompt

    def prepare(self, images, prompts):
        """Process, encode, reduce before the LLM and assemble. Returns (llm_kwargs, context, info)."""
        prompts, per_prompt = self._normalise(images, prompts)
        texts = [self.adapter.chat_text(p, len(imgs)) for p, imgs in zip(prompts, per_prompt)]
        flat_images = [image for imgs in per_prompt for image in imgs]
        batch = self.adapter.process(texts, flat_images).to(self.device)
        reducer = self.reducer
        pre = reducer.stage in (Stage.PRE_LLM, Stage.POST_PROJECTOR)
        encoded = []
        if flat_images:
            vision, feature_layer = self.adapter.vision, self.adapter.feature_layer
            request = reducer.vision_request(vision.num_layers, feature_layer) if pre else SignalRequest()
            encoded = self.adapter.encode_images(batch, request)
        selections = [reducer.select(image.tokens) if pre else Selection.keep_all(image.tokens) for image in encoded]
        inputs = assemble(self.adapter, batch, encoded, selections, self.position_policy)
        llm_kwargs = dict(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            position_ids=self.adapter.llm_position_ids(inputs.position_ids, inputs.attention_mask),
        )
        in_llm = reducer.stage is Stage.IN_LLM and flat_images
        context = InLLMReduction(self.adapter.decoder_layers, reducer, inputs) if in_llm else nullcontext()
        info = dict(batch=batch, encoded=encoded, selections=selections, inputs=inputs, per_prompt=per_prompt)
        return llm_kwargs, context, info

    # ---- running --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, images, prompts):
        """Prefill logits [B, L', vocab] of the reduced sequence (left-padded)."""
        llm_kwargs, context, _ = self.prepare(images, prompts)
        with context:
            return self.model(**llm_kwargs, use_cache=True).logits

    @torch.no_grad()
    def generate(self, images, prompts, max_new_tokens=32, do_sample=False, **generate_kwargs) -> list:
        timer = _ForwardTimer(self.model)
        start = timer.now()
        llm_kwargs, context, info = self.prepare(images, prompts)
        timer.prepare_ms = (timer.now() - start) * 1e3
        tokenizer = self.adapter.tokenizer
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        if generate_kwargs.get("num_beams", 1) != 1 and self.reducer.stage is Stage.IN_LLM:
            raise InputError("beam search is not supported with in-LLM reducers (the kept sets are per sample)")
        with context, timer:
            output = self.model.generate(**llm_kwargs, max_new_tokens=max_new_tokens, do_sample=do_sample, **generate_kwargs)
        return self._generations(output, context, info, timer)

    def _generations(self, output, context, info, timer):
        tokenizer = self.adapter.tokenizer
        eos = {tokenizer.eos_token_id} | set(_as_list(self.model.generation_config.eos_token_id))
        inputs, encoded, selections = info["inputs"], info["encoded"], info["selections"]
        in_llm = isinstance(context, InLLMReduction)
        num_layers = len(self.adapter.decoder_layers)
        results, image_cursor = [], 0
        for sample, row in enumerate(output.tolist()):
            new_tokens = _strip_after_eos(row, eos, tokenizer.pad_token_id)
            count = len(info["per_prompt"][sample])
            sample_images = encoded[image_cursor : image_cursor + count]
            sample_selections = selections[image_cursor : image_cursor + count]
            image_cursor += count
            visual_in = sum(image.tokens.num_tokens for image in sample_images)
            entered = sum(selection.num_kept for selection in sample_selections)
            kept_indices = [selection.kept.tolist() for selection in sample_selections]
            per_layer = [entered] * num_layers
            if in_llm:
                later = context.selections[sample]
                kept_indices = [[int(i) for i in s.kept.tolist()] for s in later]
                after = sum(s.num_kept for s in later)
                per_layer = [entered] * context.layer + [after] * (num_layers - context.layer)
            stats = dict(
                reducer=self.reducer.name,
                keep=self.reducer.keep,
                position_policy=self.position_policy.value,
                visual_tokens_in=visual_in,
                visual_tokens_kept=per_layer[-1] if per_layer else entered,
                visual_tokens_per_layer=per_layer,
                prefill_tokens=int(inputs.attention_mask[sample].sum()),
                kept_indices=kept_indices,
                new_tokens=len(new_tokens),
                prepare_ms=timer.prepare_ms,
                prefill_ms=timer.prepare_ms + timer.prefill_ms,
                decode_ms=timer.decode_ms,
            )
            text = tokenizer.decode(new_tokens, skip_special_tokens=True)
            results.append(Generation(text=text, token_ids=new_tokens, stats=stats))
        return results


def _as_list(value):
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _strip_after_eos(tokens, eos, pad):
    out = []
    for token in tokens:
        if token in eos:
            break
        out.append(token)
    while out and out[-1] == pad:
        out.pop()
    return out


class _ForwardTimer:
    """Times the first forward of the model (prefill) apart from the rest (decode), synchronising CUDA."""

    def __init__(self, model):
        self.model = model
        self.calls = []
        self.prepare_ms = 0.0
        self.cuda = next(model.parameters()).is_cuda

    def now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def __enter__(self):
        self._pre = self.model.register_forward_pre_hook(lambda *a: self.calls.append([self.now(), None]))
        self._post = self.model.register_forward_hook(lambda *a: self.calls[-1].__setitem__(1, self.now()))
        self.start = self.now()
        return self

    def __exit__(self, *exc):
        self.end = self.now()
        self._pre.remove()
        self._post.remove()

    @property
    def prefill_ms(self):
        return (self.calls[0][1] - self.calls[0][0]) * 1e3 if self.calls else 0.0

    @property
    def decode_ms(self):
        return (self.end - self.calls[0][1]) * 1e3 if self.calls else 0.0
