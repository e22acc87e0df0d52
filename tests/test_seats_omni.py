"""SEATS end to end on tiny-qwen2.5-omni with videos whose audio track is interleaved: the budgets of every stage,
no audio or video position left in any layer's cache after Stage III, greedy decoding equal to a no-cache recompute
that masks the same tokens explicitly, batch of 2 = 2 single runs; and on a Qwen2.5-VL video (video only)."""
import numpy as np
import pytest
import torch

import tokenomy
from tests.test_reduction_plans import recompute_greedy
from tests.test_vlm_omni import clip
from tests.test_vlm_video import random_video
from tokenomy.errors import InputError
from tokenomy.reducers import seats as seats_module
from tokenomy.vlm.pipeline import Pipeline

OPTIONS = dict(video=0.3, audio=0.65, drop_layers="1-2", late_block_layer=4)  # Stage II before layers 1, 2; III before 3
PROMPTS = ["<video>What happens?", "Describe <video> in words."]


@pytest.fixture(scope="module")
def videos():
    return [clip(0), clip(1, frames=12, seconds=6.0)]


@pytest.fixture(scope="module")
def pipeline():
    return tokenomy.load("tiny-qwen2.5-omni", "seats", **OPTIONS)


def with_videos(pipeline, monkeypatch, videos):
    """Let tests/test_reduction_plans helpers (written for images) prepare these prompts with their videos."""
    monkeypatch.setattr(pipeline, "prepare", lambda images, prompts: Pipeline.prepare(pipeline, images, prompts, videos))


def record_llm_steps(pipeline, monkeypatch):
    """(layer, video in, audio in, video kept, audio kept) of every LLM step, per image."""
    stage = pipeline.plan.stages[1]
    seen, select = [], stage.select

    def recording(image):
        selection = select(image)
        video, audio = seats_module.modality_masks(image)
        kept = torch.zeros(image.num_tokens, dtype=torch.bool)
        kept[selection.kept] = True
        seen.append((image.layer, int(video.sum()), int(audio.sum()), int((kept & video).sum()), int((kept & audio).sum())))
        return selection

    monkeypatch.setattr(stage, "select", recording)
    return seen


def test_plan_is_stage_one_after_the_projector_then_the_llm_steps(pipeline):
    assert [stage.site.value for stage in pipeline.plan.stages] == ["post_projector", "llm"]
    assert [layer for layer, _, _ in pipeline._llm_steps] == [1, 2, 3]
    assert pipeline.plan.stages[1].cuts_caches


def test_budgets_of_every_stage(pipeline, videos, monkeypatch):
    steps = record_llm_steps(pipeline, monkeypatch)
    _, _, info = pipeline.prepare([None], PROMPTS[:1], videos[:1])
    positions = info["encoded"][0].tokens.positions
    audio = positions[:, 1] < 0
    video_schedule, audio_schedule = pipeline.plan.stages[0].schedules(4)
    # Stage I: per window of 2 temporal grids / 50 audio tokens, clamp(round(1.4 r |W|), 1, |W|).
    expected_stage_one = 0
    for mask, window, ratio in ((~audio, positions[:, 0] // 2, 1.4 * 0.3), (audio, positions[:, 0] // 50, 1.4 * 0.65)):
        for value in window[mask].unique():
            size = int((window[mask] == value).sum())
            expected_stage_one += max(1, min(size, round(ratio * size)))
    (generation,) = pipeline.generate([None], PROMPTS[:1], max_new_tokens=2, videos=videos[:1])
    per_layer = generation.stats["visual_tokens_per_layer"]
    assert generation.stats["stages"][0]["tokens_out"] == expected_stage_one == per_layer[0]
    # Stage II: B_m = max(1, round(kappa_m * n_m)) per modality at each drop layer; Stage III leaves nothing.
    (first, second, late) = steps[-3:]
    for (layer, n_video, n_audio, kept_video, kept_audio), step in ((first, 0), (second, 1)):
        want_video = max(1, round(video_schedule.keep_ratios[step] * n_video))
        want_audio = max(1, round(audio_schedule.keep_ratios[step] * n_audio))
        assert kept_video + kept_audio == want_video + want_audio
        assert abs(kept_video - want_video) <= 2  # the window split may move a token or two between modalities
    assert [first[0], second[0], late[0]] == [1, 2, 3] and late[3:] == (0, 0)
    assert per_layer == [expected_stage_one, first[3] + first[4], second[3] + second[4], 0]
    in_tokens = generation.stats["visual_tokens_in"]
    assert generation.stats["layer_averaged_retention"] == pytest.approx(sum(per_layer) / (4 * in_tokens))
    # Rounding on a few dozen tokens aside, the realised average is the schedule's (video 0.3, audio 0.65).
    target = (0.3 * int((~audio).sum()) + 0.65 * int(audio.sum())) / in_tokens
    assert generation.stats["layer_averaged_retention"] == pytest.approx(target, abs=0.04)


def test_no_audio_or_video_position_is_left_in_any_cache(pipeline, videos):
    llm_kwargs, context, info = pipeline.prepare([None, None], PROMPTS, videos)
    with context, torch.no_grad():
        output = pipeline.model(**llm_kwargs, use_cache=True)
    cache = output.cache if getattr(output, "cache", None) is not None else output.past_key_values
    inputs = info["inputs"]
    texts = []
    for sample in range(2):
        visual = torch.cat(inputs.visual_slots[sample])
        text = int(inputs.attention_mask[sample].sum()) - len(visual)
        for layer in range(4):
            layout = context.cache_layout[layer][sample]
            assert not bool(torch.isin(layout[layout >= 0], visual).any()), f"layer {layer} still caches a visual token"
            assert int((layout >= 0).sum()) == text
        texts.append(text)
    # Every layer's cache holds the text of the longer prompt (left padding for the other), nothing visual.
    assert [layer.keys.shape[2] for layer in cache.layers] == [max(texts)] * 4


def test_greedy_equals_explicit_masking_and_batch_equals_singles(pipeline, videos, monkeypatch):
    together = pipeline.generate([None, None], PROMPTS, max_new_tokens=4, videos=videos, eos_token_id=None)
    for prompt, video, joint in zip(PROMPTS, videos, together):
        (alone,) = pipeline.generate([None], [prompt], max_new_tokens=4, videos=[video], eos_token_id=None)
        assert alone.token_ids == joint.token_ids
        assert alone.stats["visual_tokens_per_layer"] == joint.stats["visual_tokens_per_layer"]
        assert alone.stats["stages"][0]["tokens_out"] == joint.stats["stages"][0]["tokens_out"]
    with_videos(pipeline, monkeypatch, videos)
    assert [g.token_ids for g in together] == recompute_greedy(pipeline, [None, None], PROMPTS, steps=4)


def test_seats_on_a_qwen25_vl_video_is_video_only():
    pipeline = tokenomy.load("tiny-qwen2.5-vl", "seats", **OPTIONS)
    (generation,) = pipeline.generate([None], ["<video>What happens?"], max_new_tokens=2, videos=[random_video(0, frames=8)])
    per_layer = generation.stats["visual_tokens_per_layer"]
    assert per_layer[0] < generation.stats["visual_tokens_in"] and per_layer[1] <= per_layer[0] and per_layer[3] == 0


def test_seats_options_are_checked_at_load():
    with pytest.raises(InputError, match="not keep"):
        tokenomy.load("tiny-qwen2.5-omni", "seats", keep=8)
    with pytest.raises(InputError, match="video must be a retention fraction"):
        tokenomy.load("tiny-qwen2.5-omni", "seats", video=1.5)
    with pytest.raises(InputError, match="drop_layers"):
        tokenomy.load("tiny-qwen2.5-omni", "seats", drop_layers="a-b")


def test_window_attention_signal_equals_the_last_vision_block_computed_as_seats_does(monkeypatch):
    """The Stage I statistic from transformers' own last ViT block: its attention input and rotary captured by a
    hook, windows of 2 temporal grids over the window-permuted patches, mean over each 2x2 unit, window order undone
    (SEATS baselines/visionzip/modeling_qwen2_5_omni_visionzip.py lines 60-74 and 170-181, at c553732)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index

    pipeline = tokenomy.load("tiny-qwen2.5-vl", "seats", **OPTIONS)
    stage, seen = pipeline.plan.stages[0], []
    select = stage.select
    monkeypatch.setattr(stage, "select", lambda image: seen.append(image.signals["window_attention"][-1]) or select(image))
    _, _, info = pipeline.prepare([None], ["<video>What happens?"], [random_video(5, frames=6, height=112, width=112)])
    batch = info["batch"]
    visual = pipeline.model.model.visual
    captured = {}
    handle = visual.blocks[-1].attn.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(hidden=args[0] if args else kwargs["hidden_states"],
                                                     rotary=kwargs["position_embeddings"]), with_kwargs=True)
    with torch.no_grad():
        visual(batch["pixel_values_videos"], grid_thw=batch["video_grid_thw"])
    handle.remove()
    attn = visual.blocks[-1].attn
    hidden = captured["hidden"]
    q, k, _ = attn.qkv(hidden).reshape(hidden.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = captured["rotary"]
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    t, h, w = batch["video_grid_thw"][0].tolist()
    window_tokens = 2 * h * w
    received = torch.zeros(hidden.shape[0])
    with torch.no_grad():
        for start in range(0, hidden.shape[0], window_tokens):
            qw, kw = q[start:start + window_tokens].transpose(0, 1), k[start:start + window_tokens].transpose(0, 1)
            received[start:start + window_tokens] = ((qw @ kw.transpose(-1, -2)) * attn.scaling).softmax(-1).mean(0).sum(0)
    window_index, _ = get_vision_window_index(batch["video_grid_thw"], spatial_merge_size=2, window_size=visual.window_size,
                                              patch_size=visual.patch_size, kwargs={})
    expected = received.view(-1, 4).mean(-1)[torch.argsort(window_index)]
    assert t == 3 and len(seen) == 1
    assert torch.allclose(seen[0], expected, atol=1e-5)


def test_stage_two_relevance_is_layer_d_minus_1_on_its_own_output(pipeline, videos, monkeypatch):
    """SEATS inner_llm_units.py compute_last_token_qk_scores_full (lines 61-99 at c553732): layer d-1's input norm and
    q/k applied to that layer's OUTPUT, M-RoPE, repeat_kv, the last token's softmax row, mean over heads."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import apply_rotary_pos_emb

    stage, seen = pipeline.plan.stages[1], {}
    select = stage.select
    def recording(image):
        seen.setdefault(image.layer, image.signals.get("last_text_attention_after"))
        return select(image)

    monkeypatch.setattr(stage, "select", recording)
    layer0 = pipeline.adapter.decoder_layers[0]
    captured = {}
    handles = [layer0.register_forward_pre_hook(lambda m, a, k: captured.update(rotary=k["position_embeddings"]), with_kwargs=True),
               layer0.register_forward_hook(lambda m, a, out: captured.update(out=out[0] if isinstance(out, tuple) else out))]
    llm_kwargs, context, info = pipeline.prepare([None], PROMPTS[:1], videos[:1])
    try:
        with context, torch.no_grad():
            pipeline.model(**llm_kwargs, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    attn = layer0.self_attn
    with torch.no_grad():
        normed = layer0.input_layernorm(captured["out"])
        batch, length, _ = normed.shape
        q = attn.q_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)
        cos, sin = captured["rotary"]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        row = ((q[:, :, -1:] @ k.transpose(-1, -2)) / attn.head_dim ** 0.5).softmax(-1).mean(1)[0, 0]
    slots = info["inputs"].visual_slots[0][0]
    assert torch.allclose(seen[1], row[slots], atol=1e-6)


def test_audio_window_attention_is_the_audio_encoders_last_layer_in_2_second_windows(pipeline, videos, monkeypatch):
    """The audio half of Stage I's statistic (SEATS modeling_qwen2_5_omni_visionzip.py lines 226-238 and 355-367 at
    c553732): the last audio layer's q/k, windows of 100 frames (2 s at 50 Hz), then the mean of each frame pair."""
    stage, seen = pipeline.plan.stages[0], []
    select = stage.select
    monkeypatch.setattr(stage, "select", lambda image: seen.append(image) or select(image))
    last = pipeline.model.model.audio_tower.layers[-1].self_attn
    captured = {}
    handle = last.register_forward_pre_hook(lambda m, a, k: captured.update(hidden=a[0] if a else k["hidden_states"]), with_kwargs=True)
    try:
        pipeline.prepare([None], PROMPTS[:1], videos[1:])  # 6 s of audio: 3 windows of 100 frames
    finally:
        handle.remove()
    hidden = captured["hidden"]
    q = last.q_proj(hidden).reshape(len(hidden), last.num_heads, -1).transpose(0, 1)
    k = last.k_proj(hidden).reshape(len(hidden), last.num_heads, -1).transpose(0, 1)
    received = torch.zeros(len(hidden))
    with torch.no_grad():
        for start in range(0, len(hidden), 100):
            received[start:start + 100] = ((q[:, start:start + 100] @ k[:, start:start + 100].transpose(-1, -2)) * last.scaling).softmax(-1).mean(0).sum(0)
    expected = received[: len(received) // 2 * 2].view(-1, 2).mean(-1)
    image = seen[0]
    _, audio = seats_module.modality_masks(image)
    statistic = image.signals["window_attention"][-1]
    assert len(hidden) == 300 and int(audio.sum()) == len(expected) == 150  # 6 s: 50 frames, 25 tokens a second
    assert torch.allclose(statistic[audio], expected, atol=1e-5)
    assert not bool(statistic.isnan().any())
