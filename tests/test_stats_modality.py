"""Per-modality stats (tokens in, entering the LLM, read by each layer, layer-averaged retention) against what the
stages themselves recorded: SEATS on tiny-qwen2.5-omni with a video and its audio track, a silent video (video only),
and images with a video under an in-LLM reducer (fastv) on tiny-qwen2-vl."""
import pytest
import torch
from PIL import Image

import tokenomy
from tests.test_seats_omni import OPTIONS, record_llm_steps
from tests.test_vlm_omni import clip
from tests.test_vlm_video import random_video
from tokenomy.reducers import seats as seats_module

LAYERS = 4


@pytest.fixture(scope="module")
def seats():
    return tokenomy.load("tiny-qwen2.5-omni", "seats", **OPTIONS)


def record_stage_one(pipeline, monkeypatch):
    """(video kept, audio kept) of every Stage I selection."""
    stage, seen = pipeline.plan.stages[0], []
    select = stage.select

    def recording(image):
        selection = select(image)
        video, audio = seats_module.modality_masks(image)
        kept = torch.zeros(image.num_tokens, dtype=torch.bool)
        kept[selection.kept] = True
        seen.append((int((kept & video).sum()), int((kept & audio).sum())))
        return selection

    monkeypatch.setattr(stage, "select", recording)
    return seen


def test_seats_per_modality_figures_equal_the_stage_records(seats, monkeypatch):
    stage_one, steps = record_stage_one(seats, monkeypatch), record_llm_steps(seats, monkeypatch)
    video = clip(4, frames=12, seconds=6.0)
    (generation,) = seats.generate([None], ["<video>What happens?"], max_new_tokens=2, videos=[video], eos_token_id=None)
    stats = generation.stats
    _, _, info = seats.prepare([None], ["<video>What happens?"], [video])
    positions = info["encoded"][0].tokens.positions
    n_audio = int((positions[:, 1] < 0).sum())
    n_video = len(positions) - n_audio
    assert stats["visual_tokens_in_per_modality"] == {"video": n_video, "audio": n_audio} and n_video and n_audio
    ((video_one, audio_one),) = stage_one[-1:]
    assert stats["visual_tokens_entering_llm_per_modality"] == {"video": video_one, "audio": audio_one}
    assert stats["visual_tokens_entering_llm"] == video_one + audio_one
    first, second, late = steps[-3:]
    assert (first[1], first[2]) == (video_one, audio_one)  # Stage II's first step reads what Stage I let in
    assert stats["visual_tokens_per_layer_per_modality"] == {"video": [video_one, first[3], second[3], late[3]],
                                                            "audio": [audio_one, first[4], second[4], late[4]]}
    assert late[3:] == (0, 0)
    per_modality = stats["layer_averaged_retention_per_modality"]
    assert per_modality["video"] == pytest.approx((video_one + first[3] + second[3]) / (LAYERS * n_video))
    assert per_modality["audio"] == pytest.approx((audio_one + first[4] + second[4]) / (LAYERS * n_audio))
    # The combined figure is their token-weighted mean; each is close to its own target (0.3 video, 0.65 audio)
    # once rounding on a few dozen tokens is allowed for.
    combined = (per_modality["video"] * n_video + per_modality["audio"] * n_audio) / (n_video + n_audio)
    assert stats["layer_averaged_retention"] == pytest.approx(combined)
    assert per_modality["video"] == pytest.approx(0.3, abs=0.06) and per_modality["audio"] == pytest.approx(0.65, abs=0.06)


def test_a_silent_video_is_video_only(seats):
    silent = {"frames": clip(5)["frames"]}
    (generation,) = seats.generate([None], ["<video>What happens?"], max_new_tokens=1, videos=[silent])
    stats = generation.stats
    assert list(stats["visual_tokens_in_per_modality"]) == ["video"] == list(stats["layer_averaged_retention_per_modality"])
    assert stats["visual_tokens_per_layer_per_modality"]["video"] == stats["visual_tokens_per_layer"]
    assert stats["video_audio"] == ["none: not given"]


def test_images_and_a_video_under_an_in_llm_reducer():
    pipeline = tokenomy.load("tiny-qwen2-vl", "fastv", keep=6, layer=2)
    prompt = "Compare <image> with <video> and <image>."
    images = [Image.fromarray(random_video(1, frames=1, height=56, width=84)[0]),
              Image.fromarray(random_video(2, frames=1, height=84, width=56)[0])]
    (generation,) = pipeline.generate([images], [prompt], max_new_tokens=2, videos=[[random_video(3, frames=4)]])
    stats = generation.stats
    _, _, info = pipeline.prepare([images], [prompt], [[random_video(3, frames=4)]])
    sizes = [item.num_tokens_in for item in info["encoded"]]  # in sequence order: image, video, image
    assert stats["visual_tokens_in_per_modality"] == {"image": sizes[0] + sizes[2], "video": sizes[1]}
    assert stats["visual_tokens_entering_llm_per_modality"] == stats["visual_tokens_in_per_modality"]  # fastv acts in the LLM
    by_layer = stats["visual_tokens_per_layer_per_modality"]
    assert [i + v for i, v in zip(by_layer["image"], by_layer["video"])] == stats["visual_tokens_per_layer"]
    assert by_layer["image"][2:] == [6 + 6] * 2 and by_layer["video"][2:] == [6] * 2  # the budget applies per item
    assert by_layer["image"][:2] == [sizes[0] + sizes[2]] * 2
    assert stats["layer_averaged_retention_per_modality"]["video"] == pytest.approx((2 * sizes[1] + 2 * 6) / (LAYERS * sizes[1]))
