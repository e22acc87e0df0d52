"""tokenomy inside lmms-eval: the `lmms-eval --model tokenomy` CLI, offline, on a local task and dataset written here,
scores what `tokenomy eval` scores on the same synthvqa questions; batches reach Pipeline.generate whole."""
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (optional extra: pip install "
                                "'tokenomy[lmms]', or `make test`, which installs it)")

from tokenomy.cli import main as tokenomy_cli  # noqa: E402
from tokenomy.eval import synthvqa  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = 20
REDUCER, KEEP, BATCH = "random", 16, 4

TASK_YAML = """\
task: synthvqa_local
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answers
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

TASK_UTILS = '''\
from tokenomy.eval import synthvqa


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]  # the bare question, as tokenomy's synthvqa task asks it


def process_results(doc, results):
    return {"exact_match": float(synthvqa.is_correct(results[0], doc["answers"]))}
'''


def entry_point_shim(folder: Path) -> Path:
    """A dist-info declaring tokenomy's `lmms_eval.models` entry point, for a tokenomy that was installed before
    pyproject.toml declared it (the entry point itself is the one pyproject.toml declares)."""
    info = folder / "tokenomy_lmms_entry_point-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tokenomy-lmms-entry-point\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[lmms_eval.models]\ntokenomy = tokenomy.eval.lmms_eval_model:manifest\n")
    return folder


def test_lmms_eval_cli_matches_tokenomy_eval(tmp_path):
    import datasets

    exported = synthvqa.export_jsonl(tmp_path / "export", "test", num_scenes=QUESTIONS // 4 + 1)
    rows = [json.loads(line) for line in exported.read_text().splitlines()][:QUESTIONS + 4]
    for row in rows:
        row["image"] = str(exported.parent / row["image"])
    table = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": table}).save_to_disk(str(tmp_path / "data"))
    tasks = tmp_path / "tasks" / "synthvqa_local"
    tasks.mkdir(parents=True)
    (tasks / "synthvqa_local.yaml").write_text(TASK_YAML.format(data=tmp_path / "data"))
    (tasks / "utils.py").write_text(TASK_UTILS)

    declared = any(ep.name == "tokenomy" for ep in importlib.metadata.entry_points(group="lmms_eval.models"))
    path = [str(ROOT)] + ([] if declared else [str(entry_point_shim(tmp_path / "site"))])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path + [os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "lmms_eval", "--model", "tokenomy",
               "--model_args", f"pretrained=ref-llava-e2e,reducer={REDUCER},keep={KEEP}", "--tasks", "synthvqa_local",
               "--include_path", str(tmp_path / "tasks"), "--batch_size", str(BATCH), "--limit", str(QUESTIONS),
               "--output_path", str(tmp_path / "lmms_out"), "--log_samples"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (results_file,) = (tmp_path / "lmms_out").rglob("*_results.json")
    lmms_results = json.loads(results_file.read_text())
    assert lmms_results["n-samples"]["synthvqa_local"]["effective"] == QUESTIONS
    lmms_accuracy = lmms_results["results"]["synthvqa_local"]["exact_match,none"] * 100
    (samples_file,) = (tmp_path / "lmms_out").rglob("*_samples_synthvqa_local.jsonl")
    lmms_predictions = {}
    for line in samples_file.read_text().splitlines():
        sample = json.loads(line)
        response = sample["filtered_resps"]
        while isinstance(response, list):
            response = response[0]
        lmms_predictions[sample["doc_id"]] = response

    assert tokenomy_cli(["eval", "--model", "ref-llava-e2e", "--tasks", "synthvqa", "--data-dir", str(tmp_path), "--reducers", REDUCER, "--keep", str(KEEP),
                         "--limit", str(QUESTIONS), "--batch_size", str(BATCH), "--output_path", str(tmp_path / "ours"),
                         "--log_samples"]) == 0
    (ours_file,) = (tmp_path / "ours").rglob("*_results.json")
    ours = json.loads(ours_file.read_text())
    assert ours["results"]["synthvqa"][REDUCER][str(KEEP)]["n-samples"]["scored"] == QUESTIONS
    assert lmms_accuracy == pytest.approx(ours["results"]["synthvqa"][REDUCER][str(KEEP)]["metrics"]["accuracy"], abs=1e-9)
    (ours_samples,) = (tmp_path / "ours").rglob("*_samples_synthvqa.jsonl")
    our_predictions = {}
    for line in ours_samples.read_text().splitlines():
        sample = json.loads(line)
        our_predictions[sample["doc_index"]] = sample["normalized_prediction"]
    assert {doc: synthvqa.normalize_answer(text) for doc, text in lmms_predictions.items()} == our_predictions



def test_batches_reach_pipeline_whole_and_stop_strings_cut():
    from types import SimpleNamespace

    from tests.test_vis import bright_image
    from tokenomy.eval.lmms_eval_adapter import TokenomyLMMS

    model = TokenomyLMMS.create_from_arg_string("pretrained=tiny-llava,reducer=random,keep=4", {"batch_size": 3, "device": None})
    docs = [{"image": bright_image(56, 56, seed=seed), "question": f"Question {seed}?"} for seed in range(7)]
    model.task_dict = {"local": {"test": docs}}
    greedy, longer = {"max_new_tokens": 3, "until": ["\n\n"]}, {"max_new_tokens": 5, "until": ["\n\n"]}
    settings = [greedy, greedy, longer, greedy, greedy, longer, greedy]
    requests = [SimpleNamespace(args=(doc["question"], kwargs, lambda d: [d["image"]], index, "local", "test"))
                for index, (doc, kwargs) in enumerate(zip(docs, settings))]
    calls, generate = [], model.pipeline.generate

    def counting(images, prompts, **kwargs):
        calls.append((len(prompts), kwargs["max_new_tokens"]))
        return generate(images, prompts, **kwargs)

    model.pipeline.generate = counting
    answers = model.generate_until(requests)
    assert calls == [(3, 3), (2, 3), (2, 5)]  # runs of at most batch_size sharing generation settings, in order
    singles = [generate([[doc["image"]]], [doc["question"]], max_new_tokens=kwargs["max_new_tokens"])[0].text
               for doc, kwargs in zip(docs, settings)]
    assert answers == singles
    assert len(singles[0]) >= 2
    stop = singles[0][1]  # a stop string cuts the answer where it first occurs
    requests[0].args[1]["until"] = [stop]
    assert model.generate_until(requests[:1]) == [singles[0].split(stop)[0]]
