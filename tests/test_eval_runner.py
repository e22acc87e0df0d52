"""The runner on the real tiny-llava pipeline: reducer x keep sweep, outputs, efficiency block, --on-error,
SIGKILL + --resume, a 2-process gloo run, and the report."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from eval_fixtures import write_mixed_fixture, write_vqa_fixture
from tokenomy.cli import main as cli_main
from tokenomy.eval.cli import parse_kv, parse_limit
from tokenomy.errors import InputError
from tokenomy.eval.efficiency import layer_flops
from tokenomy.eval.report import report
from tokenomy.eval.runner import EvalConfig, apply_limit, run_eval
from tokenomy.eval.store import RunStore

REPO = Path(__file__).resolve().parent.parent
MEASURED = {"prefill_ms", "decode_ms_per_token", "e2e_ms", "peak_memory_mb", "batch_prefill_ms", "batch_decode_ms",
            "batch_e2e_ms", "date", "world_size"}
TINY = dict(model="tiny-llava", gen_kwargs={"max_new_tokens": 4})


def comparable(obj):
    """Drop what is measured (times, memory, date, world size) and keep everything that is computed."""
    if isinstance(obj, dict):
        return {k: comparable(v) for k, v in obj.items() if k not in MEASURED}
    if isinstance(obj, list):
        return [comparable(v) for v in obj]
    return obj


def samples(results_path, task="vqa-jsonl"):
    path = results_path.with_name(results_path.name.replace("_results.json", f"_samples_{task}.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines()]


def subprocess_env():
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    data = write_vqa_fixture(root / "data")
    config = EvalConfig(tasks=["vqa-jsonl"], data_dir=str(data), output_path=str(root / "out"), reducers=["none", "random", "fastv"],
                        keeps=[576, 16], batch_size=2, log_samples=True, reducer_args={"fastv.layer": 1}, **TINY)
    return run_eval(config)


def test_sweep_writes_results_and_samples(sweep):
    assert sweep.parent.name == "tiny-llava" and sweep.name.endswith("_results.json")
    results = json.loads(sweep.read_text())
    assert results["complete"] is True and "4*n_l*d^2" in results["flops_formula"]
    by_reducer = results["results"]["vqa-jsonl"]
    assert {r: set(k) for r, k in by_reducer.items()} == {"none": {"all"}, "random": {"576", "16"}, "fastv": {"576", "16"}}
    rows = samples(sweep)
    assert len(rows) == 5 * 6 and len({(r["reducer"], r["keep"], r["id"]) for r in rows}) == 30
    for reducer, keep in (("none", None), ("random", 576), ("random", 16), ("fastv", 16)):
        mine = [r for r in rows if (r["reducer"], r["keep"]) == (reducer, keep)]
        entry = by_reducer[reducer]["all" if keep is None else str(keep)]
        assert entry["metrics"]["accuracy"] == pytest.approx(100 * sum(r["score"] for r in mine) / 6)
        assert entry["n-samples"] == {"selected": 6, "scored": 6, "skipped": 0}
        eff = entry["efficiency"]
        assert eff["visual_tokens_in"] == 49  # tiny-llava: 7 x 7 patches
        assert eff["batches"] == 3 and eff["prefill_ms"] > 0 and eff["decode_ms_per_token"] > 0 and eff["peak_memory_mb"] > 0
    # pre-LLM pruning: every layer sees the kept tokens
    random16 = by_reducer["random"]["16"]["efficiency"]
    assert random16["visual_tokens_kept"] == 16 and random16["retention_layer_avg"] == pytest.approx(16 / 49)
    # FastV with fastv.layer=1 (K = 1 of 4 layers): layer 0 sees all 49, layers 1-3 see 16 -> (49 + 3*16) / 4
    fastv16 = by_reducer["fastv"]["16"]["efficiency"]
    assert fastv16["equivalent_visual_tokens"] == pytest.approx(24.25) and fastv16["retention_layer_avg"] == pytest.approx(24.25 / 49)
    row = next(r for r in rows if (r["reducer"], r["keep"]) == ("fastv", 16))
    text = row["prefill_tokens"] - 49
    assert row["prefill_flops"] == pytest.approx(layer_flops(text + 49, 32, 64) + 3 * layer_flops(text + 16, 32, 64))
    assert random16["prefill_tflops"] < fastv16["prefill_tflops"] < by_reducer["none"]["all"]["efficiency"]["prefill_tflops"]
    assert json.loads(sweep.read_text())["config"]["reducer_args"] == {"fastv.layer": 1}
    for field in ("id", "prompt", "prediction", "target", "score", "visual_tokens_in", "visual_tokens_kept", "kept_indices"):
        assert field in row
    assert row["prompt"].endswith("Answer the question using a single word or phrase.")
    assert len(row["kept_indices"][0]) == 16


def test_report_table_and_plot(sweep, capsys):
    table, plots = report(sweep.parent.parent)
    lines = table.splitlines()
    assert lines[0].startswith("| model | run | task | reducer | keep | metric | score | % of none")
    assert len(lines) == 2 + 5
    assert all("| tiny-llava |" in line for line in lines[2:])
    assert plots == [sweep.with_name(sweep.name.replace("_results.json", "_plot_vqa-jsonl.png"))]
    with Image.open(plots[0]) as img:
        assert img.size[0] > 100
    assert cli_main(["report", str(sweep.parent.parent)]) == 0
    assert "| vqa-jsonl | fastv | 16 |" in capsys.readouterr().out


def test_without_log_samples_only_results_remain(tmp_path):
    data = write_vqa_fixture(tmp_path / "data", n=2)
    path = run_eval(EvalConfig(tasks=["vqa-jsonl"], data_dir=str(data), output_path=str(tmp_path / "out"), **TINY))
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_on_error_skip_reports_ids_and_loses_nothing_else(tmp_path):
    clean = write_vqa_fixture(tmp_path / "clean")
    dirty = write_vqa_fixture(tmp_path / "dirty", bad=True)
    (dirty / "img" / "3.png").write_bytes(b"corrupt")  # exists but cannot be decoded: found at run time
    common = dict(tasks=["vqa-jsonl"], batch_size=2, log_samples=True, **TINY)
    clean_rows = samples(run_eval(EvalConfig(data_dir=str(clean), output_path=str(tmp_path / "a"), **common)))
    path = run_eval(EvalConfig(data_dir=str(dirty), output_path=str(tmp_path / "b"), **common))
    entry = json.loads(path.read_text())["results"]["vqa-jsonl"]["none"]["all"]
    assert {e["id"] for e in entry["errors"]} == {"missing-image", "no-answers", "broken-line", "q3"}
    assert entry["n-samples"] == {"selected": 9, "scored": 5, "skipped": 4}
    dirty_rows = {r["id"]: r for r in samples(path) if "error" not in r}
    assert set(dirty_rows) == {"q0", "q1", "q2", "q4", "q5"}
    for row in clean_rows:  # q2 shared its batch with the corrupt q3 and is still evaluated
        if row["id"] != "q3":
            assert dirty_rows[row["id"]]["prediction"] == row["prediction"]


def test_on_error_fail_names_the_sample(tmp_path):
    dirty = write_vqa_fixture(tmp_path / "dirty", bad=True)
    with pytest.raises(InputError, match="missing-image"):
        run_eval(EvalConfig(tasks=["vqa-jsonl"], data_dir=str(dirty), output_path=str(tmp_path / "o1"), on_error="fail", **TINY))
    clean = write_vqa_fixture(tmp_path / "clean")
    (clean / "img" / "3.png").write_bytes(b"corrupt")
    with pytest.raises(InputError, match="sample q3"):
        run_eval(EvalConfig(tasks=["vqa-jsonl"], data_dir=str(clean), output_path=str(tmp_path / "o2"), on_error="fail", **TINY))


def test_incomplete_chunks_and_cut_lines_are_dropped(tmp_path):
    store = RunStore(tmp_path, "run")
    rec = lambda i, start, n: {"reducer": "r", "keep": 4, "doc_index": i, "chunk_start": start, "chunk_len": n, "id": str(i)}
    store.journal("t", 0, [rec(0, 0, 2), rec(1, 0, 2)])
    store.journal("t", 1, [rec(2, 2, 2)])  # its partner never got written
    with open(store.part_path("t", 0), "a") as fh:
        fh.write('{"reducer": "r", "keep": 4, "doc_ind')  # cut by the kill
    store.commit("t", [rec(0, 0, 2), rec(1, 0, 2)])  # committed and still journaled: must not count twice
    kept = store.consolidate("t")
    assert sorted(r["doc_index"] for r in kept) == [0, 1]
    assert not list(tmp_path.glob("*.part"))
    assert len(store.samples_path("t").read_text().splitlines()) == 2


# The child stops itself at a known point (right after journaling the second chunk of the first `random`
# combination) and signals it with a marker file, so the kill lands mid-sweep on every machine, however fast.
PAUSE_AFTER_SECOND_RANDOM_CHUNK = """
import pathlib, sys, time
from tokenomy.eval.store import RunStore
journal, seen = RunStore.journal, []

def journal_then_pause(self, task, rank, records):
    journal(self, task, rank, records)
    seen.extend(r for r in records if r["reducer"] == "random")
    if len(seen) >= 4:
        pathlib.Path(sys.argv[1]).write_text("paused")
        time.sleep(600)

RunStore.journal = journal_then_pause
from tokenomy.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    data = write_vqa_fixture(tmp_path / "data", n=16)
    out = tmp_path / "killed"
    marker = tmp_path / "paused"
    command = [sys.executable, "-c", PAUSE_AFTER_SECOND_RANDOM_CHUNK, str(marker), "eval", "--model", "tiny-llava",
               "--reducer", "none,random", "--keep", "576,64", "--tasks", "vqa-jsonl", "--data-dir", str(data),
               "--output_path", str(out), "--log_samples", "--batch_size", "2", "--gen_kwargs", "max_new_tokens=8"]
    proc = subprocess.Popen(command, env=subprocess_env(), stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    folder = out / "tiny-llava"
    try:
        while not marker.exists():
            assert proc.poll() is None, "the evaluation ended before reaching its pause point"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    state = json.loads(next(folder.glob("*_results.json")).read_text())
    assert state["complete"] is False and list(state["results"]["vqa-jsonl"]) == ["none"], state["results"]
    (journal,) = folder.glob("*.part")
    assert len(journal.read_text().splitlines()) == 4, "the kill should leave two journaled chunks of random@576"

    same = dict(tasks=["vqa-jsonl"], data_dir=str(data), reducers=["none", "random"], keeps=[576, 64], batch_size=2,
                log_samples=True, model="tiny-llava", gen_kwargs={"max_new_tokens": 8})  # what the command line says
    resumed = run_eval(EvalConfig(output_path=str(out), resume=True, **same))
    assert [resumed] == list(folder.glob("*_results.json"))  # the killed run was continued, not restarted
    full = run_eval(EvalConfig(output_path=str(tmp_path / "full"), **same))
    assert comparable(json.loads(resumed.read_text())) == comparable(json.loads(full.read_text()))
    key = lambda r: (r["reducer"], r["keep"] or 0, r["doc_index"])
    assert comparable(sorted(samples(resumed), key=key)) == comparable(sorted(samples(full), key=key))
    assert len(samples(resumed)) == 3 * 16 and not list(folder.glob("*.part"))


def test_resume_refuses_changed_data(tmp_path):
    data = write_vqa_fixture(tmp_path / "data", n=3)
    config = dict(tasks=["vqa-jsonl"], data_dir=str(data), output_path=str(tmp_path / "out"), reducers=["none", "random"],
                  keeps=[8], log_samples=True, **TINY)
    path = run_eval(EvalConfig(**config))
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "complete": False}))  # as if killed before the end
    lines = (data / "qa.jsonl").read_text().splitlines()
    (data / "qa.jsonl").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(InputError, match="data changed"):
        run_eval(EvalConfig(resume=True, **config))


def test_resume_refuses_different_arguments(tmp_path):
    data = write_vqa_fixture(tmp_path / "data", n=2)
    store_dir = tmp_path / "out" / "tiny-llava"
    store_dir.mkdir(parents=True)
    (store_dir / "20260101T000000_results.json").write_text(json.dumps({"complete": False, "results": {}, "config": {"seed": 99}}))
    with pytest.raises(InputError, match="20260101T000000: that run used different .*seed"):
        run_eval(EvalConfig(tasks=["vqa-jsonl"], data_dir=str(data), output_path=str(tmp_path / "out"),
                            resume="20260101T000000", **TINY))


def test_two_processes_equal_one(tmp_path):
    data = write_vqa_fixture(tmp_path / "data", n=7)
    args = ["--model", "tiny-llava", "--reducer", "none,random", "--keep", "16", "--tasks", "vqa-jsonl", "--data-dir", str(data),
            "--log_samples", "--gen_kwargs", "max_new_tokens=4"]
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "tokenomy.cli", "eval", *args, "--output_path", str(tmp_path / "two")],
                              env=subprocess_env(), capture_output=True, text=True)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert cli_main(["eval", *args, "--output_path", str(tmp_path / "one")]) == 0
    single = next((tmp_path / "one" / "tiny-llava").glob("*_results.json"))
    double = next((tmp_path / "two" / "tiny-llava").glob("*_results.json"))
    assert json.loads(double.read_text())["world_size"] == 2
    assert comparable(json.loads(double.read_text())) == comparable(json.loads(single.read_text()))
    key = lambda r: (r["reducer"], r["doc_index"])
    assert comparable(sorted(samples(double), key=key)) == comparable(sorted(samples(single), key=key))
    assert not list((tmp_path / "two").rglob("*.part"))


def test_cli_value_parsing():
    assert parse_kv("dtype=float32,layer=3,ratio=0.5,flag=true,none=None") == {"dtype": "float32", "layer": 3, "ratio": 0.5,
                                                                              "flag": True, "none": None}
    assert parse_limit("10") == 10 and parse_limit("0.25") == 0.25 and parse_limit(None) is None
    with pytest.raises(InputError, match="key=value"):
        parse_kv("layer")


def test_cli_lists_tasks_and_rejects_bad_arguments(tmp_path, capsys):
    assert cli_main(["eval", "--tasks", "list"]) == 0
    listing = capsys.readouterr().out
    assert "vqa-jsonl" in listing and "mmbench-judge" in listing and "judge" in listing
    data = write_vqa_fixture(tmp_path / "data", n=1)
    assert cli_main(["eval", "--model", "tiny-llava", "--reducer", "random", "--tasks", "vqa-jsonl", "--data-dir", str(data)]) == 2
    assert "need --keep" in capsys.readouterr().err
    assert cli_main(["eval", "--model", "tiny-llava", "--tasks", "vqa-jsonl,nope", "--data-dir", str(data)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert cli_main(["eval", "--model", "tiny-llava", "--reducer", "none,fastvv", "--keep", "8", "--tasks", "vqa-jsonl",
                     "--data-dir", str(data), "--output_path", str(tmp_path / "out")]) == 2
    assert "unknown reducer 'fastvv'" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_benchmark_layouts_and_video_through_the_pipeline(tmp_path):
    data = write_mixed_fixture(tmp_path / "data")
    path = run_eval(EvalConfig(tasks=["pope", "mme", "mmbench", "videomme"], data_dir=str(data), output_path=str(tmp_path / "out"),
                               reducers=["none", "random"], keeps=[8], batch_size=2, log_samples=True, video_frames=3, **TINY))
    results = json.loads(path.read_text())
    assert results["task_configs"]["videomme"]["frames"] == 3
    pope = results["results"]["pope"]["random"]["8"]
    assert set(pope["metrics"]) >= {"accuracy", "precision", "recall", "f1", "yes_ratio", "random"}
    assert pope["metrics"]["random"]["n"] == 2
    mme = results["results"]["mme"]["none"]["all"]["metrics"]
    assert set(mme["subtasks"]) == {"existence"} and mme["cognition"] == 0.0
    assert results["results"]["mmbench"]["none"]["all"]["metrics"]["groups"] == 1
    assert results["results"]["mmbench"]["none"]["all"]["n-samples"]["scored"] == 2  # both rotations
    video = results["results"]["videomme"]
    assert video["none"]["all"]["efficiency"]["visual_tokens_in"] == 3 * 49  # three frames, one image each
    assert video["random"]["8"]["efficiency"]["visual_tokens_kept"] == 3 * 8  # the budget applies per frame
    rows = samples(path, "videomme")
    assert rows[0]["prompt"].endswith("D. a dog\nThe best answer is:") and len(rows[0]["kept_indices"]) == 3


def test_limit_and_sweep_plan():
    assert apply_limit(list(range(10)), 3) == [0, 1, 2] and apply_limit(list(range(10)), 0.25) == [0, 1, 2]
    config = EvalConfig(model="m", tasks=["vqa-jsonl"], data_dir=".", output_path=".", reducers=["none", "random", "none"], keeps=[64, 16])
    assert config.combos() == [("none", None), ("random", 64), ("random", 16)]
