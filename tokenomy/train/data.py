"""Training conversations: one image, several question/answer turns, encoded so only answer tokens carry loss.

Several questions about one image share its visual tokens in one sequence (a multi-turn chat), so one pass over the
image trains several answers. The first turn is exactly the prompt the Pipeline builds at inference.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenomy.errors import InputError
from tokenomy.eval import synthvqa
from tokenomy.train.probe import cell_labels
from tokenomy.vlm.pipeline import load_image

IGNORE = -100
MAX_TURNS = 8


@dataclass
class Conversation:
    image: object  # PIL image or path
    turns: list  # [(question, answer)]
    scene: object = None  # the synthvqa scene, when known: its cells supervise the visual-token probe


def _segments(arch: str, turns):
    """(text, supervised) pieces whose concatenation is the chat template's rendering of the conversation."""
    pieces = []
    for index, (question, answer) in enumerate(turns):
        if arch == "llava":
            image = "<image>\n" if index == 0 else ""
            pieces += [(f"USER: {image}{question} ASSISTANT:", False), (f" {answer}</s>", True)]
        else:
            image = "<|vision_start|><|image_pad|><|vision_end|>" if index == 0 else ""
            lead = "" if index == 0 else "\n"
            pieces += [(f"{lead}<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n", False),
                       (f"{answer}<|im_end|>", True)]
    return pieces


def conversation_text(arch: str, conversation: Conversation) -> str:
    return "".join(text for text, _ in _segments(arch, conversation.turns))


def encode(arch: str, processor, conversation: Conversation, probe_grid: int | None = None) -> dict:
    """input_ids, labels (IGNORE except on answer tokens) and the processor's image tensors for one conversation;
    with `probe_grid`, also the scene's per-cell labels for the visual-token probe."""
    pieces = _segments(arch, conversation.turns)
    first = processor(text=[pieces[0][0]], images=[load_image(conversation.image)], return_tensors="pt")
    ids = [first["input_ids"][0]]
    labels = [torch.full_like(ids[0], IGNORE)]
    for text, supervised in pieces[1:]:
        piece = torch.tensor(processor.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        ids.append(piece)
        labels.append(piece.clone() if supervised else torch.full_like(piece, IGNORE))
    out = {key: value for key, value in first.items() if key not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    out["input_ids"], out["labels"] = torch.cat(ids), torch.cat(labels)
    if probe_grid is not None:
        out["cell_labels"] = cell_labels(conversation.scene, load_image(conversation.image), probe_grid)
    return out


def collate(encoded: list, pad_id: int, image_token_id: int) -> dict:
    """Right-pad a list of `encode` outputs into one batch."""
    length = max(len(e["input_ids"]) for e in encoded)
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), length), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e["input_ids"])
        input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = e["input_ids"], e["labels"], 1
    batch = dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask,
                 pixel_values=torch.cat([e["pixel_values"] for e in encoded]))
    if "image_grid_thw" in encoded[0]:
        batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in encoded])
        batch["mm_token_type_ids"] = (input_ids == image_token_id).long()
    if "cell_labels" in encoded[0]:
        batch["cell_labels"] = torch.stack([e["cell_labels"] for e in encoded])
    return batch


class SynthVQATrain:
    """The synthvqa train split as an endless, indexable stream: conversation i is train scene i, its questions in a
    seeded order, so a resumed run sees exactly the data it would have seen.

    Besides the scene's own seven questions, `extra_draws` more sets are drawn from the same question generator
    with other seeds (duplicates dropped): about ten more turns, mostly the look-ups by colour, shape and position
    that the small models learn slowest, for a third more tokens than the image alone."""

    extra_draws = 2

    def _turns(self, index: int, scene):
        questions, asked = list(scene.questions), {q["question"] for q in scene.questions}
        for draw in range(self.extra_draws):
            for q in synthvqa.draw_questions(np.random.default_rng([13, index, draw]), scene.objects, scene.word):
                if q["question"] not in asked:
                    asked.add(q["question"])
                    questions.append(q)
        order = np.random.default_rng([7, index]).permutation(len(questions))
        return [(questions[i]["question"], questions[i]["answer"]) for i in order]

    def __getitem__(self, index: int) -> Conversation:
        scene = synthvqa.make_scene("train", index)
        return Conversation(synthvqa.render(scene), self._turns(index, scene), scene)

    def texts(self, arch: str, limit: int = 2000):
        """Chat text of the first `limit` conversations, to train the tokenizer on (no images rendered)."""
        return [conversation_text(arch, Conversation(None, self._turns(i, synthvqa.make_scene("train", i)))) for i in range(limit)]


class CaptionConversations:
    """Stage 1 of the LLaVA-1.5 recipe on synthvqa: conversation i is train scene i with one turn, "Describe the
    image." -> a caption written by ref-clip's caption writer (tokenomy.train.clip), seeded by (seed, i)."""

    prompt = "Describe the image."

    def __init__(self, seed: int = 0):
        self.seed = seed

    def _turns(self, index: int, scene):
        from tokenomy.train import clip  # imported here: clip imports the loop, which imports this module

        return [(self.prompt, clip.caption(scene, np.random.default_rng([clip.CAPTION_SEED, self.seed, index])))]

    def __getitem__(self, index: int) -> Conversation:
        scene = synthvqa.make_scene("train", index)
        return Conversation(synthvqa.render(scene), self._turns(index, scene), scene)

    def texts(self, arch: str, limit: int = 2000):
        """Chat text of the first `limit` conversations, to train the tokenizer on (no images rendered)."""
        return [conversation_text(arch, Conversation(None, self._turns(i, synthvqa.make_scene("train", i)))) for i in range(limit)]


class JsonlConversations:
    """A user's vqa-jsonl folder ({id, image, question, answers} per line in *.jsonl, image paths relative to the
    folder): questions on the same image become turns of one conversation; the first listed answer is the target."""

    def __init__(self, data_dir, split: str = "train"):
        data_dir = Path(data_dir)
        files = [data_dir / f"{split}.jsonl"] if (data_dir / f"{split}.jsonl").is_file() else sorted(data_dir.glob("*.jsonl"))
        if not files:
            raise InputError(f"{data_dir} has no {split}.jsonl nor any *.jsonl file in the vqa-jsonl format")
        by_image = defaultdict(list)
        for path in files:
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    image, question, answers = record["image"], record["question"], record["answers"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise InputError(f"{path}:{number}: not a vqa-jsonl record with image, question, answers ({exc})") from exc
                if not answers:
                    raise InputError(f"{path}:{number}: empty answers list")
                by_image[str(data_dir / image)].append((question, str(answers[0])))
        self.conversations = [
            Conversation(image, turns[start : start + MAX_TURNS])
            for image, turns in by_image.items() for start in range(0, len(turns), MAX_TURNS)
        ]

    def __getitem__(self, index: int) -> Conversation:
        # Epoch e visits every conversation once in a seeded order: index -> (epoch, position) keeps resumption exact.
        epoch, position = divmod(index, len(self.conversations))
        order = np.random.default_rng([11, epoch]).permutation(len(self.conversations))
        return self.conversations[order[position]]

    def texts(self, arch: str):
        return [conversation_text(arch, conversation) for conversation in self.conversations]
