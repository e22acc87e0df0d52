"""Issue 13: images, model folders and eval options that used to go wrong silently or with another library's raw
error now get the right result, or an error of tokenomy's own type naming the culprit; an eval over a mix of good
and bad samples finishes, lists every bad one by id and reason, and survives SIGKILL + --resume exactly."""
import json
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import tokenomy
from eval_fixtures import write_vqa_fixture
from test_eval_runner import comparable, samples, subprocess_env
from tokenomy.cli import main as cli_main
from tokenomy.errors import InputError, ModelLoadError
from tokenomy.eval.cli import parse_limit
from tokenomy.eval.report import report
from tokenomy.eval.runner import EvalConfig, run_eval, sanitize_model_name
from tokenomy.io import load_image
from tokenomy.vlm.tiny import BUILDERS

TINY = dict(model="tiny-llava", gen_kwargs={"max_new_tokens": 4})


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG file whose header claims width x height pixels (a decompression bomb as PIL sees it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def sixteen_bit_png(path, values) -> None:
    Image.fromarray(np.array(values, dtype=np.uint16)).save(path)


def sideways_jpeg(path) -> None:
    """Stored 40x20, left half red and right half blue, with EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif, quality=95)


# ---- images ------------------------------------------------------------------------------------------------------
def test_sixteen_bit_greyscale_png_keeps_its_grey_levels(tmp_path):
    path = tmp_path / "depth.png"
    sixteen_bit_png(path, [[0, 257 * 100, 65535, 32896]])
    with Image.open(path) as opened:
        assert opened.mode.startswith("I")  # what made convert("RGB") clip everything above 255 to white
    pixels = np.asarray(load_image(str(path)))
    assert pixels.shape == (1, 4, 3)
    assert pixels[0, :, 0].tolist() == [0, 100, 255, 128] and (pixels[..., 0] == pixels[..., 2]).all()


def test_int32_and_float_greyscale_images():
    as_int = Image.fromarray(np.array([[0, 65535, 257 * 7, -5]], dtype=np.int32), mode="I")
    assert np.asarray(load_image(as_int))[0, :, 1].tolist() == [0, 255, 7, 0]
    unit = Image.fromarray(np.array([[0.0, 1.0, 0.5, np.nan]], dtype=np.float32), mode="F")
    assert np.asarray(load_image(unit))[0, :, 0].tolist() == [0, 255, 128, 0]
    bytes_range = Image.fromarray(np.array([[0.0, 200.0, 300.0, 12.4]], dtype=np.float32), mode="F")
    assert np.asarray(load_image(bytes_range))[0, :, 0].tolist() == [0, 200, 255, 12]


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "phone.jpg"
    sideways_jpeg(path)
    upright = load_image(str(path))
    assert upright.size == (20, 40)
    top, bottom = np.asarray(upright)[5, 10], np.asarray(upright)[35, 10]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # the left (red) half is now on top


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (10, 20, 30, 255))
    pixels = np.asarray(load_image(rgba))
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[1, 1].tolist() == [10, 20, 30]


def test_decompression_bomb_names_the_file(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(14000, 14000))  # 196 megapixels
    with pytest.raises(InputError, match=r"bomb\.png is too large.*MAX_IMAGE_PIXELS"):
        load_image(str(path))
    with pytest.raises(InputError, match="image bytes"):
        load_image(path.read_bytes())


def test_extreme_aspect_ratio_and_empty_images_are_refused(tmp_path):
    path = tmp_path / "sliver.png"
    Image.new("RGB", (2000, 4)).save(path)
    with pytest.raises(InputError, match=r"sliver\.png is 2000x4 pixels.*200:1"):
        load_image(str(path))
    with pytest.raises(InputError, match="PIL image 2000x4"):
        load_image(Image.new("RGB", (2000, 4)))
    with pytest.raises(InputError, match="empty"):
        load_image(Image.new("RGB", (0, 3)))
    pipeline = tokenomy.load("tiny-qwen2-vl")  # the family whose processor raised a bare ValueError
    with pytest.raises(InputError, match=r"sliver\.png"):
        pipeline.generate([str(path)], ["What is it?"], max_new_tokens=2)
    assert load_image(Image.new("RGB", (800, 4))).size == (800, 4)  # 200:1 itself is fine


# ---- model folders -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory):
    model, processor = BUILDERS["tiny-llava"]()
    folder = tmp_path_factory.mktemp("models") / "llava"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def variant(saved, tmp_path, name, edit):
    folder = tmp_path / name
    shutil.copytree(saved, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_a_saved_folder_loads_back_exactly(saved_llava):
    reference = tokenomy.load("tiny-llava")
    loaded = tokenomy.load(str(saved_llava), dtype="float32")
    image = Image.new("RGB", (30, 30), (200, 30, 30))
    assert torch.equal(loaded.forward([image], ["What?"]), reference.forward([image], ["What?"]))


def test_missing_tensor_is_an_error_naming_it_and_the_file(saved_llava, tmp_path):
    name = "language_model.model.layers.1.self_attn.q_proj.weight"
    folder = variant(saved_llava, tmp_path, "missing", lambda tensors: tensors.pop(name))
    with pytest.raises(ModelLoadError, match=r"missing/model\.safetensors lacks 1 tensor.*layers\.1\.self_attn\.q_proj\.weight"):
        tokenomy.load(str(folder))


def test_wrong_shape_is_an_error_naming_the_tensor(saved_llava, tmp_path):
    name = "language_model.model.layers.1.self_attn.q_proj.weight"
    folder = variant(saved_llava, tmp_path, "shape", lambda tensors: tensors.__setitem__(name, torch.zeros(3, 5)))
    with pytest.raises(ModelLoadError, match=r"q_proj\.weight is \(3, 5\) in the file but \(32, 32\) in the model") as raised:
        tokenomy.load(str(folder))
    assert "ignore_mismatched_sizes" not in str(raised.value)


def test_corrupted_weights_file_is_named(saved_llava, tmp_path):
    folder = tmp_path / "cut"
    shutil.copytree(saved_llava, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"corrupted or truncated weights file .*cut/model\.safetensors"):
        tokenomy.load(str(folder))


def test_unknown_model_type_and_bad_config(saved_llava, tmp_path):
    folder = tmp_path / "odd"
    shutil.copytree(saved_llava, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llava-from-the-future"}))
    with pytest.raises(ModelLoadError, match=r"odd/config\.json has model_type 'llava-from-the-future'.*does not know"):
        tokenomy.load(str(folder))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"odd/config\.json is not valid JSON"):
        tokenomy.load(str(folder))


def test_hub_id_says_tokenomy_never_downloads():
    with pytest.raises(ModelLoadError, match=r"llava-hf/llava-1\.5-7b-hf.*never downloads.*--local-dir"):
        tokenomy.load("llava-hf/llava-1.5-7b-hf")


def test_dtype_names_are_accepted(saved_llava):
    assert tokenomy.load("tiny-llava", dtype="bfloat16").model.dtype == torch.bfloat16
    assert tokenomy.load(str(saved_llava), dtype="torch.float16").model.dtype == torch.float16
    with pytest.raises(InputError, match="dtype 'int7'"):
        tokenomy.load("tiny-llava", dtype="int7")
    with pytest.raises(InputError, match="device 'nowhere'"):
        tokenomy.load("tiny-llava", device="nowhere")


# ---- eval options ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["-1", "abc", "0", "2.5", "nan"])
def test_bad_limits_are_refused(text, tmp_path, capsys):
    with pytest.raises(InputError, match=f"--limit .*got"):
        parse_limit(text)
    data = write_vqa_fixture(tmp_path / "data", n=1)
    assert cli_main(["eval", "--model", "tiny-llava", "--tasks", "vqa-jsonl", "--data-dir", str(data), "--limit", text,
                     "--output_path", str(tmp_path / "out")]) == 2
    assert "--limit" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_limit_values_that_are_fine():
    assert parse_limit("3") == 3 and parse_limit("1.0") == 1 and parse_limit("0.5") == 0.5


def test_options_are_checked_before_the_model_loads(tmp_path):
    data = write_vqa_fixture(tmp_path / "data", n=1)
    # The model folder does not exist: each error below proves the option was checked first.
    common = dict(model=str(tmp_path / "no-such-model"), tasks=["vqa-jsonl"], data_dir=str(data), output_path=str(tmp_path / "out"))
    with pytest.raises(InputError, match="--model_args trust_remote_code is not an option of tokenomy.load"):
        run_eval(EvalConfig(model_args={"trust_remote_code": True}, **common))
    with pytest.raises(InputError, match="dtype 'bf17'"):
        run_eval(EvalConfig(model_args={"dtype": "bf17"}, **common))
    with pytest.raises(InputError, match="keep must be"):
        run_eval(EvalConfig(reducers=["none", "random"], keeps=[0], **common))
    with pytest.raises(InputError, match="--reducer_args fastv.layer names reducer 'fastv'"):
        run_eval(EvalConfig(reducers=["random"], keeps=[4], reducer_args={"fastv.layer": 1}, **common))
    with pytest.raises(InputError, match="nonsense"):
        run_eval(EvalConfig(reducers=["random"], keeps=[4], reducer_args={"random.nonsense": 1}, **common))
    with pytest.raises(InputError, match="--gen_kwargs max_tokens is not a generation option"):
        run_eval(EvalConfig(gen_kwargs={"max_tokens": 3}, **common))
    assert not (tmp_path / "out").exists()


def test_output_folder_of_a_model_path_is_its_name():
    assert sanitize_model_name("/tmp/newcomer/saved_model") == "saved_model"
    assert sanitize_model_name("./models/llava-1.5-7b-hf/") == "llava-1.5-7b-hf"
    assert sanitize_model_name("tiny-llava") == "tiny-llava"


def test_generate_help_names_no_missing_option(capsys):
    with pytest.raises(SystemExit):
        cli_main(["generate", "--help"])
    assert "--list-reducers" not in capsys.readouterr().out


def test_report_flags_unfinished_runs_and_names_a_corrupt_file(tmp_path):
    folder = tmp_path / "out" / "tiny-llava"
    folder.mkdir(parents=True)
    entry = {"metrics": {"accuracy": 50.0}, "efficiency": {}, "n-samples": {"selected": 2, "scored": 2, "skipped": 0}}
    for stamp, complete in (("20260101T000000", True), ("20260102T000000", False)):
        (folder / f"{stamp}_results.json").write_text(json.dumps(
            {"complete": complete, "results": {"vqa-jsonl": {"none": {"all": entry}}}}))
    table, _ = report(tmp_path / "out")
    assert "| 20260102T000000 (unfinished) |" in table and "| 20260101T000000 |" in table
    (folder / "20260103T000000_results.json").write_text('{"complete": false, "results": {"vqa-js')
    with pytest.raises(InputError, match=r"20260103T000000_results\.json"):
        report(tmp_path / "out")


# ---- the runner --------------------------------------------------------------------------------------------------
def test_a_run_that_failed_at_start_up_leaves_nothing_to_block_resume(saved_llava, tmp_path):
    data = write_vqa_fixture(tmp_path / "data", n=2)
    broken = variant(saved_llava, tmp_path, "mine", lambda tensors: tensors.pop("language_model.lm_head.weight"))
    config = dict(model=str(broken), tasks=["vqa-jsonl"], data_dir=str(data), output_path=str(tmp_path / "out"),
                  gen_kwargs={"max_new_tokens": 2}, resume=True)
    with pytest.raises(ModelLoadError, match="lm_head"):
        run_eval(EvalConfig(**config))
    assert not list((tmp_path / "out" / "mine").glob("*_results.json"))
    shutil.rmtree(broken)
    shutil.copytree(saved_llava, broken)
    path = run_eval(EvalConfig(**config))
    assert path.parent.name == "mine" and json.loads(path.read_text())["complete"] is True


def test_a_plan_the_model_cannot_run_fails_the_eval_before_any_combo(tmp_path):
    """tome merges between vision layers, which a Qwen ViT cannot take: the sweep stops at start, not after random."""
    data = write_vqa_fixture(tmp_path / "data", n=2)
    config = EvalConfig(model="tiny-qwen2-vl", tasks=["vqa-jsonl"], data_dir=str(data), output_path=str(tmp_path / "out"),
                        reducers=["random", "tome"], keeps=[4], gen_kwargs={"max_new_tokens": 2})
    with pytest.raises(InputError, match="tome merges tokens between vision-encoder layers"):
        run_eval(config)
    assert not list((tmp_path / "out").rglob("*_results.json")) and not list((tmp_path / "out").rglob("*samples*"))


def test_resume_finds_the_run_by_its_arguments_or_its_id(tmp_path):
    data = write_vqa_fixture(tmp_path / "data", n=2)
    common = dict(tasks=["vqa-jsonl"], data_dir=str(data), output_path=str(tmp_path / "out"), **TINY)
    older = run_eval(EvalConfig(seed=1, **common))
    time.sleep(1.1)  # distinct stamps (second resolution); not a timing assertion
    newer = run_eval(EvalConfig(seed=2, **common))
    for path in (older, newer):  # as if both were killed
        path.write_text(json.dumps({**json.loads(path.read_text()), "complete": False}))
    assert run_eval(EvalConfig(seed=1, resume=True, **common)) == older  # not the newest unfinished run
    stamp = newer.name.removesuffix("_results.json")
    assert run_eval(EvalConfig(seed=2, resume=stamp, **common)) == newer
    with pytest.raises(InputError, match=f"--resume {stamp}: that run in .* finished"):
        run_eval(EvalConfig(seed=2, resume=stamp, **common))
    with pytest.raises(InputError, match="no run 20990101T000000"):
        run_eval(EvalConfig(seed=2, resume="20990101T000000", **common))


def test_batch_errors_name_the_sample_and_resume_with_skip_after_fail(tmp_path):
    data = write_vqa_fixture(tmp_path / "data", n=6)
    rows = (data / "qa.jsonl").read_text().splitlines()
    bad = json.loads(rows[3])
    rows[3] = json.dumps({**bad, "question": "<image> and <image>?"})  # second of its batch; fails inside generate
    (data / "qa.jsonl").write_text("\n".join(rows) + "\n")
    common = dict(tasks=["vqa-jsonl"], data_dir=str(data), output_path=str(tmp_path / "out"), batch_size=2,
                  log_samples=True, **TINY)
    with pytest.raises(InputError, match=r"sample q3: InputError: .*2 '<image>' placeholders"):
        run_eval(EvalConfig(on_error="fail", **common))
    stopped = next((tmp_path / "out" / "tiny-llava").glob("*_results.json"))
    assert json.loads(stopped.read_text())["complete"] is False
    resumed = run_eval(EvalConfig(on_error="skip", resume=True, **common))
    assert resumed == stopped
    results = json.loads(resumed.read_text())
    entry = results["results"]["vqa-jsonl"]["none"]["all"]
    assert results["config"]["on_error"] == "skip" and results["complete"] is True
    assert [e["id"] for e in entry["errors"]] == ["q3"] and "placeholders" in entry["errors"][0]["message"]
    assert entry["n-samples"] == {"selected": 6, "scored": 5, "skipped": 1}
    assert sorted(r["id"] for r in samples(resumed)) == ["q0", "q1", "q2", "q3", "q4", "q5"]


def write_bad_mix(root):
    """Eight good samples (one a 16-bit PNG, one an EXIF-rotated JPEG) and one sample of every bad kind, each with
    the words its reason must contain."""
    data = write_vqa_fixture(root, n=8)
    img = data / "img"
    sixteen_bit_png(img / "2.png", np.full((20, 28), 40000))
    sideways_jpeg(img / "5.jpg")
    (img / "corrupt.png").write_bytes(b"corrupt")
    (img / "truncated.png").write_bytes((img / "0.png").read_bytes()[:60])
    (img / "bomb.png").write_bytes(png_claiming(14000, 14000))
    Image.new("RGB", (2000, 4)).save(img / "sliver.png")
    rows = [json.loads(line) for line in (data / "qa.jsonl").read_text().splitlines()]
    rows[5]["image"] = "img/5.jpg"
    row = lambda sample_id, **fields: json.dumps({"id": sample_id, "image": "img/1.png", "question": "What?",
                                                  "answers": ["dog"], **fields})
    bad = {
        "missing-image": (row("missing-image", image="img/nope.png"), "not found"),
        "no-answers": (row("no-answers", answers=[]), "empty answers"),
        "broken-line": ('{"id": "broken-line", "image": "img/0.png", "question": ', "malformed JSON"),
        "null-question": (row("null-question", question=None), "question must be text, got null"),
        "number-image": (row("number-image", image=5), "unsupported image field"),
        "corrupt": (row("corrupt", image="img/corrupt.png"), "cannot read image"),
        "truncated": (row("truncated", image="img/truncated.png"), "truncated.png"),
        "bomb": (row("bomb", image="img/bomb.png"), "too large"),
        "sliver": (row("sliver", image="img/sliver.png"), "aspect ratio"),
        "two-placeholders": (row("two-placeholders", question="<image> or <image>?"), "placeholders"),
        "q1": (row("q1"), "duplicate id"),
    }
    lines = [json.dumps(r) for r in rows]
    for position, (line, _) in enumerate(bad.values()):
        lines.insert(1 + 2 * position % len(lines), line)  # spread among the good ones, in batches with them
    (data / "qa.jsonl").write_text("\n".join(lines) + "\n")
    return data, {sample_id: reason for sample_id, (_, reason) in bad.items()}


def test_mixed_good_and_bad_samples_finish_and_survive_sigkill_and_resume(tmp_path):
    data, reasons = write_bad_mix(tmp_path / "data")
    out = tmp_path / "killed"
    arguments = ["--model", "tiny-llava", "--reducer", "none,random", "--keep", "8", "--tasks", "vqa-jsonl",
                 "--data-dir", str(data), "--log_samples", "--batch_size", "2", "--gen_kwargs", "max_new_tokens=4"]
    command = [sys.executable, "-m", "tokenomy.cli", "eval", *arguments, "--output_path", str(out)]
    proc = subprocess.Popen(command, env=subprocess_env(), stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    folder = out / "tiny-llava"

    def read_or_empty(path):  # a journal is removed when its combination is merged
        try:
            return path.read_text()
        except FileNotFoundError:
            return ""

    def combos_recorded():
        text = next((read_or_empty(p) for p in folder.glob("*_results.json")), "")
        return len(json.loads(text)["results"].get("vqa-jsonl", {})) if text else 0

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if combos_recorded() >= 1 and any(len(read_or_empty(p).splitlines()) >= 2 for p in folder.glob("*.part")):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(next(folder.glob("*_results.json")).read_text())["complete"] is False

    resumed_run = subprocess.run([*command, "--resume"], env=subprocess_env(), capture_output=True, text=True)
    assert resumed_run.returncode == 0, resumed_run.stderr[-3000:]
    assert "resuming run" in resumed_run.stderr
    (resumed,) = folder.glob("*_results.json")
    full = run_eval(EvalConfig(model="tiny-llava", tasks=["vqa-jsonl"], data_dir=str(data), output_path=str(tmp_path / "full"),
                               reducers=["none", "random"], keeps=[8], batch_size=2, log_samples=True,
                               gen_kwargs={"max_new_tokens": 4}))
    results = json.loads(resumed.read_text())
    assert results["complete"] is True
    assert comparable(results["results"]) == comparable(json.loads(full.read_text())["results"])
    good = [f"q{i}" for i in range(8)]
    for combo in (results["results"]["vqa-jsonl"]["none"]["all"], results["results"]["vqa-jsonl"]["random"]["8"]):
        listed = {e["id"]: e["message"] for e in combo["errors"]}
        assert set(listed) == set(reasons)
        for sample_id, reason in reasons.items():
            assert reason in listed[sample_id], (sample_id, listed[sample_id])
        assert combo["n-samples"] == {"selected": 8 + len(reasons), "scored": 8, "skipped": len(reasons)}
    rows = samples(resumed)
    key = lambda r: (r["reducer"], r["keep"] or 0, r["doc_index"])
    assert len({key(r) for r in rows}) == len(rows)  # nothing duplicated
    assert comparable(sorted(rows, key=key)) == comparable(sorted(samples(full), key=key))  # nothing lost
    scored = {(r["reducer"], r["id"]) for r in rows if "error" not in r}
    assert scored == {(reducer, sample_id) for reducer in ("none", "random") for sample_id in good}
