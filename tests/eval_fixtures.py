"""Tiny evaluation data written into a test's tmp_path (nothing is downloaded)."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

ANSWERS = ["yes", "no", "2", "dog", "cat", "red"]


def write_vqa_fixture(root: Path, n: int = 6, bad: bool = False) -> Path:
    """A vqa-jsonl fixture of `n` valid samples with distinct images; with `bad`, also the three kinds of bad data
    (a missing image file, an empty answers list, a malformed JSON line)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (24 + 4 * i, 20), (40 * i % 256, 7 * i, 100)).save(root / "img" / f"{i}.png")
        rows.append(json.dumps({"id": f"q{i}", "image": f"img/{i}.png", "question": f"What is shown in picture {i}?",
                                "answers": [ANSWERS[i % len(ANSWERS)]] * 6 + ["dog"] * 4}))
    if bad:
        rows.insert(2, json.dumps({"id": "missing-image", "image": "img/nope.png", "question": "?", "answers": ["dog"]}))
        rows.insert(4, json.dumps({"id": "no-answers", "image": "img/0.png", "question": "?", "answers": []}))
        rows.insert(5, '{"id": "broken-line", "image": "img/0.png", "question": ')
    (root / "qa.jsonl").write_text("\n".join(rows) + "\n")
    return root
