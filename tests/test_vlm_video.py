"""Videos through the Qwen2-VL / Qwen2.5-VL adapters and `Pipeline.generate(..., videos=...)`: identity with stock
transformers (so the ViT's per-frame attention, the M-RoPE video positions and the spans are right), images and
videos mixed in one prompt, batch = singles under a reducer, a file path read by tokenomy.io, clear errors."""
import numpy as np
import pytest
import torch

import tokenomy
from tests.conftest import random_images
from tests.media_fixtures import write_video
from tokenomy.errors import InputError

QWEN = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]


def random_video(seed, frames=4, height=56, width=84):
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("family", QWEN)
def test_video_logits_equal_stock_model(family):
    pipeline = tokenomy.load(family, "none")
    prompts = ["<video>What happens?", "First <image> then <video>: same scene?"]
    images, videos = [None, random_images(1)], [random_video(0), random_video(1, frames=6)]
    _, _, info = pipeline.prepare(images, prompts, videos)
    batch = info["batch"]
    assert int(batch["video_grid_thw"][:, 0].max()) > 1, "a video of several temporal grids"
    with torch.no_grad():
        stock = pipeline.model(**batch).logits
    ours = pipeline.forward(images, prompts, videos)
    assert ours.shape == stock.shape
    assert (ours - stock).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", QWEN)
def test_video_batch_equals_singles_and_budget_counts_videos(family):
    pipeline = tokenomy.load(family, "random", keep=10)
    prompts = ["<video>What happens?", "Describe <video> please."]
    videos = [random_video(2), random_video(3, frames=6, height=84)]
    together = pipeline.generate([None, None], prompts, max_new_tokens=4, videos=videos)
    for prompt, video, joint in zip(prompts, videos, together):
        (alone,) = pipeline.generate([None], [prompt], max_new_tokens=4, videos=[video])
        assert alone.token_ids == joint.token_ids and alone.stats["kept_indices"] == joint.stats["kept_indices"]
        assert joint.stats["visual_tokens_kept"] == 10 < joint.stats["visual_tokens_in"]


def test_video_file_path_reads_through_tokenomy_io(tmp_path):
    pipeline = tokenomy.load("tiny-qwen2-vl", "none")
    path = write_video(tmp_path / "clip.mp4", n_frames=16, size=56)
    (from_path,) = pipeline.generate(None, "<video>What happens?", max_new_tokens=3, videos=path)
    from tokenomy.io import load_video

    frames, _, _ = load_video(path)
    (from_frames,) = pipeline.generate(None, "<video>What happens?", max_new_tokens=3, videos=frames)
    assert from_path.token_ids == from_frames.token_ids and from_path.stats["visual_tokens_in"] == from_frames.stats["visual_tokens_in"]


def test_video_errors_name_the_problem():
    with pytest.raises(InputError, match="tiny-llava|llava models do not read videos"):
        tokenomy.load("tiny-llava", "none").generate(None, "<video>?", videos=random_video(0))
    qwen = tokenomy.load("tiny-qwen2-vl", "none")
    with pytest.raises(InputError, match="2 '<video>' placeholders but 1 videos"):
        qwen.generate(None, "<video> and <video>?", videos=random_video(0))
    with pytest.raises(InputError, match="uint8 \\[T, H, W, 3\\]"):
        qwen.generate(None, "<video>?", videos=np.zeros((4, 56, 56), np.uint8))


@pytest.mark.parametrize("family", QWEN)
def test_ppe_on_videos_clusters_each_super_frame_and_matches_singles(family):
    """PPE end to end on videos: every merged token's members come from one super-frame (one t of the merged grid),
    and a batch equals single runs."""
    pipeline = tokenomy.load(family, "ppe:ppe_k=1,ratio=0.5")  # the tiny models' mrope_section carries K = 1
    prompts = ["<video>What happens?", "Describe <video> please."]
    videos = [random_video(4, frames=6), random_video(5, frames=4, height=84)]
    together = pipeline.generate([None, None], prompts, max_new_tokens=3, videos=videos)
    _, _, info = pipeline.prepare([None, None], prompts, videos)
    for prompt, video, joint, tokens, encoded in zip(prompts, videos, together, info["final"], info["encoded"]):
        (alone,) = pipeline.generate([None], [prompt], max_new_tokens=3, videos=[video])
        assert alone.token_ids == joint.token_ids and alone.stats["kept_indices"] == joint.stats["kept_indices"]
        frames = encoded.tokens.positions[:, 0]
        per_frame = {int(t): int((frames == t).sum()) for t in frames.unique()}
        assert len(per_frame) > 1, "a video of several super-frames"
        merged = tokens.positions[:, 0] if tokens.positions.dim() == 2 else tokens.positions[:, 0, 0]
        assert {int(t): int((merged == t).sum()) for t in merged.unique()} == {t: -(-n // 2) for t, n in per_frame.items()}
