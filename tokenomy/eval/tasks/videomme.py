"""Video-MME (without subtitles): multiple choice over a video of uniformly sampled frames.

A model that reads videos (Qwen2-VL, Qwen2.5-VL, Qwen2.5-Omni) gets the sampled frames as one video, and
Qwen2.5-Omni also hears the file's audio track (video only when the file has none, said in the stats). Every other
model (LLaVA, LLaVA-NeXT, composed) gets the same frames as separate images. Both read through tokenomy.io.load_video
(`--video_frames` frames, `linspace(0, total - 1, n)` indices), and the results file's task config says which way
the run went ("video_input").

Scored as lmms-eval (EvolvingLMMs-Lab/lmms-eval at 75571cfe) scores its ``videomme`` task:
lmms_eval/tasks/videomme/utils.py ``videomme_process_results`` (lines 271-301) reads the letter with
``extract_characters_regex`` (lines 256-259), i.e. lmms_eval/tasks/_task_utils/mcq_extract.py
``extract_mcq_answer`` with choices A-D (tokenomy.eval.choices.mcq_extract_letter), on the text lmms-eval hands
every task (reasoning blocks dropped, stripped: tokenomy/eval/tasks/lmms_eval_response.py).
``videomme_aggregate_results`` (lines 304-371) returns the percentage of exact letter matches over all questions;
the per-duration, per-domain and per-task-type accuracies it logs are returned here as ``by_duration``,
``by_domain`` and ``by_task_type``.

The prompt is the Video-MME frames prompt quoted in utils.py lines 188-191 (lmms-eval's ``llava_vid`` post-prompt
"The best answer is:"); lmms-eval's default prompt instead mentions subtitles and asks for the letter directly.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from PIL import Image

from tokenomy.eval.choices import mcq_extract_letter
from tokenomy.eval.tasks.base import Task, as_str_id, mean_percent
from tokenomy.eval.tasks.lmms_eval_response import lmms_eval_response
from tokenomy.io import VideoFile, video_frames

PROMPT_HEAD = ("Select the best answer to the following multiple-choice question based on the video. "
               "Respond with only the letter (A, B, C, or D) of the correct option.")


class VideoMME(Task):
    name = "videomme"
    reference = "lmms-eval lmms_eval/tasks/videomme/utils.py (letter by _task_utils/mcq_extract.py)"
    folder = "videomme"
    description = "Video-MME w/o subtitles: accuracy overall and by duration, domain and task type"
    official_files = "test-*.parquet (or JSON/JSONL) rows + videos data/<videoID>.mp4"
    row_fields = "question_id, videoID, duration, domain, task_type, question, options, answer"
    n_frames = 8

    def config(self) -> dict:
        return {**super().config(), "frames": self.n_frames, "subtitles": False,
                "letter_extraction": "lmms-eval mcq_extract.py"}

    def read_official(self, root: Path):
        return None  # the distribution is generic rows (parquet) plus a video folder

    def from_row(self, row: dict, base_dirs: list[Path]) -> dict:
        video_id = str(row.get("videoID", row.get("video_id")))
        candidates = [base / sub / f"{video_id}.mp4" for base in base_dirs for sub in ("data", "videos", ".")]
        video = next((c for c in candidates if c.is_file()), candidates[0])
        return {"id": as_str_id(row["question_id"]), "question": row["question"], "options": [str(o) for o in row["options"]],
                "answer": str(row["answer"]).strip(), "duration": str(row.get("duration", "")),
                "domain": str(row.get("domain", "")), "task_type": str(row.get("task_type", "")), "video": video,
                "image": None}

    def validate(self, doc: dict) -> str | None:
        if not doc["video"].is_file():
            return f"video file not found: {doc['video']}"
        if doc["answer"] not in "ABCD" or not doc["answer"]:
            return f"answer must be A-D, got {doc['answer']!r}"
        return None

    def video(self, doc: dict) -> VideoFile:
        return VideoFile(doc["video"], n_frames=self.n_frames)

    def media(self, doc: dict) -> list[Image.Image]:
        return [Image.fromarray(frame) for frame in video_frames(self.video(doc))]

    def prompt(self, doc: dict) -> str:
        return f"{PROMPT_HEAD}\n{doc['question']}\n" + "\n".join(doc["options"]) + "\nThe best answer is:"

    def target(self, doc: dict):
        return doc["answer"]

    def score(self, doc: dict, prediction: str) -> dict:
        letter = mcq_extract_letter(lmms_eval_response(prediction), "ABCD")
        return {"score": float(letter == doc["answer"]), "parsed": letter, "duration": doc["duration"],
                "domain": doc["domain"], "task_type": doc["task_type"]}

    def aggregate(self, records: list[dict]) -> dict:
        metrics: dict = {"accuracy": mean_percent([r["score"] for r in records])}
        for field in ("duration", "domain", "task_type"):
            groups: dict[str, list[float]] = defaultdict(list)
            for r in records:
                # records written before domain and task type were kept have none: leave them out of those groups
                if r.get(field):
                    groups[r[field]].append(r["score"])
            metrics[f"by_{field}"] = {name: mean_percent(scores) for name, scores in sorted(groups.items())}
        return metrics
