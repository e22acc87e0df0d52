"""Video-MME through `tokenomy eval` with videos written here by PyAV: a model that reads videos gets each sample's
video (tiny-qwen2-vl; tiny-qwen2.5-omni with its audio track), read by tokenomy.io like the frames a model without
video input gets as images; batch of 2 = batch of 1; an interrupted run resumed equals an uninterrupted one."""
import json

import pytest

import tokenomy
from tests.media_fixtures import write_video
from tokenomy.cli import main as cli_main
from tokenomy.eval import tasks
from tokenomy.eval.runner import EvalConfig, run_eval
from tokenomy.eval.store import RunStore
from tokenomy.io import VideoFile, video_frames

FRAMES = 4
SIDE = 56


def write_videomme(root, audio=False):
    """Four questions on three videos; v2 has 3 frames, fewer than FRAMES (then every frame once)."""
    for name, frames in (("v0", 16), ("v1", 12), ("v2", 3)):
        write_video(root / "videomme" / "data" / f"{name}.mp4", n_frames=frames, size=SIDE,
                    audio_seconds=frames / 8 if audio else None)
    rows = [{"question_id": f"q{i}", "videoID": video, "duration": "short", "question": question,
             "options": ["A. dark", "B. bright", "C. red", "D. blue"], "answer": "AB"[i % 2]}
            for i, (video, question) in enumerate((("v0", "What happens?"), ("v1", "Which colour is it at the end?"),
                                                   ("v2", "Is it bright?"), ("v0", "How does the video end, in a word?")))]
    (root / "videomme" / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def run_cli(data, out, model, reducer, keep, batch_size, *extra):
    assert cli_main(["eval", "--model", model, "--reducer", reducer, *(["--keep", keep] if keep else []), "--tasks", "videomme",
                     "--data-dir", str(data), "--output_path", str(out), "--batch_size", str(batch_size), "--video_frames", str(FRAMES),
                     "--log_samples", "--gen_kwargs", "max_new_tokens=3", *extra]) == 0
    (path,) = (out / model).glob("*_results.json")
    return json.loads(path.read_text()), path


def sample_rows(path):
    name = path.name.replace("_results.json", "_samples_videomme.jsonl")
    return sorted((json.loads(line) for line in path.with_name(name).read_text().splitlines()),
                  key=lambda r: (r["reducer"], r["doc_index"]))


def computed(rows):
    """What a run computes per sample (its times and batch fields aside)."""
    keys = ("id", "reducer", "keep", "prediction", "parsed", "score", "visual_tokens_in", "visual_tokens_kept",
            "kept_indices", "prefill_tokens")
    return [{key: row[key] for key in keys} for row in rows]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_videomme(tmp_path_factory.mktemp("videomme"))


def test_a_video_model_gets_videos_and_batch_equals_singles(data, tmp_path):
    results, path = run_cli(data, tmp_path / "b2", "tiny-qwen2-vl", "none,random", "4", 2)
    assert results["complete"] and results["task_configs"]["videomme"]["video_input"] == "video"
    rows = sample_rows(path)
    assert [row["batch_size"] for row in rows if row["reducer"] == "random"] == [2, 2, 2, 2]
    # One video item per sample (as images the 4 frames would be 4 items), of 2 temporal grids, also for the 3-frame
    # video (its last frame fills the second grid).
    assert [len(row["kept_indices"]) for row in rows] == [1] * 8
    assert len({row["visual_tokens_in"] for row in rows}) == 1
    assert [row["visual_tokens_kept"] for row in rows if row["reducer"] == "random"] == [4] * 4
    # What the eval fed the model is what Pipeline.generate(videos=VideoFile) gives for the same sample.
    task = tasks.get("videomme")
    task.n_frames = FRAMES
    doc = task.load(data).docs[1]
    pipeline = tokenomy.load("tiny-qwen2-vl", "random", keep=4)
    (direct,) = pipeline.generate([None], [task.prompt(doc)], max_new_tokens=3, videos=[VideoFile(doc["video"], n_frames=FRAMES)])
    random_rows = [row for row in rows if row["reducer"] == "random"]
    assert direct.text == random_rows[1]["prediction"] and direct.stats["kept_indices"] == random_rows[1]["kept_indices"]
    assert direct.stats["visual_tokens_in"] == rows[0]["visual_tokens_in"]
    _, single = run_cli(data, tmp_path / "b1", "tiny-qwen2-vl", "none,random", "4", 1)
    assert computed(sample_rows(single)) == computed(rows)


def test_a_model_without_video_input_gets_the_frames_as_images(data, tmp_path):
    results, path = run_cli(data, tmp_path / "llava", "tiny-llava", "random", "8", 2, "--limit", "2")
    assert results["task_configs"]["videomme"]["video_input"] == "frames as images"
    rows = sample_rows(path)
    assert [row["visual_tokens_in"] for row in rows] == [FRAMES * 49] * 2  # one 7 x 7 image per frame
    assert [len(row["kept_indices"]) for row in rows] == [FRAMES] * 2


def test_omni_hears_the_audio_track_of_each_video(tmp_path):
    heard = write_videomme(tmp_path / "heard", audio=True)
    results, path = run_cli(heard, tmp_path / "out", "tiny-qwen2.5-omni", "random", "6", 2, "--limit", "2")
    assert results["task_configs"]["videomme"]["video_input"] == "video with its audio track"
    rows = sample_rows(path)
    # The same frames without their audio track make fewer tokens.
    task = tasks.get("videomme")
    task.n_frames = FRAMES
    docs = task.load(heard).docs
    pipeline = tokenomy.load("tiny-qwen2.5-omni", "random", keep=6)
    for row, doc in zip(rows, docs):
        (direct,) = pipeline.generate([None], [task.prompt(doc)], max_new_tokens=3, videos=[task.video(doc)])
        assert direct.stats["video_audio"][0].endswith("16000 Hz mono")
        assert row["visual_tokens_in"] == direct.stats["visual_tokens_in"]
        assert direct.stats["visual_tokens_in"] > pipeline.generate([None], [task.prompt(doc)], max_new_tokens=1,
                                                                    videos=[video_frames(task.video(doc))])[0].stats["visual_tokens_in"]
        assert row["visual_tokens_kept"] == 6 and row["prediction"] == direct.text


class Interrupted(Exception):
    pass


def test_an_interrupted_video_run_resumes_to_the_uninterrupted_result(data, tmp_path, monkeypatch):
    config = dict(model="tiny-qwen2-vl", tasks=["videomme"], data_dir=str(data), reducers=["none", "random"], keeps=[4],
                  batch_size=2, log_samples=True, video_frames=FRAMES, gen_kwargs={"max_new_tokens": 3})
    journal, journaled = RunStore.journal, []

    def journal_then_stop(store, task, rank, records):
        journal(store, task, rank, records)
        journaled.append(records)
        if records[0]["reducer"] == "random":
            raise Interrupted  # after the first chunk of random@4, with none@all finished

    monkeypatch.setattr(RunStore, "journal", journal_then_stop)
    with pytest.raises(Interrupted):
        run_eval(EvalConfig(output_path=str(tmp_path / "cut"), **config))
    monkeypatch.setattr(RunStore, "journal", journal)
    assert [len(records) for records in journaled] == [2, 2, 2]
    resumed = run_eval(EvalConfig(output_path=str(tmp_path / "cut"), resume=True, **config))
    full = run_eval(EvalConfig(output_path=str(tmp_path / "full"), **config))
    drop = ("date", "e2e_ms", "prefill_ms", "decode_ms_per_token", "peak_memory_mb")
    strip = lambda block: {k: v for k, v in block.items() if k not in drop}
    for name in (resumed, full):
        results = json.loads(name.read_text())
        assert results["complete"] and results["task_configs"]["videomme"]["video_input"] == "video"
    resumed_results, full_results = (json.loads(p.read_text())["results"]["videomme"] for p in (resumed, full))
    for reducer, keep in (("none", "all"), ("random", "4")):
        assert resumed_results[reducer][keep]["metrics"] == full_results[reducer][keep]["metrics"]
        assert strip(resumed_results[reducer][keep]["efficiency"]) == strip(full_results[reducer][keep]["efficiency"])
    assert computed(sample_rows(resumed)) == computed(sample_rows(full))


def test_seats_runs_in_eval_without_keep(tmp_path):
    """seats is budgeted by its own per-modality retention options, so it needs no --keep and runs once."""
    heard = write_videomme(tmp_path / "heard", audio=True)
    results, path = run_cli(heard, tmp_path / "out", "tiny-qwen2.5-omni", "none,seats", "", 2, "--limit", "2",
                            "--reducer_args", "seats.video=0.3,seats.audio=0.65,seats.drop_layers=1-2,seats.late_block_layer=4")
    assert sorted(results["results"]["videomme"]) == ["none", "seats"] and list(results["results"]["videomme"]["seats"]) == ["all"]
    efficiency = results["results"]["videomme"]["seats"]["all"]["efficiency"]
    assert 0 < efficiency["retention_layer_avg"] < 1
    assert results["results"]["videomme"]["none"]["all"]["efficiency"]["retention_layer_avg"] == 1
    rows = [row for row in sample_rows(path) if row["reducer"] == "seats"]
    assert [row["visual_tokens_kept"] for row in rows] == [0, 0]  # Stage III: no audio or video in the last layer
