"""Encoder-site stages on tiny-qwen2.5-omni: they act in the ViT, on images and on a video's frames, and a heard
video's audio tokens all reach the later sites. Images pass the reduction-plan checks (batch = singles, stats =
what each layer read, greedy = no-cache recompute, SDPA = eager); pruning a heard video's units after the last ViT
block equals pruning the same units before the LLM; a batch of a heard video, a silent one and an audio = singles."""
import numpy as np
import pytest
import torch

import tokenomy
from tests.test_omni_audio import tone
from tests.test_reduction_plans import EncoderPrune, KeepUnits, check_plan
from tests.test_vlm_omni import clip
from tokenomy.reducers import Selection, Site


class KeepVideoUnits(KeepUnits):
    """Keeps every third merged video unit (by its grid position, whatever order tokens come in) and every audio token."""

    name = "test-keep-video-units"

    def select(self, image):
        audio = image.positions[:, 1] < 0
        raster = image.positions[:, 0] * 10_000 + image.positions[:, 1] * 100 + image.positions[:, 2]
        return Selection.from_indices(image, torch.nonzero(audio | (raster % 3 == 0)).squeeze(1))


def test_images_on_omni_pass_the_plan_checks():
    generations = check_plan(tokenomy.load("tiny-qwen2.5-omni", EncoderPrune(keep=5)))
    assert all(g.stats["stages"][0]["site"] == "encoder" for g in generations)
    assert all(len(kept) == 5 for g in generations for kept in g.stats["kept_indices"])


def test_pruning_a_heard_video_after_the_last_block_equals_pruning_before_the_llm():
    prompts, videos = ["<video>What happens?", "Describe <video> please."], [clip(0), clip(1, frames=12, seconds=6.0)]
    encoder = tokenomy.load("tiny-qwen2.5-omni", KeepVideoUnits(Site.ENCODER, layer=1))
    after = tokenomy.load("tiny-qwen2.5-omni", KeepVideoUnits(Site.PRE_PROJECTOR))
    pruned_in_vit = encoder.forward([None, None], prompts, videos)
    assert pruned_in_vit.shape == after.forward([None, None], prompts, videos).shape
    assert (pruned_in_vit - after.forward([None, None], prompts, videos)).abs().max().item() <= 1e-5
    (generation,) = encoder.generate([None], prompts[:1], max_new_tokens=1, videos=videos[:1])
    _, _, info = tokenomy.load("tiny-qwen2.5-omni", "none").prepare([None], prompts[:1], videos[:1])
    positions = info["encoded"][0].tokens.positions
    heard = positions[:, 1] < 0
    units = positions[~heard]
    kept_units = int(((units[:, 0] * 10_000 + units[:, 1] * 100 + units[:, 2]) % 3 == 0).sum())
    assert generation.stats["visual_tokens_entering_llm_per_modality"] == {"video": kept_units, "audio": int(heard.sum())}
    assert kept_units < len(units)


def test_a_mixed_batch_under_an_encoder_stage_equals_singles():
    pipeline = tokenomy.load("tiny-qwen2.5-omni", EncoderPrune(keep=5))
    prompts = ["<video>What happens?", "Describe <video> in words.", "<audio> and <video>?"]
    videos = [clip(2), {"frames": clip(3)["frames"]}, {"frames": clip(4, frames=4)["frames"]}]
    audios = [None, None, tone(440, 1.0)]
    together = pipeline.generate([None] * 3, prompts, max_new_tokens=3, videos=videos, audios=audios, eos_token_id=None)
    for prompt, video, audio, joint in zip(prompts, videos, audios, together):
        (alone,) = pipeline.generate([None], [prompt], max_new_tokens=3, videos=[video], audios=[audio], eos_token_id=None)
        assert alone.token_ids == joint.token_ids and alone.stats["kept_indices"] == joint.stats["kept_indices"]
    # The stage keeps 5 units of each video; a track's audio tokens and a standalone audio are left whole.
    entering = [g.stats["visual_tokens_entering_llm_per_modality"] for g in together]
    assert entering[0]["video"] == entering[1]["video"] == entering[2]["video"] == 5
    assert entering[0]["audio"] == together[0].stats["visual_tokens_in_per_modality"]["audio"] == 100
    assert entering[2]["audio"] == 25
