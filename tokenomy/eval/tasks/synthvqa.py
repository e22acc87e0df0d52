"""synthvqa as a task of `tokenomy eval`: generated in memory (no files; --data-dir is not read), exact match,
accuracy overall and per question type."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tokenomy.eval import oracles, synthvqa
from tokenomy.eval.data import ImageRef
from tokenomy.eval.tasks.base import LoadResult, Task, mean_percent


class SynthVQA(Task):
    name = "synthvqa"
    reference = "tokenomy's own synthetic benchmark"
    description = "synthetic VQA test split, generated from fixed seeds (no files): exact match, accuracy per type"
    max_new_tokens = 4  # one-word answers
    split = "test"
    reads_files = False
    gives_reducer_context = True

    def config(self) -> dict:
        return {**super().config(), "split": self.split, "scenes": synthvqa.split_size(self.split),
                "question_types": list(synthvqa.QUESTION_TYPES)}

    def load(self, data_dir: Path | None) -> LoadResult:
        # Scene by scene, so the first N questions (--limit N) cover every question type.
        docs = [{**item, "image": ImageRef(pil=item["image"])} for item in synthvqa.items(self.split)]
        return self.validate_all(LoadResult(docs))

    def reducer_context(self, doc: dict) -> dict:
        """The oracle diagnostics' pixel maps: the pixels of what the question is about, and each pixel's distance from
        the background colour (mean absolute difference over RGB, in [0, 1])."""
        scene = doc["scene"]
        question = next(q for q in scene.questions if q["type"] == doc["type"])
        objects, word = synthvqa.question_objects(scene, question)
        pixels = np.asarray(doc["image"].open(), dtype=np.float32)
        foreground = np.abs(pixels - np.asarray(synthvqa.BACKGROUND, dtype=np.float32)).mean(-1) / 255.0
        return {oracles.QUESTION_PIXELS: torch.from_numpy(synthvqa.pixel_mask(scene, objects, word)),
                oracles.FOREGROUND_PIXELS: torch.from_numpy(foreground)}

    def prompt(self, doc: dict) -> str:
        return doc["question"]  # the reference models were trained on the bare question

    def target(self, doc: dict):
        return doc["answers"]

    def score(self, doc: dict, prediction: str) -> dict:
        return {"score": float(synthvqa.is_correct(prediction, doc["answers"])), "type": doc["type"],
                "normalized_prediction": synthvqa.normalize_answer(prediction)}

    def aggregate(self, records: list[dict]) -> dict:
        metrics = {"accuracy": mean_percent([r["score"] for r in records])}
        for kind in synthvqa.QUESTION_TYPES:
            scores = [r["score"] for r in records if r["type"] == kind]
            if scores:
                metrics[f"accuracy_{kind}"] = mean_percent(scores)
        return metrics
