"""Frame sampling (decord -> PyAV) on a tiny synthetic MP4, and the Video-MME task built on it."""
import json

import numpy as np
import pytest

from tests.media_fixtures import frame_ids as decoded_frame_ids
from tests.media_fixtures import write_video as write_mp4
from tokenomy.errors import InputError
from tokenomy import io as video
from tokenomy.eval import tasks

N_FRAMES = 16


@pytest.mark.parametrize("backend", ["decord", "av"])
def test_uniform_sampling_is_the_same_on_every_backend(tmp_path, backend):
    path = write_mp4(tmp_path / "v.mp4")
    frames, times, meta = video.load_video(path, n_frames=4, backend=backend)
    expected = np.linspace(0, N_FRAMES - 1, 4).round().astype(int).tolist()  # [0, 5, 10, 15]
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    assert decoded_frame_ids(frames) == expected
    assert meta["backend"] == backend and meta["total_frames"] == N_FRAMES
    assert np.allclose(times, np.array(expected) / 8.0)


def test_more_frames_than_the_video_has_are_clamped(tmp_path):
    frames, _, _ = video.load_video(write_mp4(tmp_path / "v.mp4", n_frames=3), n_frames=8, backend="av")
    assert decoded_frame_ids(frames) == [0, 1, 2]


def test_auto_falls_back_to_pyav_when_decord_fails(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("decoder exploded")
    monkeypatch.setattr(video, "_decord_frames", broken)
    frames, _, meta = video.load_video(write_mp4(tmp_path / "v.mp4"), n_frames=2)
    assert decoded_frame_ids(frames) == [0, 15]
    assert meta["backend"].startswith("av") and "decoder exploded" in meta["backend"]


def test_undecodable_and_missing_videos_are_input_errors(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(InputError, match="junk.mp4"):
        video.load_video(junk, backend="av")
    with pytest.raises(InputError, match="not found"):
        video.load_video(tmp_path / "none.mp4")
    with pytest.raises(InputError, match="unknown video backend"):
        video.load_video(junk, backend="opencv")


def test_videomme_task_rows_and_frames(tmp_path):
    root = tmp_path / "videomme"
    write_mp4(root / "data" / "vid1.mp4")
    rows = [{"question_id": "001-1", "videoID": "vid1", "duration": "short", "question": "What happens?",
             "options": ["A. x", "B. y", "C. z", "D. w"], "answer": "B"},
            {"question_id": "002-1", "videoID": "gone", "duration": "long", "question": "?",
             "options": ["A. x", "B. y", "C. z", "D. w"], "answer": "A"}]
    (root / "videomme.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tasks.get("videomme")
    task.n_frames = 4
    loaded = task.load(tmp_path)
    assert [d["id"] for d in loaded.docs] == ["001-1"] and loaded.errors[0].id == "002-1"
    doc = loaded.docs[0]
    frames = task.media(doc)
    assert len(frames) == 4 and frames[0].size == (32, 32)
    assert task.prompt(doc).endswith("What happens?\nA. x\nB. y\nC. z\nD. w\nThe best answer is:")
    assert task.score(doc, "The best answer is B.")["score"] == 1.0
    assert task.aggregate([task.score(doc, "B"), {**task.score(doc, "A"), "duration": "long"}])["by_duration"] == {"long": 0.0, "short": 100.0}
