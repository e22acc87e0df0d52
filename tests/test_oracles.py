"""The synthvqa oracle diagnostics: what they keep on hand-made scenes, batch = singles on the reference models, and
the places that refuse them. Also: synthvqa needs no --data-dir, file-based tasks still do."""
import json

import numpy as np
import pytest
import torch

import tokenomy
from tokenomy.cli import main
from tokenomy.errors import InputError
from tokenomy.eval import oracles, synthvqa
from tokenomy.eval.data import ImageRef
from tokenomy.eval.runner import EvalConfig, run_eval
from tokenomy.eval.synthvqa import Scene, SceneObject
from tokenomy.eval.tasks.synthvqa import SynthVQA
from tokenomy.reducers import ImageTokens, available

CELL = 8  # ref-llava-e2e's patch
GRID = synthvqa.IMAGE_SIZE // CELL


def hand_made_scene() -> Scene:
    # Squares fill exact pixel rectangles (side = round(0.85 r)), so their cells can be listed by hand below.
    objects = [
        SceneObject("square", "red", x=20, y=20, radius=10, small=False),  # pixels 12..28: cells 1..3 x 1..3
        SceneObject("square", "blue", x=100, y=36, radius=12, small=False),  # pixels 90..110: cells 11..13 x 4..6 (rows)
        SceneObject("circle", "red", x=60, y=100, radius=14, small=False),
        SceneObject("square", "green", x=100, y=100, radius=4, small=True),  # pixels 97..103: cell 12 x 12
    ]
    scene = Scene(objects, "cat", (40, 56, 70, 66))
    scene.questions = [
        dict(type="color", question="What color is the circle?", answer="red", shape="circle"),
        dict(type="shape", question="What shape is the blue object?", answer="square", color="blue"),
        dict(type="count", question="How many red objects are there?", answer="2", color="red"),
        dict(type="exist", question="Is there a blue circle?", answer="no", color="blue", shape="circle"),
        dict(type="spatial", question="What color is the object nearest to the red circle?", answer="green",
             anchor="red circle"),
        dict(type="text", question="What word is written?", answer="cat"),
        dict(type="small", question="What color is the small object?", answer="green"),
    ]
    return scene


def doc_of(scene: Scene, kind: str) -> dict:
    question = next(q for q in scene.questions if q["type"] == kind)
    return dict(id=kind, image=ImageRef(pil=synthvqa.render(scene)), question=question["question"],
                answers=[question["answer"]], type=kind, scene=scene)


def grid_tokens(context: dict, side: int) -> ImageTokens:
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    positions = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ImageTokens(torch.randn(side * side, 4), positions, context=context)


def cells(rows, cols, side=GRID) -> set:
    return {r * side + c for r in rows for c in cols}


def foreground_by_cell(image, side=GRID) -> np.ndarray:
    """Independent of the task's code: mean |pixel - background| per cell over the RGB channels."""
    pixels = np.asarray(image).astype(np.int32)
    distance = np.abs(pixels - np.array(synthvqa.BACKGROUND)).sum(-1) / (3 * 255)
    cell = synthvqa.IMAGE_SIZE // side
    return distance.reshape(side, cell, side, cell).mean(axis=(1, 3)).reshape(-1)


def test_question_objects_follow_the_description():
    scene = hand_made_scene()
    red_square, blue_square, red_circle, green_small = scene.objects
    expected = {"color": [red_circle], "shape": [blue_square], "count": [red_square, red_circle],
                "exist": [blue_square, red_circle],  # absent pair: every object of the colour or the shape
                "spatial": [red_circle, green_small], "text": [], "small": [green_small]}
    for question in scene.questions:
        objects, word = synthvqa.question_objects(scene, question)
        assert objects == expected[question["type"]], question
        assert word == (question["type"] == "text")
    present = dict(type="exist", question="Is there a blue square?", answer="yes", color="blue", shape="square")
    assert synthvqa.question_objects(scene, present) == ([blue_square], False)


@pytest.mark.parametrize("index", range(6))
def test_pixel_masks_are_what_render_paints(index):
    scene = synthvqa.make_scene("test", index)
    painted = (np.asarray(synthvqa.render(scene)) != np.array(synthvqa.BACKGROUND)).any(-1)
    assert (synthvqa.pixel_mask(scene, scene.objects, word=True) == painted).all()
    assert not (synthvqa.pixel_mask(scene, scene.objects) & synthvqa.pixel_mask(scene, word=True)).any()


def test_question_oracle_keeps_the_question_patches_then_the_most_foreground():
    scene = hand_made_scene()
    task = SynthVQA()
    image = synthvqa.render(scene)
    foreground = foreground_by_cell(image)
    small_cells = cells([12], [12])
    blue_cells = cells(range(3, 6), range(11, 14))  # rows (y 24..48) x cols (x 88..112)
    for kind, question_cells in (("small", small_cells), ("shape", blue_cells)):
        context = task.reducer_context(doc_of(scene, kind))
        tokens = grid_tokens(context, GRID)
        top_up = 5
        kept = oracles.QuestionOracle(keep=len(question_cells) + top_up).select(tokens).kept.tolist()
        others = [i for i in np.argsort(-foreground, kind="stable") if i not in question_cells]
        assert set(kept) == question_cells | set(others[:top_up]), kind
        assert kept == sorted(kept)
    # Fewer slots than question patches: only question patches, the most foreground of them.
    few = oracles.QuestionOracle(keep=2).select(tokens).kept.tolist()
    ranked = sorted(blue_cells, key=lambda i: (-foreground[i], i))
    assert few == sorted(ranked[:2])


def test_question_oracle_text_and_spatial_patches():
    scene = hand_made_scene()
    task = SynthVQA()
    text = task.reducer_context(doc_of(scene, "text"))[oracles.QUESTION_PIXELS]
    rows, cols = np.nonzero(text.numpy())
    assert rows.min() >= 56 and rows.max() <= 66 and cols.min() >= 40 and cols.max() <= 70  # inside the text box
    text_cells = {int(r) // CELL * GRID + int(c) // CELL for r, c in zip(rows, cols)}
    kept = oracles.QuestionOracle(keep=len(text_cells)).select(grid_tokens({**task.reducer_context(doc_of(scene, "text"))}, GRID))
    assert set(kept.kept.tolist()) == text_cells
    spatial = task.reducer_context(doc_of(scene, "spatial"))[oracles.QUESTION_PIXELS].numpy()
    assert spatial[100, 60] and spatial[100, 100] and not spatial[20, 20]  # red circle and green square, not the rest


def test_foreground_oracle_on_the_merged_qwen_grid():
    scene = hand_made_scene()
    context = SynthVQA().reducer_context(doc_of(scene, "color"))
    side = GRID // 2  # 8x8 cells of 16 px, like ref-qwen-e2e's after the 2x2 merger
    foreground = foreground_by_cell(synthvqa.render(scene), side)
    kept = oracles.ForegroundOracle(keep=6).select(grid_tokens(context, side)).kept.tolist()
    assert set(kept) == set(np.argsort(-foreground, kind="stable")[:6].tolist())
    assert foreground[kept].min() >= np.sort(foreground)[-6]


def test_oracle_refuses_a_grid_the_pixels_do_not_split_into():
    context = SynthVQA().reducer_context(doc_of(hand_made_scene(), "color"))
    with pytest.raises(InputError, match="does not split"):
        oracles.ForegroundOracle(keep=4).select(grid_tokens(context, 24))


@pytest.mark.parametrize("model,side,keep", [("ref-llava-e2e", 16, 20), ("ref-qwen-e2e", 8, 6)])
def test_batch_equals_singles_and_the_pipeline_keeps_what_the_oracle_chose(model, side, keep):
    task = SynthVQA()
    docs = list(synthvqa.items("test", limit=14))[::3]  # five questions of two scenes, several types
    for doc in docs:
        doc["image"] = ImageRef(pil=doc["image"])
    pipeline = tokenomy.load(model, reducer=oracles.plan("oracle-question", keep=keep))
    images, prompts = [task.media(d) for d in docs], [task.prompt(d) for d in docs]
    contexts = [task.reducer_context(d) for d in docs]
    together = pipeline.generate(images, prompts, max_new_tokens=3, contexts=contexts)
    for doc, image, prompt, context, batched in zip(docs, images, prompts, contexts, together):
        (alone,) = pipeline.generate([image], [prompt], max_new_tokens=3, contexts=[context])
        assert alone.token_ids == batched.token_ids and alone.stats["kept_indices"] == batched.stats["kept_indices"]
        expected = oracles.QuestionOracle(keep=keep).select(grid_tokens(context, side)).kept.tolist()
        assert alone.stats["kept_indices"] == [expected] and alone.stats["visual_tokens_in"] == side * side


def test_oracles_are_refused_outside_synthvqa(tmp_path):
    assert not set(oracles.DIAGNOSTICS) & set(available())
    with pytest.raises(InputError, match="synthvqa diagnostic"):
        tokenomy.load("ref-llava-e2e", reducer="oracle-question", keep=16)
    pipeline = tokenomy.load("ref-llava-e2e", reducer=oracles.plan("oracle-foreground", keep=16))
    with pytest.raises(InputError, match="oracle-foreground is a synthvqa diagnostic"):
        pipeline.generate([synthvqa.render(hand_made_scene())], ["What word is written?"], max_new_tokens=1)
    data = tmp_path / "data"
    synthvqa.export_jsonl(data, "val", num_scenes=1)
    with pytest.raises(InputError, match="only synthvqa provides; task vqa-jsonl"):
        run_eval(EvalConfig(model="ref-llava-e2e", tasks=["vqa-jsonl"], data_dir=str(data), output_path=str(tmp_path / "o"),
                            reducers=["oracle-question"], keeps=[16]))
    with pytest.raises(InputError, match="run alone"):
        oracles.plan("oracle-question+fastv", keep=16)
    with pytest.raises(InputError, match="no option but keep, got 'seed'"):
        oracles.plan("oracle-question", keep=16, seed=1)
    assert oracles.plan("oracle-question", keep=16, **{"fastv.layer": 3}).keep == 16  # another reducer's option
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*_results.json"))


def test_synthvqa_runs_without_data_dir_and_other_tasks_still_need_it(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "--model", "ref-qwen-e2e", "--tasks", "synthvqa", "--reducers", "random,oracle-question",
                 "--keep", "4", "--limit", "7", "--output_path", str(out)]) == 0
    results = json.loads(next(out.rglob("*_results.json")).read_text())
    assert results["config"]["data_dir"] is None
    assert set(results["results"]["synthvqa"]) == {"random", "oracle-question"}
    assert results["results"]["synthvqa"]["oracle-question"]["4"]["efficiency"]["visual_tokens_kept"] == 4
    capsys.readouterr()
    assert main(["eval", "--model", "ref-qwen-e2e", "--tasks", "vqa-jsonl", "--output_path", str(out)]) == 2
    assert "task vqa-jsonl reads its files from --data-dir" in capsys.readouterr().err
