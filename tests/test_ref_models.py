"""The shipped reference models answer synthvqa from the image; the eval harness scores synthvqa per question type."""
import json

import pytest

import tokenomy
from tokenomy.eval import synthvqa
from tokenomy.eval.runner import EvalConfig, run_eval
from tokenomy.eval.synthvqa_eval import evaluate

SUBSET = 200  # the first 200 test questions: every question type, fixed forever
MODELS = [("ref-llava-e2e", 256), ("ref-qwen-e2e", 64)]


@pytest.fixture(scope="module")
def subset():
    return list(synthvqa.items("test", limit=SUBSET))


@pytest.fixture(scope="module", params=MODELS, ids=[name for name, _ in MODELS])
def scored(request, subset):
    name, tokens = request.param
    pipeline = tokenomy.load(name)
    result = evaluate(pipeline, subset, batch_size=20)
    assert result["count"] == SUBSET and set(result["per_type"]) == set(synthvqa.QUESTION_TYPES)
    assert result["visual_tokens_kept"] == tokens
    return name, pipeline, result


def test_reference_model_reads_the_image(scored, subset):
    name, pipeline, result = scored
    # Each question paired with the next scene's image: what the answer priors alone reach.
    per_scene = len(synthvqa.QUESTION_TYPES)
    blind = [{**item, "image": subset[(i + per_scene) % len(subset)]["image"]} for i, item in enumerate(subset)]
    blind_result = evaluate(pipeline, blind, batch_size=20)
    assert result["overall"] >= blind_result["overall"] + 8, (result, blind_result)
    assert result["per_type"]["small"] >= 60.0, result  # a 6-8 px object, found among 256 (or 64) tokens


def test_reference_model_meets_the_issue_target(scored):
    assert scored[2]["overall"] >= 80.0, scored[2]


def test_synthvqa_task_in_the_harness(tmp_path):
    path = run_eval(EvalConfig(model="ref-llava-e2e", tasks=["synthvqa"], data_dir=str(tmp_path), output_path=str(tmp_path / "out"),
                               reducers=["none", "random"], keeps=[28], limit=14, batch_size=7))
    results = json.loads(path.read_text())["results"]["synthvqa"]
    full, pruned = results["none"]["all"]["metrics"], results["random"]["28"]["metrics"]
    for metrics in (full, pruned):
        assert set(metrics) == {"accuracy"} | {f"accuracy_{kind}" for kind in synthvqa.QUESTION_TYPES}
        per_type = [metrics[f"accuracy_{kind}"] for kind in synthvqa.QUESTION_TYPES]
        assert metrics["accuracy"] == pytest.approx(sum(per_type) / len(per_type))  # 2 questions of each type
    assert results["random"]["28"]["efficiency"]["visual_tokens_kept"] == 28


def test_names_of_unshipped_models_say_so():
    from tokenomy.errors import ModelLoadError

    for name, shipped in (("ref-llava", "ref-llava-e2e"), ("ref-qwen", "ref-qwen-e2e")):
        with pytest.raises(ModelLoadError, match=f"not shipped.*'{shipped}'"):
            tokenomy.load(name)
