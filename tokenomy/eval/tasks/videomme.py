"""Video-MME (without subtitles): multiple choice over uniformly sampled frames; accuracy overall and by duration."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from PIL import Image

from tokenomy.eval.choices import videomme_letter
from tokenomy.eval.tasks.base import Task, as_str_id, mean_percent
from tokenomy.io import load_video

PROMPT_HEAD = ("Select the best answer to the following multiple-choice question based on the video. "
               "Respond with only the letter (A, B, C, or D) of the correct option.")


class VideoMME(Task):
    name = "videomme"
    reference = "not yet checked: lmms-eval videomme/utils.py now extracts via _task_utils/mcq_extract.py"
    folder = "videomme"
    description = "Video-MME w/o subtitles: accuracy overall and by duration (short/medium/long)"
    official_files = "test-*.parquet (or JSON/JSONL) rows + videos data/<videoID>.mp4"
    row_fields = "question_id, videoID, duration, domain, task_type, question, options, answer"
    n_frames = 8

    def config(self) -> dict:
        return {**super().config(), "frames": self.n_frames, "subtitles": False}

    def read_official(self, root: Path):
        return None  # the distribution is generic rows (parquet) plus a video folder

    def from_row(self, row: dict, base_dirs: list[Path]) -> dict:
        video_id = str(row.get("videoID", row.get("video_id")))
        candidates = [base / sub / f"{video_id}.mp4" for base in base_dirs for sub in ("data", "videos", ".")]
        video = next((c for c in candidates if c.is_file()), candidates[0])
        return {"id": as_str_id(row["question_id"]), "question": row["question"], "options": [str(o) for o in row["options"]],
                "answer": str(row["answer"]).strip(), "duration": str(row.get("duration", "")), "video": video, "image": None}

    def validate(self, doc: dict) -> str | None:
        if not doc["video"].is_file():
            return f"video file not found: {doc['video']}"
        if doc["answer"] not in "ABCD" or not doc["answer"]:
            return f"answer must be A-D, got {doc['answer']!r}"
        return None

    def media(self, doc: dict) -> list[Image.Image]:
        frames, _, _ = load_video(doc["video"], n_frames=self.n_frames)
        return [Image.fromarray(frame) for frame in frames]

    def prompt(self, doc: dict) -> str:
        return f"{PROMPT_HEAD}\n{doc['question']}\n" + "\n".join(doc["options"]) + "\nThe best answer is:"

    def target(self, doc: dict):
        return doc["answer"]

    def score(self, doc: dict, prediction: str) -> dict:
        letter = videomme_letter(prediction)
        return {"score": float(letter == doc["answer"]), "parsed": letter, "duration": doc["duration"]}

    def aggregate(self, records: list[dict]) -> dict:
        by_duration: dict[str, list[float]] = defaultdict(list)
        for r in records:
            by_duration[r["duration"]].append(r["score"])
        return {"accuracy": mean_percent([r["score"] for r in records]),
                "by_duration": {d: mean_percent(v) for d, v in sorted(by_duration.items())}}
