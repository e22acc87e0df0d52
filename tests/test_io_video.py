"""Video and audio input (tokenomy.io): decord and PyAV agree frame for frame, sampling by count, fps and indices,
audio at 16 kHz mono, and each bad input a clear InputError or a documented video-only result."""
import numpy as np
import pytest

from tests.media_fixtures import FPS, frame_ids, write_video
from tokenomy import io
from tokenomy.errors import InputError


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("media") / "clip.mp4", n_frames=16, audio_seconds=2.0)


@pytest.mark.parametrize("indices", [[0, 1, 2], [3, 7, 11, 15], [15, 0, 8]])
def test_decord_and_pyav_return_the_same_frames(clip, indices):
    by_decord, times_decord, meta_decord = io.load_video(clip, indices=indices, backend="decord")
    by_av, times_av, meta_av = io.load_video(clip, indices=indices, backend="av")
    assert meta_decord["backend"] == "decord" and meta_av["backend"] == "av"
    assert frame_ids(by_av) == indices
    assert by_decord.shape == by_av.shape == (len(indices), 32, 32, 3)
    # Both bundle an FFmpeg mpeg4 decoder; the RGB conversion may round differently by a level or two.
    assert np.abs(by_decord.astype(int) - by_av.astype(int)).max() <= 2
    assert np.allclose(times_decord, times_av) and np.allclose(times_av, np.array(indices) / FPS)


@pytest.mark.parametrize("backend", ["decord", "av"])
def test_sampling_by_fps_spreads_duration_times_rate_frames(clip, backend):
    frames, times, meta = io.load_video(clip, fps=2, backend=backend)  # 16 frames at 8 fps = 2 s -> 4 frames
    assert frame_ids(frames) == [0, 5, 10, 15] and meta["total_frames"] == 16
    frames, _, _ = io.load_video(clip, fps=100, max_frames=6, backend=backend)
    assert frame_ids(frames) == np.linspace(0, 15, 6).round().astype(int).tolist()


def test_frames_past_the_end_are_refused_and_a_larger_count_is_every_frame(clip):
    for backend in ("decord", "av"):
        with pytest.raises(InputError, match=r"has 16 frames .*\[3, 16\]"):
            io.load_video(clip, indices=[3, 16], backend=backend)
    frames, _, _ = io.load_video(clip, n_frames=40, backend="av")
    assert frame_ids(frames) == list(range(16))


def test_pyav_keeps_only_the_sampled_frames(clip, monkeypatch):
    """A long video is never held whole: only the wanted frames are converted, and decoding stops after the last."""
    import av

    converted = []
    real = av.VideoFrame.to_ndarray

    def counting(frame, *args, **kwargs):
        converted.append(frame.pts)
        return real(frame, *args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "to_ndarray", counting)
    frames, _, _ = io.load_video(clip, indices=[2, 4], backend="av")
    assert frame_ids(frames) == [2, 4] and len(converted) == 2


def test_auto_falls_back_to_pyav_when_decord_is_missing(clip, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_decord(name, *args, **kwargs):
        if name == "decord":
            raise ImportError("No module named 'decord'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_decord)
    frames, _, meta = io.load_video(clip, n_frames=2)
    assert frame_ids(frames) == [0, 15] and meta["backend"].startswith("av (after decord: not installed")


def test_audio_is_16khz_mono_float(clip):
    audio = io.load_audio(clip)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.size / 16000 - 2.0) < 0.1  # 2 s of tone (AAC adds a few ms of priming)
    spectrum = np.abs(np.fft.rfft(audio[4000:20000]))
    assert abs(np.argmax(spectrum) * 16000 / 16000 - 440) <= 2  # the tone survived resampling from 44.1 kHz stereo
    frames, _, same, meta = io.load_video_and_audio(clip, n_frames=4)
    assert frame_ids(frames) == [0, 5, 10, 15] and np.array_equal(same, audio)
    assert meta["audio"] == f"{audio.size} samples, 16000 Hz mono"


def test_video_without_audio_stream_reads_as_video_only(tmp_path):
    silent = write_video(tmp_path / "silent.mp4", n_frames=4)
    frames, _, audio, meta = io.load_video_and_audio(silent, n_frames=2)
    assert audio is None and meta["audio"] == "none: the file has no audio stream" and frame_ids(frames) == [0, 3]
    with pytest.raises(InputError, match="silent.mp4: the file has no audio stream"):
        io.load_audio(silent)


def test_empty_audio_track_reads_as_video_only(tmp_path):
    muted = write_video(tmp_path / "muted.avi", n_frames=4, audio_stream=True, audio_codec="pcm_s16le")
    _, _, audio, meta = io.load_video_and_audio(muted, n_frames=2)
    assert audio is None and meta["audio"] == "none: the audio track is empty (0 samples)"
    with pytest.raises(InputError, match="muted.avi: the audio track is empty"):
        io.load_audio(muted)


def test_bad_videos_are_input_errors(tmp_path, clip):
    empty = write_video(tmp_path / "empty.avi", n_frames=0)  # AVI keeps a video stream with 0 frames
    with pytest.raises(InputError, match="empty.avi has no frames"):
        io.load_video(empty)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(InputError, match="cannot decode video .*junk.mp4.*decord.*av"):
        io.load_video(junk)
    with pytest.raises(InputError, match="cannot decode audio of .*junk.mp4"):
        io.load_audio(junk)
    with pytest.raises(InputError, match="not found"):
        io.load_video(tmp_path / "none.mp4")
    with pytest.raises(InputError, match="at most one of"):
        io.load_video(clip, n_frames=4, fps=2)
    with pytest.raises(InputError, match="fps must be > 0"):
        io.load_video(clip, fps=0)
