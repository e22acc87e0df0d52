"""Images, videos and audio in, or an InputError naming the file.

Images: a file path, encoded bytes or a PIL image -> the RGB picture a processor expects.

What is done to every image, so that none is silently wrong:
- EXIF orientation is applied (a phone photo taken upright is upright);
- 16-bit and 32-bit greyscale (modes I;16*, I) are scaled from 0..65535 to 0..255 instead of clipped at 255, and
  float greyscale (mode F) is read as 0..1 when its maximum is at most 1, else as 0..255;
- transparency is composited onto white, as transformers' own `convert_to_rgb` does;
- images wider or taller than 200:1 are refused: Qwen2-VL processors refuse them, and the others would stretch
  the short side into a resize of hundreds of thousands of pixels;
- files over PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, 2 x 89.5 megapixels) are refused.

Videos (`load_video`): decord first, PyAV when decord is missing, not supported on the platform or fails on the file
(ecosystem.md §6.3). Every backend uses one index rule, `linspace(0, total - 1, n).round()`, so a video yields the
same frames whichever decodes it; only the sampled frames are kept, so a long video never sits in memory whole.
- `n_frames` asks for that many frames (fewer when the video is shorter: every frame once); `fps` for that rate
  over the video's duration, at most `max_frames`; `indices` for exact frames, and one past the end is an error.
- A file that no backend can open, or a video stream with 0 frames, is an InputError.
Audio (`load_audio`, `load_video_and_audio`): the first audio stream, resampled by PyAV to 16 kHz mono float32;
`audio_clip` takes a standalone audio as a file or as such samples (an empty one, or NaN samples, is an InputError).
A video without an audio stream, or with an empty one, reads as video only: `load_video_and_audio` returns None
for the audio and says why in meta["audio"]; `load_audio` itself refuses such a file.
"""
from __future__ import annotations

import io
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tokenomy.errors import InputError

MAX_ASPECT_RATIO = 200
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
VIDEO_BACKENDS = ("decord", "av")
VIDEO_BACKEND_ENV = "TOKENOMY_VIDEO_BACKEND"
DEFAULT_FRAMES = 8
MAX_FRAMES = 768  # the most frames SEATS' lmms-eval wrapper samples (reducers.md §5.6)
AUDIO_SAMPLE_RATE = 16000  # what Whisper-style audio encoders (Qwen2.5-Omni) read


def load_image(image, name: str | None = None) -> Image.Image:
    """An RGB PIL image from a path, bytes or a PIL image; `name` labels bytes and PIL images in error messages."""
    if isinstance(image, Image.Image):
        return to_rgb(image, name or f"<PIL image {image.width}x{image.height}, mode {image.mode}>")
    if isinstance(image, (str, os.PathLike)):
        return _open(image, name or str(image))
    if isinstance(image, (bytes, bytearray)):
        return _open(io.BytesIO(bytes(image)), name or "<image bytes>")
    raise InputError(f"an image must be a PIL image, a file path or encoded bytes, got {type(image).__name__}")


def _open(source, name: str) -> Image.Image:
    try:
        with Image.open(source) as opened:
            opened.load()  # decode now, so a truncated file fails here and not deep inside the processor
            return to_rgb(opened, name)
    except InputError:
        raise
    except FileNotFoundError as exc:
        raise InputError(f"image file not found: {name}") from exc
    except Image.DecompressionBombError as exc:
        raise InputError(f"image {name} is too large to decode safely ({exc}); if you trust the file, raise "
                         "PIL.Image.MAX_IMAGE_PIXELS before loading it") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"cannot read image {name}: {exc}") from exc


def to_rgb(image: Image.Image, name: str) -> Image.Image:
    width, height = image.size
    if width == 0 or height == 0:
        raise InputError(f"image {name} is empty ({width}x{height} pixels)")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InputError(f"image {name} is {width}x{height} pixels, an aspect ratio over {MAX_ASPECT_RATIO}:1, which "
                         "vision processors cannot resize sensibly (Qwen2-VL refuses it); crop or pad it first")
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        image = Image.fromarray(_wide_grey_to_8bit(image), mode="L")
    if image.mode in ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    try:
        return image.convert("RGB")
    except ValueError as exc:  # modes PIL cannot convert to RGB (e.g. LAB, HSV)
        raise InputError(f"cannot convert image {name} from mode {image.mode} to RGB: {exc}") from exc


def _wide_grey_to_8bit(image: Image.Image) -> np.ndarray:
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


# ---- video ---------------------------------------------------------------------------------------------------------

def uniform_indices(total: int, n_frames: int) -> np.ndarray:
    """`n_frames` indices spread evenly over `total` frames, first and last included; every frame once if fewer."""
    n = min(int(n_frames), total)
    return np.linspace(0, total - 1, n).round().astype(np.int64)


def _wanted_indices(total: int, native_fps: float, name: str, n_frames, fps, indices, max_frames) -> np.ndarray:
    if total <= 0:
        raise InputError(f"video {name} has no frames")
    if indices is not None:
        wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
        if wanted.size and (int(wanted.min()) < 0 or int(wanted.max()) >= total):
            raise InputError(f"video {name} has {total} frames (0..{total - 1}); frames {wanted.tolist()} were asked for")
        return wanted
    if fps is not None:
        duration = total / native_fps if native_fps > 0 else total
        n_frames = max(1, int(round(duration * fps)))
    return uniform_indices(total, min(n_frames, max_frames))


def _decord_frames(path: Path, pick) -> tuple[np.ndarray, np.ndarray, dict]:
    from decord import VideoReader, cpu

    reader = VideoReader(str(path), ctx=cpu(0))
    total, fps = len(reader), float(reader.get_avg_fps())
    indices = pick(total, fps)
    frames = reader.get_batch(indices.tolist()).asnumpy()  # decodes only these frames
    return frames, indices / fps if fps else indices.astype(float), {"fps": fps, "total_frames": total}


def _av_frames(path: Path, pick) -> tuple[np.ndarray, np.ndarray, dict]:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise InputError(f"video {path} has no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        indices = pick(total, fps)
        frames, decoded = _decode_selected(container, stream, indices)
    if decoded < total and indices.size and int(indices.max()) >= decoded:
        # The container over-reported its frame count: sample again over the frames that really exist.
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            indices = pick(decoded, fps)
            frames, _ = _decode_selected(container, stream, indices)
        total = decoded
    return frames, indices / fps if fps else indices.astype(float), {"fps": fps, "total_frames": total}


def _decode_selected(container, stream, indices: np.ndarray) -> tuple[np.ndarray, int]:
    """Decode forward from the start and convert only the wanted frames; stop after the last one."""
    stream.thread_type = "AUTO"
    wanted = set(indices.tolist())
    last = int(indices.max()) if indices.size else -1
    kept, decoded = {}, 0
    for decoded, frame in enumerate(container.decode(stream), start=1):
        index = decoded - 1
        if index in wanted:
            kept[index] = frame.to_ndarray(format="rgb24")
        if index >= last:
            break
    if len(kept) < len(wanted):
        return np.zeros((0,), np.uint8), decoded
    return np.stack([kept[int(i)] for i in indices]), decoded


def load_video(path, n_frames: Optional[int] = None, fps: Optional[float] = None, indices=None,
               max_frames: int = MAX_FRAMES, backend: str = "auto") -> tuple[np.ndarray, np.ndarray, dict]:
    """Sampled frames of a video file: (uint8 [N, H, W, 3] RGB, timestamps in seconds [N], meta with fps,
    total_frames, backend). Give at most one of `n_frames`, `fps`, `indices`; none means DEFAULT_FRAMES frames.
    `backend="auto"` (or env TOKENOMY_VIDEO_BACKEND) tries decord, then PyAV; a decode error with one backend retries
    the next and is recorded in meta["backend"]."""
    path = Path(path)
    if sum(option is not None for option in (n_frames, fps, indices)) > 1:
        raise InputError("give at most one of n_frames, fps and indices to sample a video")
    for option, value in (("n_frames", n_frames), ("fps", fps), ("max_frames", max_frames)):
        if value is not None and (isinstance(value, bool) or not value > 0):
            raise InputError(f"{option} must be > 0, got {value!r}")
    if not path.is_file():
        raise InputError(f"video file not found: {path}")
    if n_frames is None and fps is None and indices is None:
        n_frames = DEFAULT_FRAMES

    def pick(total, native_fps):
        return _wanted_indices(total, native_fps, str(path), n_frames, fps, indices, max_frames)

    failures = []
    for name in _backend_order(os.environ.get(VIDEO_BACKEND_ENV, backend)):
        try:
            frames, times, meta = (_decord_frames if name == "decord" else _av_frames)(path, pick)
        except InputError as exc:
            if failures:
                raise InputError(f"{exc} (after {'; '.join(failures)})") from exc
            raise
        except ImportError as exc:
            failures.append(f"{name}: not installed ({exc})")
            continue
        except Exception as exc:  # each backend raises its own error types for undecodable files
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        meta["backend"] = name if not failures else f"{name} (after {'; '.join(failures)})"
        return frames, times, meta
    raise InputError(f"cannot decode video {path}: " + "; ".join(failures))


@dataclass(frozen=True)
class VideoFile:
    """A video file and how to sample its frames (`load_video`'s n_frames or fps; neither: DEFAULT_FRAMES frames).
    Nothing is decoded until a Pipeline reads it, with its audio track when the model hears (eval tasks hand these
    over, so the model decides whether the audio is read)."""

    path: Path
    n_frames: Optional[int] = None
    fps: Optional[float] = None

    def sampling(self) -> dict:
        return {name: value for name, value in (("n_frames", self.n_frames), ("fps", self.fps)) if value is not None}


def video_clip(video, with_audio: bool = False) -> tuple[np.ndarray, Optional[np.ndarray], str]:
    """(frames, audio or None, what was read of the audio) of a video given as a file path (DEFAULT_FRAMES frames;
    its audio track when `with_audio`), a VideoFile, a uint8 [T, H, W, 3] frame array, or {"frames": array,
    "audio": 16 kHz mono}."""
    if isinstance(video, (str, os.PathLike)):
        video = VideoFile(Path(video))
    if isinstance(video, VideoFile):
        if not with_audio:
            return load_video(video.path, **video.sampling())[0], None, "not read: the model has no audio input"
        frames, _, audio, meta = load_video_and_audio(video.path, **video.sampling())
        return frames, audio, meta["audio"]
    if isinstance(video, dict):
        unknown = set(video) - {"frames", "audio"}
        if unknown or "frames" not in video:
            raise InputError(f"a video given as a dict needs 'frames' (and optionally 'audio'), got keys {sorted(video)}")
        audio = video.get("audio")
        if audio is not None:
            audio = np.asarray(audio, dtype=np.float32).reshape(-1)
            if audio.size == 0:
                raise InputError("the audio given with a video is empty (0 samples)")
        note = f"{audio.size} samples, {AUDIO_SAMPLE_RATE} Hz mono (given)" if audio is not None else "none: not given"
        return video_frames(video["frames"]), audio, note
    return video_frames(video), None, "none: frames given without audio"


def video_frames(video, name: str | None = None) -> np.ndarray:
    """uint8 [T, H, W, 3] RGB frames of a video given as a file path (DEFAULT_FRAMES frames, `load_video`), a VideoFile
    or such an array (a torch tensor is converted)."""
    if isinstance(video, (str, os.PathLike)):
        return load_video(video)[0]
    if isinstance(video, VideoFile):
        return load_video(video.path, **video.sampling())[0]
    if hasattr(video, "numpy") and hasattr(video, "detach"):
        video = video.detach().cpu().numpy()
    label = name or "video"
    if not isinstance(video, np.ndarray):
        raise InputError(f"a {label} must be a file path or a uint8 [T, H, W, 3] frame array, got {type(video).__name__}")
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8:
        raise InputError(f"{label} frames must be uint8 [T, H, W, 3] RGB, got {video.dtype} {list(video.shape)}")
    if video.shape[0] == 0:
        raise InputError(f"{label} has no frames")
    return video


def _backend_order(backend: str) -> list[str]:
    if backend == "auto":
        # decord ships wheels for Linux x86_64 only; elsewhere an import could find a broken build.
        return [b for b in VIDEO_BACKENDS if b != "decord" or (platform.system() == "Linux" and platform.machine() == "x86_64")]
    if backend in VIDEO_BACKENDS:
        return [backend]
    raise InputError(f"unknown video backend {backend!r}; known: auto, {', '.join(VIDEO_BACKENDS)}")


# ---- audio ---------------------------------------------------------------------------------------------------------

def load_audio(path, sample_rate: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
    """The first audio stream of a media file as float32 [S] mono at `sample_rate` Hz (PyAV resampling)."""
    audio, reason = _read_audio(Path(path), sample_rate)
    if audio is None:
        raise InputError(f"cannot read audio from {path}: {reason}")
    return audio


def load_video_and_audio(path, sample_rate: int = AUDIO_SAMPLE_RATE, **video_options):
    """(frames, timestamps, audio or None, meta): `load_video` plus the audio track; meta["audio"] says what was read,
    or why the result is video only (no audio stream, an empty track)."""
    frames, times, meta = load_video(path, **video_options)
    audio, reason = _read_audio(Path(path), sample_rate)
    meta["audio"] = f"{audio.size} samples, {sample_rate} Hz mono" if audio is not None else f"none: {reason}"
    return frames, times, audio, meta


def audio_clip(audio) -> np.ndarray:
    """float32 [S] mono at AUDIO_SAMPLE_RATE of a standalone audio given as a media file path (its first audio stream,
    resampled: `load_audio`) or as such samples."""
    if isinstance(audio, (str, os.PathLike)):
        return load_audio(audio)
    if hasattr(audio, "numpy") and hasattr(audio, "detach"):
        audio = audio.detach().cpu().numpy()
    if not isinstance(audio, np.ndarray) or audio.dtype.kind != "f":
        raise InputError(f"an audio must be a file path or float samples [S] at {AUDIO_SAMPLE_RATE} Hz mono, got "
                         f"{type(audio).__name__}{'' if not isinstance(audio, np.ndarray) else ' of ' + str(audio.dtype)}")
    if audio.ndim != 1:
        raise InputError(f"an audio must be mono samples [S] at {AUDIO_SAMPLE_RATE} Hz, got shape {list(audio.shape)}")
    if audio.size == 0:
        raise InputError("an audio is empty (0 samples)")
    if not np.isfinite(audio).all():
        raise InputError("an audio holds NaN or infinite samples")
    return audio.astype(np.float32)


def _read_audio(path: Path, sample_rate: int) -> tuple[Optional[np.ndarray], str]:
    import av

    if not path.is_file():
        raise InputError(f"media file not found: {path}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise InputError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None, "the file has no audio stream"
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            chunks = []
            for frame in container.decode(container.streams.audio[0]):
                chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
            chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    except av.FFmpegError as exc:
        raise InputError(f"cannot decode audio of {path}: {exc}") from exc
    audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if audio.size == 0:
        return None, "the audio track is empty (0 samples)"
    return audio, ""
