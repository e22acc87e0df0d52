"""The shipped reference models answer synthvqa; the eval harness scores synthvqa per question type."""
import json

import pytest

import tokenomy
from tokenomy.eval import synthvqa
from tokenomy.eval.runner import EvalConfig, run_eval
from tokenomy.eval.synthvqa_eval import evaluate

SUBSET = 200  # the first 200 test questions: every question type, fixed forever


@pytest.mark.parametrize("name, tokens", [("ref-llava", 256), ("ref-qwen", 64)])
def test_reference_model_answers_synthvqa(name, tokens):
    pipeline = tokenomy.load(name)
    result = evaluate(pipeline, synthvqa.items("test", limit=SUBSET), batch_size=20)
    assert result["count"] == SUBSET and set(result["per_type"]) == set(synthvqa.QUESTION_TYPES)
    assert result["visual_tokens_kept"] == tokens
    assert result["overall"] >= 80.0, result


def test_synthvqa_task_in_the_harness(tmp_path):
    path = run_eval(EvalConfig(model="ref-llava", tasks=["synthvqa"], data_dir=str(tmp_path), output_path=str(tmp_path / "out"),
                               reducers=["none", "random"], keeps=[28], limit=14, batch_size=7))
    results = json.loads(path.read_text())["results"]["synthvqa"]
    full, pruned = results["none"]["all"]["metrics"], results["random"]["28"]["metrics"]
    for metrics in (full, pruned):
        assert set(metrics) == {"accuracy"} | {f"accuracy_{kind}" for kind in synthvqa.QUESTION_TYPES}
        per_type = [metrics[f"accuracy_{kind}"] for kind in synthvqa.QUESTION_TYPES]
        assert metrics["accuracy"] == pytest.approx(sum(per_type) / len(per_type))  # 2 questions of each type
    assert results["random"]["28"]["efficiency"]["visual_tokens_kept"] == 28
