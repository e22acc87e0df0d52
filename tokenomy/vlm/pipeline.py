"""`tokenomy.load` and the `Pipeline`: prompts + images -> reduced LLM inputs -> generated text with stats."""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenomy.errors import InputError, ModelLoadError, UnknownNameError
from tokenomy.io import audio_clip, load_image, video_clip
from tokenomy.reducers.base import INSTRUCTION_EMBEDDINGS, LLM_SIGNALS, ImageTokens, PositionPolicy, Site
from tokenomy.reducers.plan import Plan, build_plan
from tokenomy.vision.base import CLS_ATTENTION, CLS_VALUE_SIMILARITY
from tokenomy.vision.reference import BUILTIN_ENCODERS
from tokenomy.vlm.adapters import ADAPTERS, MEDIA_MARKERS, adapter_for
from tokenomy.vlm.assembly import assemble
from tokenomy.vlm.in_llm import LLMRun, Step
from tokenomy.vlm.loading import load_local, missing_folder_error, resolve_dtype
from tokenomy.vlm.sites import StageRecord, encoder_requests, run_vision_stages, union_request
from tokenomy.vlm.tiny import BUILDERS, NOT_YET_SHIPPED
from tokenomy.vlm.views import TokenView, owners


@dataclass
class Generation:
    text: str
    token_ids: list
    stats: dict = field(default_factory=dict)
    # Per image or video of the prompt, in stats order: a TokenView (tokenomy/vlm/views.py) of what its tokens became,
    # for tokenomy.vis; None for a video or an audio. Kept out of `stats`, which stays JSON.
    views: list = field(default_factory=list)


def available_models() -> list:
    return sorted(BUILDERS)


def _load_local(path: Path, dtype):
    return load_local(path, dtype, sorted(ADAPTERS))


def load(model, reducer="none", device=None, dtype=None, position_policy=None, keep=None, **reducer_options) -> "Pipeline":
    """A Pipeline over a built-in or local model.

    reducer: a registered name, a stacked spec string (`vtc-cls:keep=32+fastv`), a Reducer, a list of them or a Plan.
    keep: the last stage's budget. position_policy: contiguous, keep or multi (default: the family's). Other keyword
    arguments are reducer options (`name.key=value` for one stage of a stacked spec).
    """
    plan = build_plan(reducer, keep=keep, **reducer_options)
    dtype = resolve_dtype(dtype)
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
        elif str(model) in NOT_YET_SHIPPED:
            raise ModelLoadError(f"{model}: the model built by the real recipe on ref-clip is not shipped: trained on a "
                                 f"tower that reads neither shapes nor the word, it answers about half of synthvqa "
                                 f"(issue 14); the end-to-end one is {NOT_YET_SHIPPED[str(model)]!r} "
                                 f"(docs/reference-models.md)")
        elif str(model) in BUILTIN_ENCODERS:
            raise InputError(f"{model} is a vision encoder, not a vision-language model: load it with "
                             f"tokenomy.vision.load({str(model)!r})")
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
    return Pipeline(hf_model.eval(), processor, plan, name=name, position_policy=position_policy)


class Pipeline:
    def __init__(self, model, processor, reducer, name="model", position_policy=None):
        self.model = model
        self.processor = processor
        self.name = name
        self.adapter = adapter_for(model, processor)
        self.plan = _expanded(build_plan(reducer), self.adapter.family)
        self.position_policy = self._policy(position_policy)
        self._check_plan()

    @property
    def reducer(self):
        """The last stage of the plan (the one `keep` budgets)."""
        return self.plan.last

    def _policy(self, requested) -> PositionPolicy:
        wanted = self.plan.required_policy()
        try:
            policy = PositionPolicy(requested) if requested is not None else wanted or self.adapter.default_policy
        except ValueError:
            raise InputError(f"position_policy {requested!r} is not one of {[p.value for p in PositionPolicy]}") from None
        if wanted is not None and policy is not wanted:
            raise InputError(f"reducer spec {self.plan.spec!r} needs position_policy={wanted.value!r}, got {policy.value!r}")
        if policy not in self.adapter.supported_policies:
            raise InputError(
                f"position policy {policy.value!r} is not supported by {self.adapter.family} models;"
                f" supported: {[p.value for p in self.adapter.supported_policies]}"
            )
        if policy is PositionPolicy.MULTI and self.plan.multi_rotary(self.adapter.text_config) is None:
            raise InputError(f"position_policy='multi' needs a stage that supplies a multi-position rotary; {self.plan.spec!r} has none")
        return policy

    def _check_plan(self):
        """Everything that can be checked before the first request: layers in range, signals the encoder can give."""
        vision = self.adapter.vision
        num_layers, feature = vision.num_layers, self.adapter.layers_run - 1
        self._encoder_requests = encoder_requests(self.plan.at(Site.ENCODER), num_layers, self.adapter.layers_run)
        for stage in self.plan.at(Site.ENCODER):
            if stage.merges_in_encoder and not vision.takes_encoder_merges:
                raise InputError(
                    f"{stage.name} merges tokens between vision-encoder layers, which the {type(vision).__name__} of "
                    f"{self.adapter.family} models cannot take (it keeps its 2x2 merge units whole); prune there, or merge "
                    "after the encoder (e.g. visionzip, pool)"
                )
        vision_stages = [s for s in self.plan.stages if s.site is not Site.LLM]
        for stage in vision_stages:
            request = stage.vision_request(num_layers, feature)
            names = set(request.layers)
            if not vision.has_cls and names & {CLS_ATTENTION, CLS_VALUE_SIMILARITY}:
                raise InputError(
                    f"{stage.name} needs the CLS attention row, but the {type(vision).__name__} of {self.adapter.family} models "
                    f"has no CLS token; use a reducer that does not need one (e.g. random, fastv)"
                )
            request.resolve(num_layers)
        self._llm_steps = []
        for stage in self.plan.at(Site.LLM):
            layers = stage.llm_layers(len(self.adapter.decoder_layers))
            if not layers:
                raise InputError(f"{stage.name} acts in the LLM but names no layer")
            for layer in layers:
                if not 1 <= layer < len(self.adapter.decoder_layers):
                    raise InputError(f"{stage.name} acts before LLM layer {layer}, which must be in 1..{len(self.adapter.decoder_layers) - 1}")
                request = tuple(stage.llm_request(layer))
                unknown = set(request) - set(LLM_SIGNALS)
                if unknown:
                    raise InputError(f"{stage.name} asks for unknown LLM signal(s) {sorted(unknown)}; known: {list(LLM_SIGNALS)}")
                self._llm_steps.append((layer, stage, request))
        order = {id(stage): rank for rank, stage in enumerate(self.plan.stages)}
        self._llm_steps.sort(key=lambda item: (item[0], order[id(item[1])]))

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def text_config(self):
        return self.adapter.text_config

    # ---- inputs ---------------------------------------------------------------------------------------------------
    def _normalise(self, images, prompts, videos=None, audios=None):
        """(prompts, images per prompt, videos per prompt, audios per prompt). A video is a file path (read by
        tokenomy.io.load_video), a tokenomy.io.VideoFile, or a uint8 [T, H, W, 3] RGB frame array (or {"frames": ...,
        "audio": ...}); an audio is a file path or float32 [S] samples at 16 kHz mono; a prompt's entry is one of them or
        a list. Models that hear (Qwen2.5-Omni) read a video file's audio track with it."""
        if isinstance(prompts, str):
            prompts, images, videos, audios = [prompts], [images], [videos], [audios]
        given = {"image": images, "video": videos, "audio": audios}
        for kind in given:
            given[kind] = [None] * len(prompts) if given[kind] is None else given[kind]
            if len(given[kind]) != len(prompts):
                raise InputError(f"got {len(prompts)} prompts but {len(given[kind])} {kind} entries; give one entry per prompt")
        per_prompt, videos_per_prompt, audios_per_prompt = [], [], []
        for index, (prompt, entry, clips, sounds) in enumerate(zip(prompts, *given.values())):
            if not isinstance(prompt, str):
                raise InputError(f"prompt {index} must be a string, got {type(prompt).__name__}")
            entry, clips, sounds = ([] if item is None else list(item) if isinstance(item, (list, tuple)) else [item]
                                    for item in (entry, clips, sounds))
            for marker, items, kind in (("<image>", entry, "images"), ("<video>", clips, "videos"), ("<audio>", sounds, "audios")):
                placeholders = prompt.count(marker)
                if placeholders and placeholders != len(items):
                    raise InputError(f"prompt {index} has {placeholders} '{marker}' placeholders but {len(items)} {kind}")
            if clips and not self.adapter.supports_video:
                raise InputError(f"{self.adapter.family} models do not read videos; use a Qwen2-VL, Qwen2.5-VL or Qwen2.5-Omni "
                                 "model, or pass a video's frames as images")
            if sounds and not self.adapter.reads_audio:
                raise InputError(f"{self.adapter.family} models do not hear audio; use a Qwen2.5-Omni model")
            self._refuse_reserved_tokens(index, prompt)
            per_prompt.append([self._prepared(load_image(image)) for image in entry])
            videos_per_prompt.append([video_clip(clip, with_audio=self.adapter.reads_audio) for clip in clips])
            audios_per_prompt.append([audio_clip(sound) for sound in sounds])
        return prompts, per_prompt, videos_per_prompt, audios_per_prompt

    def _prepared(self, image):
        for stage in self.plan.stages:
            image = stage.prepare_image(image, self.processor)
        return image

    def _user_token_ids(self, prompt) -> list:
        """Token ids of the user's own words: no chat template, and tokenomy's media markers left out."""
        for marker in MEDIA_MARKERS:
            prompt = prompt.replace(marker, " ")
        return self.adapter.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def _refuse_reserved_tokens(self, index, prompt):
        """The model's own image/video tokens in a user's text would be read as placeholders; '<image>' is ours."""
        config = self.model.config
        reserved = {getattr(config, name, None) for name in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                              "vision_end_token_id", "audio_token_id", "audio_start_token_id",
                                                              "audio_end_token_id")} - {None}
        ids = self._user_token_ids(prompt)
        found = sorted(set(ids) & reserved)
        if found:
            names = self.adapter.tokenizer.convert_ids_to_tokens(found)
            raise InputError(f"prompt {index} contains the model's reserved token(s) {names}; mark images with '<image>', "
                             "videos with '<video>' and audios with '<audio>'")

    def _check_lengths(self, inputs, max_new_tokens):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        limit = getattr(self.adapter.text_config, "max_position_embeddings", None)
        if limit is None:
            return
        positions = inputs.position_ids if inputs.position_ids.dim() == 2 else inputs.position_ids.amax(dim=0)
        last = (positions * inputs.attention_mask).amax(dim=-1)
        for sample, position in enumerate(last.tolist()):
            if position + max_new_tokens >= limit:
                raise InputError(
                    f"prompt {sample} needs positions up to {position + max_new_tokens} ({int(inputs.attention_mask[sample].sum())} "
                    f"prefill tokens + max_new_tokens={max_new_tokens}), beyond this model's {limit}; shorten the prompt"
                )

    def prepare(self, images, prompts, videos=None, audios=None, contexts=None):
        """Process, encode, run the vision-site stages and assemble. Returns (llm_kwargs, context, info).

        contexts: per prompt, a dict added to the context of every post-projector stage of its images (the eval runner
        hands a task's sample description this way to the synthvqa oracle diagnostics)."""
        prompts, per_prompt, videos_per_prompt, audios_per_prompt = self._normalise(images, prompts, videos, audios)
        if contexts is not None and len(contexts) != len(prompts):
            raise InputError(f"got {len(prompts)} prompts but {len(contexts)} contexts; give one dict per prompt")
        texts = [self.adapter.chat_text(p, len(imgs), len(clips), len(sounds))
                 for p, imgs, clips, sounds in zip(prompts, per_prompt, videos_per_prompt, audios_per_prompt)]
        flat_images = [image for imgs in per_prompt for image in imgs]
        flat_videos = [clip for clips in videos_per_prompt for clip in clips]
        flat_audios = [sound for sounds in audios_per_prompt for sound in sounds]
        batch = self.adapter.process(texts, flat_images, flat_videos, flat_audios).to(self.device)
        vision = self.adapter.vision
        num_layers, feature = vision.num_layers, self.adapter.layers_run - 1
        records = {id(stage): StageRecord(stage.name, stage.site) for stage in self.plan.stages}
        encoded, final = [], []
        if flat_images or flat_videos or flat_audios:
            requests = [stage.vision_request(num_layers, feature) for stage in self.plan.stages if stage.site is not Site.LLM]
            encoder_stages = self.plan.at(Site.ENCODER)
            encoded = self.adapter.encode_images(batch, union_request(requests), encoder_stages, self._encoder_requests, records)
            items_per_prompt = [imgs + clips + sounds for imgs, clips, sounds in zip(per_prompt, videos_per_prompt, audios_per_prompt)]
            site_contexts = self._post_projector_contexts(prompts, items_per_prompt, contexts)
            for index, image in enumerate(encoded):
                tokens = run_vision_stages(self.plan.at(Site.PRE_PROJECTOR), image.tokens, image.signals, num_layers, feature, index, records)
                tokens = ImageTokens(image.project(tokens.features), tokens.positions, sources=tokens.sources, context=site_contexts[index])
                tokens = run_vision_stages(self.plan.at(Site.POST_PROJECTOR), tokens, image.signals, num_layers, feature, index, records)
                final.append(tokens)
        m = self.plan.positions_per_token() if self.position_policy is PositionPolicy.MULTI else 1
        inputs = assemble(self.adapter, batch, encoded, final, self.position_policy, m)
        llm_kwargs = dict(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            position_ids=self.adapter.llm_position_ids(inputs.position_ids, inputs.attention_mask),
        )
        context = self.llm_context(inputs, records if encoded else None)
        # Stats count a prompt's images, videos and audios together, in the order they were encoded.
        items = [imgs + clips + sounds for imgs, clips, sounds in zip(per_prompt, videos_per_prompt, audios_per_prompt)]
        audio = [[note for _, _, note in clips] for clips in videos_per_prompt]
        info = dict(batch=batch, encoded=encoded, final=final, inputs=inputs, per_prompt=items, records=records, audio=audio)
        return llm_kwargs, context, info

    def _post_projector_contexts(self, prompts, items_per_prompt, given=None) -> list:
        """Per image or video, what the post-projector site knows of its sample's prompt: the LLM input embeddings of
        the user's own words (chat template and media markers left out, so the instruction is all it holds), and the
        sample's `given` context."""
        if not self.plan.at(Site.POST_PROJECTOR):
            return [{} for items in items_per_prompt for _ in items]
        contexts = []
        for sample, (prompt, images) in enumerate(zip(prompts, items_per_prompt)):
            ids = self._user_token_ids(prompt)
            with torch.no_grad():
                embeddings = self.adapter.embed(torch.tensor(ids, dtype=torch.long, device=self.device))
            extra = given[sample] if given is not None else {}
            contexts.extend({**extra, INSTRUCTION_EMBEDDINGS: embeddings} for _ in images)
        return contexts

    def llm_context(self, inputs, records, replay=None):
        """The LLM-site hooks for one batch (a no-op context when no stage acts in the LLM and positions are single)."""
        steps = [Step(layer, stage, records[id(stage)], request) for layer, stage, request in self._llm_steps] if records else []
        rotary = self.plan.multi_rotary(self.adapter.text_config) if self.position_policy is PositionPolicy.MULTI else None
        if not steps and rotary is None:
            return nullcontext()
        return LLMRun(self.adapter, steps, inputs, multi_rotary=rotary, replay=replay)

    # ---- running --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, images, prompts, videos=None, audios=None, contexts=None):
        """Prefill logits [B, L', vocab] of the reduced sequence (left-padded)."""
        llm_kwargs, context, info = self.prepare(images, prompts, videos, audios, contexts)
        self._check_lengths(info["inputs"], 1)
        with context:
            return self.model(**llm_kwargs, use_cache=True).logits

    @torch.no_grad()
    def generate(self, images, prompts, max_new_tokens=32, do_sample=False, videos=None, audios=None, contexts=None,
                 **generate_kwargs) -> list:
        """videos / audios: per prompt a video / audio or a list of them ('<video>' / '<audio>' in the prompt marks where
        each goes). contexts: see `prepare`."""
        timer = _ForwardTimer(self.model)
        start = timer.now()
        llm_kwargs, context, info = self.prepare(images, prompts, videos, audios, contexts)
        self._check_lengths(info["inputs"], max_new_tokens)
        timer.prepare_ms = (timer.now() - start) * 1e3
        tokenizer = self.adapter.tokenizer
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
        if generate_kwargs.get("num_beams", 1) != 1 and isinstance(context, LLMRun):
            raise InputError("beam search is not supported with LLM-site reducers or multi positions (the kept sets are per sample)")
        with context, timer:
            output = self.model.generate(**llm_kwargs, max_new_tokens=max_new_tokens, do_sample=do_sample, **generate_kwargs)
        return self._generations(output, context, info, timer)

    def _generations(self, output, context, info, timer):
        tokenizer = self.adapter.tokenizer
        eos = {tokenizer.eos_token_id} | set(_as_list(self.model.generation_config.eos_token_id))
        inputs, encoded, final, records = info["inputs"], info["encoded"], info["final"], info["records"]
        run = context if isinstance(context, LLMRun) and context.steps else None
        num_layers = len(self.adapter.decoder_layers)
        results, image_cursor = [], 0
        for sample, row in enumerate(output.tolist()):
            new_tokens = _strip_after_eos(row, eos, tokenizer.pad_token_id)
            count = len(info["per_prompt"][sample])
            image_ids = list(range(image_cursor, image_cursor + count))
            image_cursor += count
            visual_in = sum(encoded[i].num_tokens_in for i in image_ids)
            entered = sum(final[i].num_tokens for i in image_ids)
            surviving = [inputs.visual_positions[sample][k] for k in range(count)]
            per_layer = [entered] * num_layers
            layer_positions = [[final[i].positions for i in image_ids]] * num_layers
            if run is not None:
                surviving = [image["positions"] for image in run.samples[sample].images]
                per_layer = run.visual_per_layer[sample]
                layer_positions = run.positions_per_layer[sample]
            items = [encoded[i] for i in image_ids]
            counted = _by_modality(items, [item.tokens.positions for item in items], [item.num_tokens_in for item in items])
            modalities_in = {name: tokens for name, tokens in counted.items() if tokens}
            present = lambda counts: {name: counts.get(name, 0) for name in modalities_in}
            modalities_entering = present(_by_modality(items, [final[i].positions for i in image_ids]))
            modalities_per_layer = [present(_by_modality(items, layer)) for layer in layer_positions]
            kept_indices = [encoded[i].index_of(positions[:, 0] if positions.dim() == 3 else positions).tolist()
                            for i, positions in zip(image_ids, surviving)]
            stats = dict(
                reducer=self.plan.spec,
                keep=self.plan.keep,
                position_policy=self.position_policy.value,
                visual_tokens_in=visual_in,
                visual_tokens_kept=per_layer[-1] if per_layer else entered,
                visual_tokens_per_layer=per_layer,
                # What SEATS budgets count: the visual tokens each LLM layer reads, averaged, over those that came in.
                layer_averaged_retention=sum(per_layer) / (len(per_layer) * visual_in) if per_layer and visual_in else 1.0,
                visual_tokens_entering_llm=entered,
                # The same per modality ("image", "video", "audio": those the prompt holds), which SEATS budgets apart.
                visual_tokens_in_per_modality=modalities_in,
                visual_tokens_entering_llm_per_modality=modalities_entering,
                visual_tokens_per_layer_per_modality={name: [layer[name] for layer in modalities_per_layer] for name in modalities_in},
                layer_averaged_retention_per_modality={
                    name: sum(layer[name] for layer in modalities_per_layer) / (num_layers * tokens)
                    for name, tokens in modalities_in.items()},
                prefill_tokens=int(inputs.attention_mask[sample].sum()),
                kept_indices=kept_indices,
                stages=[records[id(stage)].summary(image_ids) for stage in self.plan.stages],
                video_audio=info["audio"][sample],
                new_tokens=len(new_tokens),
                prepare_ms=timer.prepare_ms,
                prefill_ms=timer.prepare_ms + timer.prefill_ms,
                decode_ms=timer.decode_ms,
            )
            text = tokenizer.decode(new_tokens, skip_special_tokens=True)
            llm_merged = run is not None and any(selection.merge_index is not None
                                                 for (_, owner, _), selection in run.selections.items() if owner == sample)
            views = [_view(encoded[i], final[i], kept, llm_merged) for i, kept in zip(image_ids, kept_indices)]
            results.append(Generation(text=text, token_ids=new_tokens, stats=stats, views=views))
        return results


def _view(encoded, final, kept: list, llm_merged: bool):
    """The TokenView of one image (None where its adapter defines no picture, as for videos). It holds only the small
    tensors it needs (positions, sources, the image's pixels), not the features."""
    if encoded.view is None:
        return None
    picture, index_of, total = encoded.view, encoded.index_of, encoded.num_tokens_in
    first = final.positions[:, 0] if final.positions.dim() == 3 else final.positions
    sources, before = final.sources, encoded.tokens
    encoder_merged = before.sources is not None
    if not encoder_merged:  # source columns are the rows of the encoder's output
        columns = before.positions[:, 0] if before.positions.dim() == 3 else before.positions
    else:  # ... or the encoder's own columns
        columns = encoded.source_index if encoded.source_index is not None and len(encoded.source_index) == before.sources.shape[1] else None

    def build() -> dict:
        pixels, boxes = picture()
        traced = columns if encoder_merged else index_of(columns)
        survivors = torch.tensor(kept, dtype=torch.long)
        owner, known = owners(total, survivors, index_of(first), sources, traced)
        return dict(pixels=pixels, boxes=boxes, kept=survivors, owner=owner, groups_known=known and not llm_merged)

    return TokenView(build)


def _by_modality(items: list, positions: list, totals: list | None = None) -> dict:
    """Tokens per modality of a sample's items, given each item's token positions: an image's are "image"; a video's
    are "video", except those adapters place at (j, -1, -1), its audio track's ("audio"). `totals`: each item's
    unreduced token count, which an encoder-site stage may have cut before these positions were taken."""
    counts = {}
    for number, (item, where) in enumerate(zip(items, positions)):
        rows = where if where.dim() == 2 else where[:, 0]
        audio = int((rows[:, 1] < 0).sum()) if item.token_ids else 0
        total = len(rows) if totals is None else totals[number]
        for name, tokens in (("video" if item.token_ids else "image", total - audio), ("audio", audio)):
            counts[name] = counts.get(name, 0) + tokens
    return counts


def _expanded(plan: Plan, family: str) -> Plan:
    """The plan with each stage replaced by the stages it runs as on this model family (`Reducer.expand`)."""
    stages = [part for stage in plan.stages for part in stage.expand(family)]
    if len(stages) == len(plan.stages) and all(a is b for a, b in zip(stages, plan.stages)):
        return plan
    return Plan(stages, plan.spec)


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
