"""Frame sampling from video files, independent of any model: decord first, PyAV as the fallback.

Both backends use the same uniform index rule, `linspace(0, total - 1, n).round()`, so a video yields the same
frame indices whichever backend decodes it. decord's global bridge is never touched.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from tokenomy.errors import InputError

BACKENDS = ("decord", "av")


def uniform_indices(total: int, n_frames: int) -> np.ndarray:
    if total <= 0:
        raise ValueError("video has no frames")
    n = min(n_frames, total)
    return np.linspace(0, total - 1, n).round().astype(np.int64)


def _decord_frames(path: Path, n_frames: int) -> tuple[np.ndarray, np.ndarray, dict]:
    from decord import VideoReader, cpu

    reader = VideoReader(str(path), ctx=cpu(0))
    total = len(reader)
    indices = uniform_indices(total, n_frames)
    frames = reader.get_batch(indices.tolist()).asnumpy()
    fps = float(reader.get_avg_fps())
    return frames, indices / fps, {"fps": fps, "total_frames": total}


def _av_frames(path: Path, n_frames: int) -> tuple[np.ndarray, np.ndarray, dict]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        # The container's frame count can be missing or wrong, so decode sequentially and keep the wanted frames.
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    indices = uniform_indices(len(decoded), n_frames)
    frames = np.stack([decoded[i] for i in indices])
    return frames, indices / fps if fps else indices.astype(float), {"fps": fps, "total_frames": len(decoded)}


def load_video(path: str | Path, n_frames: int = 8, backend: str = "auto") -> tuple[np.ndarray, np.ndarray, dict]:
    """Uniformly sampled frames: (uint8 [N, H, W, 3] RGB, timestamps in seconds [N], meta with fps,
    total_frames, backend). `backend="auto"` (or env TOKENOMY_VIDEO_BACKEND) tries decord, then PyAV; a decode
    error with one backend retries the next."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"video file not found: {path}")
    backend = os.environ.get("TOKENOMY_VIDEO_BACKEND", backend)
    if backend == "auto":
        order = [b for b in BACKENDS if b != "decord" or (platform.system() == "Linux" and platform.machine() == "x86_64")]
    elif backend in BACKENDS:
        order = [backend]
    else:
        raise InputError(f"unknown video backend {backend!r}; known: auto, {', '.join(BACKENDS)}")
    failures = []
    for name in order:
        try:
            frames, times, meta = (_decord_frames if name == "decord" else _av_frames)(path, n_frames)
        except ImportError as exc:
            failures.append(f"{name}: not installed ({exc})")
            continue
        except Exception as exc:  # each backend raises its own error types for undecodable files
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        meta["backend"] = name if not failures else f"{name} (after {'; '.join(failures)})"
        return frames, times, meta
    raise InputError(f"cannot decode video {path}: " + "; ".join(failures))
