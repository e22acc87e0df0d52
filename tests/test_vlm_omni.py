"""The Qwen2.5-Omni thinker adapter on tiny-qwen2.5-omni: a video with its audio track interleaved per 2 s chunk
(TMRoPE), identical to the stock thinker; greedy = stock generate; batch = singles under a reducer; a file with an
audio track read by tokenomy.io, a file without one read as video only and said in the stats."""
import numpy as np
import pytest
import torch

import tokenomy
from tests.media_fixtures import write_video
from tokenomy.errors import InputError


def clip(seed, frames=8, seconds=4.0, side=56):
    rng = np.random.default_rng(seed)
    tone = 0.3 * np.sin(2 * np.pi * (300 + 100 * seed) * np.arange(int(16000 * seconds)) / 16000)
    return {"frames": rng.integers(0, 256, (frames, side, side, 3), dtype=np.uint8), "audio": tone.astype(np.float32)}


@pytest.fixture(scope="module")
def omni():
    return tokenomy.load("tiny-qwen2.5-omni", "none")


def test_interleaved_video_and_audio_equal_the_stock_thinker(omni):
    prompts = ["<video>What happens?", "Describe <video> in words, please."]
    videos = [clip(0), clip(1, frames=12, seconds=6.0)]
    _, _, info = omni.prepare([None, None], prompts, videos)
    batch = info["batch"]
    tokens = batch["input_ids"][1].tolist()
    video_id, audio_id = omni.adapter.video_token_id, omni.adapter.audio_token_id
    runs = [token for index, token in enumerate(tokens) if token in (video_id, audio_id) and (index == 0 or tokens[index - 1] != token)]
    assert runs[:4] == [video_id, audio_id, video_id, audio_id], "video and audio interleave per chunk"
    with torch.no_grad():
        stock = omni.model(**batch).logits
    ours = omni.forward([None, None], prompts, videos)
    assert ours.shape == stock.shape and (ours - stock).abs().max().item() <= 1e-5
    with torch.no_grad():
        stock_ids = omni.model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=omni.adapter.tokenizer.pad_token_id)
    for generation, row in zip(omni.generate([None, None], prompts, max_new_tokens=5, videos=videos),
                               stock_ids[:, batch["input_ids"].shape[1]:].tolist()):
        assert generation.token_ids == row[: len(generation.token_ids)]


@pytest.mark.parametrize("reducer", ["random", "fastv"])
def test_reduced_omni_batch_equals_singles(reducer):
    """Baselines act on a video's audio and video tokens together (one item)."""
    pipeline = tokenomy.load("tiny-qwen2.5-omni", reducer, keep=20)
    prompts, videos = ["<video>What happens?", "Describe <video>."], [clip(2), clip(3, frames=12, seconds=6.0)]
    together = pipeline.generate([None, None], prompts, max_new_tokens=4, videos=videos)
    for prompt, video, joint in zip(prompts, videos, together):
        (alone,) = pipeline.generate([None], [prompt], max_new_tokens=4, videos=[video])
        assert alone.token_ids == joint.token_ids and alone.stats["kept_indices"] == joint.stats["kept_indices"]
        assert joint.stats["visual_tokens_kept"] == 20 < joint.stats["visual_tokens_in"]


def test_files_with_and_without_audio(omni, tmp_path):
    heard = write_video(tmp_path / "heard.mp4", n_frames=16, size=56, audio_seconds=2.0)
    (with_audio,) = omni.generate(None, "<video>What happens?", max_new_tokens=3, videos=heard)
    assert with_audio.stats["video_audio"][0].endswith("16000 Hz mono")
    silent = write_video(tmp_path / "silent.mp4", n_frames=16, size=56)
    (video_only,) = omni.generate(None, "<video>What happens?", max_new_tokens=3, videos=silent)
    assert video_only.stats["video_audio"] == ["none: the file has no audio stream"]
    assert video_only.stats["visual_tokens_in"] < with_audio.stats["visual_tokens_in"]
