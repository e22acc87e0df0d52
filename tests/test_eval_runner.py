"""The runner: reducer x keep sweep, outputs, --on-error, SIGKILL + --resume, 2-process gloo run, report."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from PIL import Image

from eval_fakes import fake_load, spawn_worker, write_vqa_fixture
from tokenomy.errors import InputError
from tokenomy.eval.report import report
from tokenomy.eval.runner import EvalConfig, run_eval
from tokenomy.eval.store import RunStore

TESTS_DIR = Path(__file__).parent
REPO = TESTS_DIR.parent
MEASURED = {"prefill_ms", "decode_ms_per_token", "e2e_ms", "peak_memory_mb", "batch_prefill_ms", "batch_decode_ms",
            "batch_e2e_ms", "date", "world_size"}


def comparable(obj):
    """Drop what is measured (times, memory, date) and keep everything that is computed."""
    if isinstance(obj, dict):
        return {k: comparable(v) for k, v in obj.items() if k not in MEASURED}
    if isinstance(obj, list):
        return [comparable(v) for v in obj]
    return obj


def config(tmp_path, data, out, **kw):
    base = dict(model="fake-llava", tasks=["vqa-jsonl"], data_dir=str(data), output_path=str(out),
                reducers=["none", "random"], keeps=[16, 4], batch_size=2, log_samples=True, seed=3)
    return EvalConfig(**{**base, **kw})


def samples(results_path, task="vqa-jsonl"):
    path = results_path.with_name(results_path.name.replace("_results.json", f"_samples_{task}.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sweep_writes_results_and_samples(tmp_path):
    data = write_vqa_fixture(tmp_path / "data")
    path = run_eval(config(tmp_path, data, tmp_path / "out"), load_fn=fake_load)
    assert path.parent == tmp_path / "out" / "fake-llava" and path.name.endswith("_results.json")
    results = json.loads(path.read_text())
    assert results["complete"] is True
    by_reducer = results["results"]["vqa-jsonl"]
    assert set(by_reducer) == {"none", "random"} and set(by_reducer["none"]) == {"all"} and set(by_reducer["random"]) == {"16", "4"}
    rows = samples(path)
    assert len(rows) == 3 * 6
    for reducer, keep in (("none", None), ("random", 16), ("random", 4)):
        mine = [r for r in rows if (r["reducer"], r["keep"]) == (reducer, keep)]
        entry = by_reducer[reducer]["all" if keep is None else str(keep)]
        assert entry["metrics"]["accuracy"] == pytest.approx(100 * sum(r["score"] for r in mine) / 6)
        eff = entry["efficiency"]
        assert eff["visual_tokens_in"] == 16 and eff["visual_tokens_kept"] == (keep or 16)
        assert eff["retention_layer_avg"] == pytest.approx((keep or 16) / 16)
        assert eff["batches"] == 3 and eff["prefill_ms"] == pytest.approx(1.0) and eff["decode_ms_per_token"] == pytest.approx(1.0)
        assert "4*n_l*d^2" in eff["flops_formula"] and eff["prefill_tflops"] > 0
        assert entry["n-samples"] == {"selected": 6, "scored": 6, "skipped": 0}
    assert by_reducer["random"]["4"]["efficiency"]["prefill_tflops"] < by_reducer["none"]["all"]["efficiency"]["prefill_tflops"]
    first = rows[0]
    for field in ("id", "prompt", "prediction", "target", "score", "visual_tokens_in", "visual_tokens_kept", "kept_indices"):
        assert field in first
    assert first["prompt"].endswith("Answer the question using a single word or phrase.")


def test_without_log_samples_only_results_remain(tmp_path):
    data = write_vqa_fixture(tmp_path / "data", n=2)
    path = run_eval(config(tmp_path, data, tmp_path / "out", log_samples=False, reducers=["none"]), load_fn=fake_load)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_on_error_skip_reports_ids_and_loses_nothing_else(tmp_path):
    clean = write_vqa_fixture(tmp_path / "clean")
    dirty = write_vqa_fixture(tmp_path / "dirty", bad=True)
    Image.new("RGB", (2, 2)).save(dirty / "img" / "5.png")  # still readable
    (dirty / "img" / "3.png").write_bytes(b"corrupt")  # exists, cannot be decoded: found at run time
    clean_rows = samples(run_eval(config(tmp_path, clean, tmp_path / "a", reducers=["none"]), load_fn=fake_load))
    path = run_eval(config(tmp_path, dirty, tmp_path / "b", reducers=["none"]), load_fn=fake_load)
    entry = json.loads(path.read_text())["results"]["vqa-jsonl"]["none"]["all"]
    assert {e["id"] for e in entry["errors"]} == {"missing-image", "no-answers", "broken-line", "q3"}
    assert entry["n-samples"] == {"selected": 6, "scored": 5, "skipped": 4}
    dirty_rows = {r["id"]: r for r in samples(path) if "error" not in r}
    assert set(dirty_rows) == {"q0", "q1", "q2", "q4", "q5"}
    for row in clean_rows:  # the good samples sharing a batch with the corrupt one are still evaluated
        if row["id"] in ("q0", "q1", "q2", "q4"):
            assert dirty_rows[row["id"]]["prediction"] == row["prediction"]


def test_on_error_fail_names_the_sample(tmp_path):
    dirty = write_vqa_fixture(tmp_path / "dirty", bad=True)
    with pytest.raises(InputError, match="missing-image"):
        run_eval(config(tmp_path, dirty, tmp_path / "out", on_error="fail"), load_fn=fake_load)
    clean = write_vqa_fixture(tmp_path / "clean")
    (clean / "img" / "3.png").write_bytes(b"corrupt")
    with pytest.raises(InputError, match="sample q3"):
        run_eval(config(tmp_path, clean, tmp_path / "out2", on_error="fail"), load_fn=fake_load)


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


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    data = write_vqa_fixture(tmp_path / "data", n=10)
    kwargs = dict(model="fake-llava", tasks=["vqa-jsonl"], data_dir=str(data), reducers=["random"], keeps=[16, 4],
                  batch_size=2, log_samples=True, seed=5, model_args={"delay_s": 0.15})
    full = run_eval(EvalConfig(output_path=str(tmp_path / "full"), **kwargs), load_fn=fake_load)

    out = tmp_path / "killed"
    script = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
              "import json; from eval_fakes import fake_load\n"
              "from tokenomy.eval.runner import EvalConfig, run_eval\n"
              "run_eval(EvalConfig(**json.loads(sys.argv[3])), load_fn=fake_load)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(TESTS_DIR), str(REPO), json.dumps({**kwargs, "output_path": str(out)})],
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    folder = out / "fake-llava"
    # Kill in the middle of the second combination, once the first one has been committed.
    while time.time() < deadline:
        parts = list(folder.glob("*.part")) if folder.exists() else []
        committed = list(folder.glob("*_samples_vqa-jsonl.jsonl")) if folder.exists() else []
        if committed and parts and len(parts[0].read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_state = json.loads(next(folder.glob("*_results.json")).read_text())
    assert killed_state["complete"] is False and "4" not in killed_state["results"]["vqa-jsonl"]["random"]

    resumed = run_eval(EvalConfig(output_path=str(out), resume=True, **kwargs), load_fn=fake_load)
    assert resumed.name == next(folder.glob("*_results.json")).name  # same run, same files
    assert comparable(json.loads(resumed.read_text())) == comparable(json.loads(full.read_text()))
    key = lambda r: (r["keep"], r["doc_index"])
    assert comparable(sorted(samples(resumed), key=key)) == comparable(sorted(samples(full), key=key))
    assert len(samples(resumed)) == 20


def test_resume_refuses_different_arguments(tmp_path):
    data = write_vqa_fixture(tmp_path / "data", n=2)
    store_dir = tmp_path / "out" / "fake-llava"
    store_dir.mkdir(parents=True)
    (store_dir / "20260101T000000_results.json").write_text(json.dumps({"complete": False, "config": {"seed": 99}}))
    with pytest.raises(InputError, match="seed"):
        run_eval(config(tmp_path, data, tmp_path / "out", resume=True), load_fn=fake_load)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    data = write_vqa_fixture(tmp_path / "data", n=7)
    kwargs = dict(model="fake-llava", tasks=["vqa-jsonl"], data_dir=str(data), reducers=["none", "random"], keeps=[4],
                  batch_size=1, log_samples=True, seed=1)
    single = run_eval(EvalConfig(output_path=str(tmp_path / "one"), **kwargs), load_fn=fake_load)
    mp.spawn(spawn_worker, args=(2, free_port(), {**kwargs, "output_path": str(tmp_path / "two")}), nprocs=2, join=True)
    double = next((tmp_path / "two" / "fake-llava").glob("*_results.json"))
    assert json.loads(double.read_text())["world_size"] == 2
    assert comparable(json.loads(double.read_text())) == comparable(json.loads(single.read_text()))
    key = lambda r: (r["reducer"], r["doc_index"])
    assert comparable(sorted(samples(double), key=key)) == comparable(sorted(samples(single), key=key))
    assert not list((tmp_path / "two").rglob("*.part"))


def test_report_table_and_plot(tmp_path):
    data = write_vqa_fixture(tmp_path / "data")
    path = run_eval(config(tmp_path, data, tmp_path / "out"), load_fn=fake_load)
    table, plots = report(tmp_path / "out")
    lines = table.splitlines()
    assert lines[0].startswith("| model | run | task | reducer | keep | metric | score | % of none")
    assert len(lines) == 2 + 3
    none_row = next(line for line in lines if "| none |" in line)
    assert "| 100.00 |" in none_row
    assert plots == [path.with_name(path.name.replace("_results.json", "_plot_vqa-jsonl.png"))]
    with Image.open(plots[0]) as img:
        assert img.size[0] > 100
