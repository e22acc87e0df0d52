"""Small media files written with PyAV inside the tests: a video whose frame i is grey level 10 + 15 i (so a decoded
frame tells its index), optionally with a 440 Hz audio track; no downloaded media."""
import av
import numpy as np

FPS = 8


def frame_value(i):
    return 10 + 15 * i  # far enough apart to survive lossy coding


def frame_ids(frames):
    return [int(round((frame.mean() - 10) / 15)) for frame in frames]


def write_video(path, n_frames=16, size=32, audio_seconds=None, audio_rate=44100, audio_stream=None, audio_codec="aac"):
    """mpeg4 video of `n_frames` at FPS; `audio_seconds` adds a stereo AAC 440 Hz tone; `audio_stream=True` with
    audio_seconds=None adds an audio stream that never gets a sample (keep one in an .avi: MP4 drops empty streams)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("mpeg4", rate=FPS)
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        audio = None
        if audio_seconds is not None or audio_stream:
            audio = container.add_stream(audio_codec, rate=audio_rate)
            audio.layout = "stereo"
        container.start_encoding()
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), frame_value(i), np.uint8), format="rgb24")
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if audio is not None and audio_seconds:
            tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(int(audio_seconds * audio_rate)) / audio_rate)
            chunk = 1024
            for start in range(0, tone.size, chunk):
                piece = np.zeros((2, chunk), np.float32)
                piece[:, : tone[start:start + chunk].size] = tone[start:start + chunk]
                frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout="stereo")
                frame.sample_rate, frame.pts = audio_rate, start
                for packet in audio.encode(frame):
                    container.mux(packet)
            for packet in audio.encode():
                container.mux(packet)
    return path
