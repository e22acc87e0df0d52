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


def write_mixed_fixture(root: Path) -> Path:
    """One or two samples for each of several benchmark layouts, including a video, under one --data-dir."""
    import base64
    import io

    import av
    import numpy as np

    def image(path, colour):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (30, 26), colour).save(path)

    image(root / "pope" / "val2014" / "a.jpg", (250, 0, 0))
    (root / "pope" / "coco_pope_random.json").write_text(
        json.dumps({"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?", "label": "yes"}) + "\n"
        + json.dumps({"question_id": 2, "image": "a.jpg", "text": "Is there a car in the image?", "label": "no"}) + "\n")
    image(root / "mme" / "existence" / "e.jpg", (0, 250, 0))
    (root / "mme" / "existence" / "e.txt").write_text("Is there a tree? Please answer yes or no.\tYes\n"
                                                      "Is there a boat? Please answer yes or no.\tNo\n")
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (0, 0, 250)).save(buffer, format="PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    (root / "mmbench").mkdir(parents=True)
    (root / "mmbench" / "mmbench_dev_en.tsv").write_text("index\tquestion\thint\tA\tB\tanswer\tcategory\timage\n"
                                                         f"3\tWhich colour?\tnan\tblue\tred\tA\tcolour\t{encoded}\n")
    video = root / "videomme" / "data" / "v1.mp4"
    video.parent.mkdir(parents=True)
    with av.open(str(video), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(8):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    (root / "videomme" / "test.jsonl").write_text(json.dumps({
        "question_id": "v1-1", "videoID": "v1", "duration": "short", "question": "What gets brighter?",
        "options": ["A. the screen", "B. nothing", "C. a cat", "D. a dog"], "answer": "A"}) + "\n")
    return root
