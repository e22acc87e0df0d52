"""synthvqa: a seeded, procedural VQA benchmark whose answers are right by construction.

Each scene is a 128x128 canvas with 2-5 large shapes, exactly one small shape (6-8 px, inside one or two 8 px
patches) and one short word in PIL's default font. Every scene asks one question of each type in `QUESTION_TYPES`.
Answers are derived from the scene description (`Scene`), never from the pixels, so they are correct whatever the
renderer draws; the test suite re-derives them independently.

Small objects, counts and the word cover few patches, so a reducer that drops the wrong tokens loses them: this is
what makes the benchmark discriminative for token reduction.
"""
from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tokenomy.errors import InputError

IMAGE_SIZE = 128
BACKGROUND = (235, 235, 235)
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
WORDS = ("cat", "dog", "sun", "box", "car", "hat", "pen", "map", "key", "cup")
QUESTION_TYPES = ("color", "shape", "count", "exist", "spatial", "text", "small")
SPLIT_SEEDS = {"train": 1000, "val": 2000, "test": 3000}
SPLIT_SIZES = {"val": 100, "test": 200}  # scenes; each scene asks one question per type
LARGE_RADIUS = (9, 15)
SMALL_RADIUS = (3, 4)
FONT_SIZE = 14
# Spatial questions only compare objects whose centres differ clearly, so the answer is never a matter of pixels.
SPATIAL_MARGIN = 10
NEAREST_MARGIN = 6


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    x: int  # centre, pixels
    y: int
    radius: int
    small: bool

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    objects: list
    word: str
    text_box: tuple  # (left, top, right, bottom) of the rendered word, pixels
    questions: list = field(default_factory=list)  # dicts: type, question, answer, and what the question refers to


@functools.lru_cache(maxsize=None)
def _font():
    # Loading the font (base64-decoded on every call) and measuring a word were most of make_scene's time.
    return ImageFont.load_default(size=FONT_SIZE)


@functools.lru_cache(maxsize=None)
def _word_bbox(word: str) -> tuple:
    """getbbox of `word` as drawn (upper case), relative to the text origin."""
    return _font().getbbox(word.upper())


def _overlaps(box_a, box_b, margin) -> bool:
    return not (box_a[2] + margin <= box_b[0] or box_b[2] + margin <= box_a[0]
                or box_a[3] + margin <= box_b[1] or box_b[3] + margin <= box_a[1])


def _place_objects(rng, count_large, text_box):
    """Non-overlapping objects with distinct (colour, shape) pairs, so 'the red circle' always names one object."""
    objects = []
    specs = [False] * count_large + [True]
    for small in specs:
        for _ in range(200):
            low, high = SMALL_RADIUS if small else LARGE_RADIUS
            radius = int(rng.integers(low, high + 1))
            x = int(rng.integers(radius + 2, IMAGE_SIZE - radius - 2))
            y = int(rng.integers(radius + 2, IMAGE_SIZE - radius - 2))
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            color = list(COLORS)[int(rng.integers(len(COLORS)))]
            box = (x - radius, y - radius, x + radius, y + radius)
            if any((o.shape, o.color) == (shape, color) for o in objects):
                continue
            if _overlaps(box, text_box, 3):
                continue
            if any(math.hypot(x - o.x, y - o.y) < radius + o.radius + 4 for o in objects):
                continue
            objects.append(SceneObject(shape, color, x, y, radius, small))
            break
        else:
            return None
    return objects


def draw_questions(rng, objects, word):
    """One question of each type, or None when this scene cannot ask one unambiguously."""
    large = [o for o in objects if not o.small]
    small = next(o for o in objects if o.small)
    out = []

    unique_shapes = [s for s in SHAPES if sum(o.shape == s for o in objects) == 1]
    unique_colors = [c for c in COLORS if sum(o.color == c for o in objects) == 1]
    target_shapes = [s for s in unique_shapes if any(o.shape == s for o in large)]
    target_colors = [c for c in unique_colors if any(o.color == c for o in large)]
    if not target_shapes or not target_colors:
        return None
    shape = target_shapes[int(rng.integers(len(target_shapes)))]
    out.append(dict(type="color", question=f"What color is the {shape}?",
                    answer=next(o.color for o in objects if o.shape == shape), shape=shape))
    color = target_colors[int(rng.integers(len(target_colors)))]
    out.append(dict(type="shape", question=f"What shape is the {color} object?",
                    answer=next(o.shape for o in objects if o.color == color), color=color))

    form = int(rng.integers(3))
    if form == 0:
        out.append(dict(type="count", question="How many objects are there?", answer=str(len(objects))))
    elif form == 1:
        present = sorted({o.color for o in objects})
        color = present[int(rng.integers(len(present)))] if rng.random() < 0.8 else list(COLORS)[int(rng.integers(len(COLORS)))]
        out.append(dict(type="count", question=f"How many {color} objects are there?",
                        answer=str(sum(o.color == color for o in objects)), color=color))
    else:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        out.append(dict(type="count", question=f"How many {shape}s are there?",
                        answer=str(sum(o.shape == shape for o in objects)), shape=shape))

    present_pairs = {(o.color, o.shape) for o in objects}
    if rng.random() < 0.5:
        target = objects[int(rng.integers(len(objects)))]
        color, shape = target.color, target.shape
    else:
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present_pairs]
        color, shape = absent[int(rng.integers(len(absent)))]
    out.append(dict(type="exist", question=f"Is there a {color} {shape}?",
                    answer="yes" if (color, shape) in present_pairs else "no", color=color, shape=shape))

    spatial = _spatial_question(rng, objects, large)
    if spatial is None:
        return None
    out.append(spatial)

    out.append(dict(type="text", question="What word is written?", answer=word))
    out.append(dict(type="small", question="What color is the small object?", answer=small.color))
    return out


def _spatial_question(rng, objects, large):
    forms = ["left", "above", "nearest"]
    rng.shuffle(forms)
    for form in forms:
        if form == "nearest":
            candidates = []
            for anchor in large:  # the nearest object may be the small one
                others = sorted((math.hypot(o.x - anchor.x, o.y - anchor.y), i) for i, o in enumerate(objects) if o is not anchor)
                if len(others) >= 2 and others[1][0] - others[0][0] < NEAREST_MARGIN:
                    continue
                candidates.append((anchor, objects[others[0][1]]))
            if candidates:
                anchor, nearest = candidates[int(rng.integers(len(candidates)))]
                return dict(type="spatial", question=f"What color is the object nearest to the {anchor.name}?",
                            answer=nearest.color, anchor=anchor.name)
            continue
        axis = "x" if form == "left" else "y"
        pairs = [(a, b) for a in large for b in large
                 if a is not b and abs(getattr(a, axis) - getattr(b, axis)) >= SPATIAL_MARGIN]
        if not pairs:
            continue
        a, b = pairs[int(rng.integers(len(pairs)))]
        relation = "left of" if form == "left" else "above"
        holds = getattr(a, axis) < getattr(b, axis)  # smaller x is further left, smaller y is higher up
        return dict(type="spatial", question=f"Is the {a.name} {relation} the {b.name}?",
                    answer="yes" if holds else "no", first=a.name, second=b.name, relation=relation)
    return None


def word_box(word: str, x: int, y: int) -> tuple:
    """(left, top, right, bottom) of `word` as `render` draws it with its top-left corner at (x, y)."""
    left, top, right, bottom = _word_bbox(word)
    return (x, y, x + right - left, y + bottom - top)


def make_scene(split: str, index: int) -> Scene:
    """Scene `index` of `split`: the same split and index always give the same scene and questions."""
    if split not in SPLIT_SEEDS:
        raise InputError(f"unknown synthvqa split {split!r}; known: {', '.join(SPLIT_SEEDS)}")
    rng = np.random.default_rng([SPLIT_SEEDS[split], int(index)])
    while True:  # resample until the scene can ask every question type unambiguously
        word = WORDS[int(rng.integers(len(WORDS)))]
        _, _, width, height = word_box(word, 0, 0)
        tx = int(rng.integers(2, IMAGE_SIZE - width - 2))
        ty = int(rng.integers(2, IMAGE_SIZE - height - 2))
        text_box = word_box(word, tx, ty)
        objects = _place_objects(rng, int(rng.integers(2, 6)), text_box)
        if objects is None:
            continue
        questions = draw_questions(rng, objects, word)
        if questions is not None:
            return Scene(objects, word, text_box, questions)


def _draw_object(draw: ImageDraw.ImageDraw, o: SceneObject, fill) -> None:
    r = o.radius
    if o.shape == "circle":
        draw.ellipse((o.x - r, o.y - r, o.x + r, o.y + r), fill=fill)
    elif o.shape == "square":
        side = round(r * 0.85)  # a square of the same visual weight as the circle
        draw.rectangle((o.x - side, o.y - side, o.x + side, o.y + side), fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(o.x, o.y - r), (o.x - r, o.y + r), (o.x + r, o.y + r)], fill=fill)
    else:
        draw.polygon([(o.x, o.y - r), (o.x + r, o.y), (o.x, o.y + r), (o.x - r, o.y)], fill=fill)


def _draw_word(draw: ImageDraw.ImageDraw, scene: Scene, fill) -> None:
    left, top, _, _ = _word_bbox(scene.word)
    draw.text((scene.text_box[0] - left, scene.text_box[1] - top), scene.word.upper(), fill=fill, font=_font())


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        _draw_object(draw, o, COLORS[o.color])
    _draw_word(draw, scene, (0, 0, 0))
    return image


def pixel_mask(scene: Scene, objects=(), word: bool = False) -> np.ndarray:
    """[IMAGE_SIZE, IMAGE_SIZE] bool: the pixels `render` paints for `objects` (and for the word when `word`)."""
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for o in objects:
        _draw_object(draw, o, 255)
    if word:
        _draw_word(draw, scene, 255)
    return np.asarray(mask) > 0


def _named(scene: Scene, name: str) -> SceneObject:
    return next(o for o in scene.objects if o.name == name)


def question_objects(scene: Scene, question: dict) -> tuple[list, bool]:
    """(objects, word): what a question of `scene.questions` is about, from the scene description.

    color/shape: the object the question names. count: the objects counted (all of them, or those of the named
    colour or shape; none when the answer is 0). exist: the named pair when present, else every object of the named
    colour or shape (what shows that the pair is absent). spatial: the two compared objects, or the anchor and its
    nearest object. text: the word. small: the small object.
    """
    kind, objects = question["type"], scene.objects
    if kind == "color":
        return [o for o in objects if o.shape == question["shape"]], False
    if kind == "shape":
        return [o for o in objects if o.color == question["color"]], False
    if kind == "count":
        return [o for o in objects if question.get("color", o.color) == o.color and question.get("shape", o.shape) == o.shape], False
    if kind == "exist":
        pair = [o for o in objects if (o.color, o.shape) == (question["color"], question["shape"])]
        return pair or [o for o in objects if o.color == question["color"] or o.shape == question["shape"]], False
    if kind == "spatial":
        if "anchor" in question:
            anchor = _named(scene, question["anchor"])
            nearest = min((o for o in objects if o is not anchor), key=lambda o: math.hypot(o.x - anchor.x, o.y - anchor.y))
            return [anchor, nearest], False
        return [_named(scene, question["first"]), _named(scene, question["second"])], False
    if kind == "text":
        return [], True
    if kind == "small":
        return [o for o in objects if o.small], False
    raise InputError(f"unknown synthvqa question type {kind!r}; known: {', '.join(QUESTION_TYPES)}")


def split_size(split: str) -> int:
    if split not in SPLIT_SIZES:
        raise InputError(f"split {split!r} has no fixed size; fixed-size splits: {', '.join(SPLIT_SIZES)}")
    return SPLIT_SIZES[split]


def items(split: str, limit: int | None = None, num_scenes: int | None = None):
    """The split's questions in order (scene by scene, types in QUESTION_TYPES order) as vqa-jsonl dicts with a PIL
    image under "image" and the `Scene` it was drawn from under "scene". `limit` caps the number of questions."""
    scenes = num_scenes if num_scenes is not None else split_size(split)
    produced = 0
    for index in range(scenes):
        scene = make_scene(split, index)
        image = render(scene)
        for q in scene.questions:
            if limit is not None and produced >= limit:
                return
            yield dict(id=f"{split}-{index:05d}-{q['type']}", image=image, question=q["question"],
                       answers=[q["answer"]], type=q["type"], scene=scene)
            produced += 1


def export_jsonl(out_dir, split: str, num_scenes: int | None = None) -> Path:
    """Write `split` in the generic vqa-jsonl format: DIR/images/<scene>.png and DIR/<split>.jsonl with one
    {id, image, question, answers, type} line per question (image paths relative to DIR)."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    scenes = num_scenes if num_scenes is not None else split_size(split)
    path = out_dir / f"{split}.jsonl"
    with path.open("w") as handle:
        for index in range(scenes):
            scene = make_scene(split, index)
            image_name = f"images/{split}-{index:05d}.png"
            render(scene).save(out_dir / image_name)
            for q in scene.questions:
                record = dict(id=f"{split}-{index:05d}-{q['type']}", image=image_name, question=q["question"],
                              answers=[q["answer"]], type=q["type"])
                handle.write(json.dumps(record) + "\n")
    return path


def scene_description(scene: Scene) -> dict:
    """The scene as plain data (what the answers are derived from)."""
    return dict(objects=[asdict(o) for o in scene.objects], word=scene.word, text_box=list(scene.text_box))


def normalize_answer(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.strip().lower()).strip()


def is_correct(prediction: str, answers) -> bool:
    return normalize_answer(prediction) in {normalize_answer(a) for a in answers}
