"""synthvqa: deterministic scenes, answers re-derived independently from the scene description, faithful rendering."""
import json
import math
import re

import numpy as np
import pytest

from tokenomy.errors import InputError
from tokenomy.eval import synthvqa


def derive_answer(question: str, description: dict) -> str:
    """An independent reading of a question against the plain scene description (no generator internals)."""
    objects = description["objects"]

    def named(name):
        color, shape = name.split(" ")
        (match,) = [o for o in objects if o["color"] == color and o["shape"] == shape]
        return match

    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        (match,) = [o for o in objects if o["shape"] == m[1]]
        return match["color"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (match,) = [o for o in objects if o["color"] == m[1]]
        return match["shape"]
    if question == "How many objects are there?":
        return str(len(objects))
    if m := re.fullmatch(r"How many (\w+) objects are there\?", question):
        return str(sum(o["color"] == m[1] for o in objects))
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(sum(o["shape"] == m[1] for o in objects))
    if m := re.fullmatch(r"Is there a (\w+) (\w+)\?", question):
        return "yes" if any(o["color"] == m[1] and o["shape"] == m[2] for o in objects) else "no"
    if m := re.fullmatch(r"Is the (\w+ \w+) left of the (\w+ \w+)\?", question):
        return "yes" if named(m[1])["x"] < named(m[2])["x"] else "no"
    if m := re.fullmatch(r"Is the (\w+ \w+) above the (\w+ \w+)\?", question):
        return "yes" if named(m[1])["y"] < named(m[2])["y"] else "no"
    if m := re.fullmatch(r"What color is the object nearest to the (\w+ \w+)\?", question):
        anchor = named(m[1])
        others = [o for o in objects if o is not anchor]
        return min(others, key=lambda o: math.hypot(o["x"] - anchor["x"], o["y"] - anchor["y"]))["color"]
    if question == "What word is written?":
        return description["word"]
    if question == "What color is the small object?":
        (match,) = [o for o in objects if o["small"]]
        return match["color"]
    raise AssertionError(f"unrecognised question {question!r}")


@pytest.mark.parametrize("split", ["train", "test"])
def test_answers_rederived_from_scene_description(split):
    for index in range(150):
        scene = synthvqa.make_scene(split, index)
        description = synthvqa.scene_description(scene)
        assert [q["type"] for q in scene.questions] == list(synthvqa.QUESTION_TYPES)
        for q in scene.questions:
            assert q["answer"] == derive_answer(q["question"], description), (split, index, q)


def test_same_seed_same_scene_and_image():
    first, again = synthvqa.make_scene("test", 17), synthvqa.make_scene("test", 17)
    assert synthvqa.scene_description(first) == synthvqa.scene_description(again)
    assert first.questions == again.questions
    assert synthvqa.render(first).tobytes() == synthvqa.render(again).tobytes()
    other = synthvqa.make_scene("train", 17)
    assert synthvqa.scene_description(other) != synthvqa.scene_description(first)


def test_rendering_matches_description():
    for index in range(30):
        scene = synthvqa.make_scene("val", index)
        pixels = np.asarray(synthvqa.render(scene)).astype(int)
        assert pixels.shape == (synthvqa.IMAGE_SIZE, synthvqa.IMAGE_SIZE, 3)
        for o in scene.objects:
            assert tuple(pixels[o.y, o.x]) == synthvqa.COLORS[o.color], (index, o)
            # An object's colour never leaks outside its bounding box.
            mask = (pixels == synthvqa.COLORS[o.color]).all(-1)
            ys, xs = np.nonzero(mask)
            inside = [any(abs(x - p.x) <= p.radius + 1 and abs(y - p.y) <= p.radius + 1
                          for p in scene.objects if p.color == o.color) for x, y in zip(xs, ys)]
            assert all(inside)
        left, top, right, bottom = scene.text_box
        dark = (pixels.sum(-1) < 200)
        assert dark[top:bottom + 1, left:right + 1].sum() > 20  # the word is drawn in its box ...
        dark[top:bottom + 1, left:right + 1] = False
        assert dark.sum() == 0  # ... and nowhere else


def test_small_objects_and_text_occupy_few_patches():
    scene = synthvqa.make_scene("test", 3)
    (small,) = [o for o in scene.objects if o.small]
    assert 2 * small.radius + 1 <= 9  # at most a 2x2 block of 8 px patches
    large = [o for o in scene.objects if not o.small]
    assert 2 <= len(large) <= 5


def test_questions_balanced_enough():
    answers = {kind: set() for kind in synthvqa.QUESTION_TYPES}
    for item in synthvqa.items("test", limit=700):
        answers[item["type"]].add(item["answers"][0])
    assert answers["exist"] == {"yes", "no"}
    assert len(answers["text"]) == len(synthvqa.WORDS)
    assert len(answers["small"]) == len(synthvqa.COLORS)
    assert len(answers["count"]) >= 5


def test_items_and_export_agree(tmp_path):
    path = synthvqa.export_jsonl(tmp_path, "test", num_scenes=3)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    in_memory = list(synthvqa.items("test", num_scenes=3))
    assert len(records) == len(in_memory) == 3 * len(synthvqa.QUESTION_TYPES)
    for record, item in zip(records, in_memory):
        assert {k: record[k] for k in ("id", "question", "answers", "type")} == {k: item[k] for k in ("id", "question", "answers", "type")}
        assert (tmp_path / record["image"]).is_file()
    assert len({r["id"] for r in records}) == len(records)
    assert len(list(synthvqa.items("test", limit=5))) == 5


def test_unknown_split_and_scoring():
    with pytest.raises(InputError, match="bogus"):
        synthvqa.make_scene("bogus", 0)
    assert synthvqa.is_correct(" Red.", ["red"])
    assert synthvqa.is_correct("3", ["3"])
    assert not synthvqa.is_correct("red circle", ["red"])
