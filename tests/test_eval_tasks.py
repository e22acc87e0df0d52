"""Task loaders on tiny fixtures written in each benchmark's distributed layout (and the generic row formats)."""
import base64
import io
import json
import sys

import pytest
from PIL import Image

from tokenomy.errors import InputError, UnknownNameError
from tokenomy.eval import tasks
from tokenomy.eval.data import ImageRef


def save_image(path, color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def png_bytes(color=(0, 90, 200)):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path, rows, extra_lines=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in extra_lines))


def test_registry_lists_and_rejects_unknown():
    names = tasks.available()
    for required in ("vqav2", "textvqa", "textvqa-no-ocr", "vizwiz", "gqa", "pope", "mme", "scienceqa-img", "mmbench",
                     "seed-bench", "videomme", "vqa-jsonl"):
        assert required in names
    with pytest.raises(UnknownNameError, match="vqav3"):
        tasks.get("vqav3")


def test_vqav2_official_layout(tmp_path):
    root = tmp_path / "vqav2"
    root.mkdir()
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": [
        {"image_id": 1, "question": "What animal?", "question_id": 10},
        {"image_id": 2, "question": "How many?", "question_id": 20}]}))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": 10, "image_id": 1, "answers": [{"answer": "dog", "answer_id": i} for i in range(10)]},
        {"question_id": 20, "image_id": 2, "answers": [{"answer": "2", "answer_id": i} for i in range(10)]}]}))
    save_image(root / "val2014" / "COCO_val2014_000000000001.jpg")  # image 2 is missing on purpose
    task = tasks.get("vqav2")
    loaded = task.load(tmp_path)
    assert [d["id"] for d in loaded.docs] == ["10"]
    assert loaded.docs[0]["answers"] == ["dog"] * 10
    assert task.prompt(loaded.docs[0]) == "What animal?\nAnswer the question using a single word or phrase."
    assert [e.id for e in loaded.errors] == ["20"] and "COCO_val2014_000000000002.jpg" in loaded.errors[0].message
    assert task.score(loaded.docs[0], "A dog.")["score"] == 1.0


def _textvqa_fixture(root, with_ocr):
    root.mkdir(parents=True)
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [
        {"question_id": 5, "question": "what brand?", "image_id": "abc", "answers": ["nikon"] * 10}]}))
    save_image(root / "train_images" / "abc.jpg")
    if with_ocr:
        (root / "TextVQA_Rosetta_OCR_v0.2_val.json").write_text(json.dumps({"data": [{"image_id": "abc", "ocr_tokens": ["nikon", "d50"]}]}))


def test_textvqa_ocr_protocols(tmp_path):
    _textvqa_fixture(tmp_path / "textvqa", with_ocr=True)
    ocr_task, plain_task = tasks.get("textvqa"), tasks.get("textvqa-no-ocr")
    doc = ocr_task.load(tmp_path).docs[0]
    assert ocr_task.prompt(doc) == "what brand?\nReference OCR token: nikon, d50\nAnswer the question using a single word or phrase."
    assert plain_task.prompt(plain_task.load(tmp_path).docs[0]) == "what brand?\nAnswer the question using a single word or phrase."
    assert ocr_task.config()["ocr_tokens_in_prompt"] is True and plain_task.config()["ocr_tokens_in_prompt"] is False


def test_textvqa_ocr_protocol_refuses_data_without_ocr(tmp_path):
    _textvqa_fixture(tmp_path / "textvqa", with_ocr=False)
    with pytest.raises(InputError, match="textvqa-no-ocr"):
        tasks.get("textvqa").load(tmp_path)
    assert len(tasks.get("textvqa-no-ocr").load(tmp_path).docs) == 1


def test_vizwiz_and_gqa_official(tmp_path):
    (tmp_path / "vizwiz").mkdir()
    (tmp_path / "vizwiz" / "val.json").write_text(json.dumps([
        {"image": "VizWiz_val_1.jpg", "question": "What is this?", "answers": [{"answer": "unanswerable"}] * 10}]))
    save_image(tmp_path / "vizwiz" / "val" / "VizWiz_val_1.jpg")
    viz = tasks.get("vizwiz")
    doc = viz.load(tmp_path).docs[0]
    assert "respond with 'Unanswerable'" in viz.prompt(doc)
    assert viz.score(doc, "Unanswerable")["score"] == 1.0

    (tmp_path / "gqa").mkdir()
    (tmp_path / "gqa" / "testdev_balanced_questions.json").write_text(json.dumps({
        "201": {"imageId": "n1", "question": "Which side?", "answer": "left"}}))
    save_image(tmp_path / "gqa" / "images" / "n1.jpg")
    gqa = tasks.get("gqa")
    doc = gqa.load(tmp_path).docs[0]
    assert doc["id"] == "201" and gqa.score(doc, "Left.")["score"] == 1.0 and gqa.score(doc, "right")["score"] == 0.0


def test_pope_three_splits_with_bad_lines(tmp_path):
    root = tmp_path / "pope"
    save_image(root / "val2014" / "COCO_val2014_1.jpg")
    for split in ("adversarial", "popular", "random"):
        write_jsonl(root / f"coco_pope_{split}.json", [
            {"question_id": 1, "image": "COCO_val2014_1.jpg", "text": "Is there a dog in the image?", "label": "yes"},
            {"question_id": 2, "image": "COCO_val2014_1.jpg", "text": "Is there a cat in the image?", "label": "maybe"}],
            extra_lines=['{"question_id": 3, "image": "COCO_val2014_1.jpg", "text": broken'] if split == "random" else ())
    loaded = tasks.get("pope").load(tmp_path)
    assert sorted(d["id"] for d in loaded.docs) == ["adversarial/1", "popular/1", "random/1"]
    errors = {e.id: e.message for e in loaded.errors}
    assert "label must be yes or no" in errors["random/2"]
    assert "malformed JSON" in errors["random/3"]  # the id is recovered from the broken line


def test_mme_both_folder_layouts(tmp_path):
    root = tmp_path / "mme"
    save_image(root / "existence" / "000.jpg")
    (root / "existence" / "000.txt").write_text("Is there a dog? Please answer yes or no.\tYes\nIs there a cat? Please answer yes or no.\tNo\n")
    save_image(root / "OCR" / "images" / "x.png")
    qa = root / "OCR" / "questions_answers_YN"
    qa.mkdir(parents=True)
    (qa / "x.txt").write_text("Does it say hi? Please answer yes or no.\tYes\nDoes it say bye? Please answer yes or no.\tNo\n")
    task = tasks.get("mme")
    loaded = task.load(tmp_path)
    assert sorted(d["id"] for d in loaded.docs) == ["OCR/x.png#0", "OCR/x.png#1", "existence/000.jpg#0", "existence/000.jpg#1"]
    doc = next(d for d in loaded.docs if d["id"] == "existence/000.jpg#0")
    assert task.prompt(doc) == "Is there a dog?\nAnswer the question using a single word or phrase."
    assert doc["answer"] == "yes" and not loaded.errors


def test_scienceqa_img_subset(tmp_path):
    root = tmp_path / "scienceqa"
    root.mkdir()
    (root / "problems.json").write_text(json.dumps({
        "1": {"question": "Which is a mammal?", "choices": ["frog", "dog"], "answer": 1, "hint": "Look.", "image": "image.png", "split": "test"},
        "2": {"question": "Text only?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None, "split": "test"}}))
    (root / "pid_splits.json").write_text(json.dumps({"test": ["1", "2"]}))
    save_image(root / "images" / "test" / "1" / "image.png")
    task = tasks.get("scienceqa-img")
    docs = task.load(tmp_path).docs
    assert [d["id"] for d in docs] == ["1"]
    assert task.prompt(docs[0]) == ("Context: Look.\nWhich is a mammal?\nA. frog\nB. dog\n"
                                    "Answer with the option's letter from the given choices directly.")
    assert task.target(docs[0]) == "B" and task.score(docs[0], "B")["score"] == 1.0


def test_mmbench_tsv_with_base64_images(tmp_path):
    root = tmp_path / "mmbench"
    root.mkdir()
    image = base64.b64encode(png_bytes()).decode()
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
    row = f"0\tWhat colour?\tnan\tred\tblue\tgreen\tnan\tB\tcolour\t{image}\n"
    (root / "mmbench_dev_20230712.tsv").write_text(header + row)
    task = tasks.get("mmbench")
    docs = task.load(tmp_path).docs
    assert [d["index"] for d in docs] == [0, 1_000_000, 2_000_000]  # three options -> three rotations
    assert task.prompt(docs[0]) == "What colour?\nA. red\nB. blue\nC. green\nAnswer with the option's letter from the given choices directly."
    assert task.media(docs[0]).size == (8, 8)


def test_seedbench_drops_video_questions(tmp_path):
    root = tmp_path / "seed-bench"
    root.mkdir()
    (root / "SEED-Bench.json").write_text(json.dumps({"questions": [
        {"question_id": "q1", "question": "What?", "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d",
         "answer": "C", "data_id": "1.jpg", "data_type": "image", "question_type_id": 1},
        {"question_id": "q2", "question": "Video?", "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d",
         "answer": "A", "data_id": "v.mp4", "data_type": "video", "question_type_id": 10}]}))
    save_image(root / "SEED-Bench-image" / "1.jpg")
    task = tasks.get("seed-bench")
    docs = task.load(tmp_path).docs
    assert [d["id"] for d in docs] == ["q1"] and task.score(docs[0], "C. c")["score"] == 1.0


def test_generic_parquet_rows_with_image_bytes(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    root = tmp_path / "gqa"
    root.mkdir()
    table = pa.table({"question_id": ["a", "b", "c"], "question": ["Q1", "Q2", "Q3"], "answer": ["yes", "no", "no"],
                      "image": [{"bytes": png_bytes(), "path": None}, {"bytes": png_bytes((1, 2, 3)), "path": None}, None]})
    pq.write_table(table, root / "testdev-00000-of-00001.parquet")
    loaded = tasks.get("gqa").load(tmp_path)
    assert [d["id"] for d in loaded.docs] == ["a", "b"]
    assert loaded.docs[1]["image"].lazy is not None  # bytes stay in Arrow until the sample runs
    assert loaded.docs[1]["image"].open().getpixel((0, 0)) == (1, 2, 3)
    assert [(e.id, e.message) for e in loaded.errors] == [("c", "no image")]


def test_datasets_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"id": ["x"], "question": ["q?"], "answers": [["yes"] * 10],
                                     "image": [Image.new("RGB", (8, 8), (9, 9, 9))]},
                                    features=datasets.Features({"id": datasets.Value("string"), "question": datasets.Value("string"),
                                                                "answers": datasets.Sequence(datasets.Value("string")),
                                                                "image": datasets.Image()}))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "vqa-jsonl" / "saved"))
    docs = tasks.get("vqa-jsonl").load(tmp_path).docs
    assert [d["id"] for d in docs] == ["x"] and docs[0]["image"].open().getpixel((0, 0)) == (9, 9, 9)


def test_datasets_folder_without_datasets_package_is_a_clear_error(tmp_path, monkeypatch):
    folder = tmp_path / "vqa-jsonl" / "saved"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with pytest.raises(InputError, match=r"pip install datasets"):
        tasks.get("vqa-jsonl").load(tmp_path)


def test_vqa_jsonl_bad_samples_are_reported_by_id(tmp_path):
    root = tmp_path / "data"
    save_image(root / "img" / "ok.png")
    write_jsonl(root / "qa.jsonl", [
        {"id": "good", "image": "img/ok.png", "question": "Colour?", "answers": ["red"]},
        {"id": "noimage", "image": "img/missing.png", "question": "Colour?", "answers": ["red"]},
        {"id": "noanswers", "image": "img/ok.png", "question": "Colour?", "answers": []},
        {"id": "good", "image": "img/ok.png", "question": "Again?", "answers": ["red"]}],
        extra_lines=['{"id": "broken", "image": "img/ok.png", "question": "x", "answers": [}'])
    loaded = tasks.get("vqa-jsonl").load(root)
    assert [d["id"] for d in loaded.docs] == ["good"]
    errors = {e.id: e.message for e in loaded.errors}
    assert set(errors) == {"noimage", "noanswers", "good", "broken"}
    assert "missing.png" in errors["noimage"] and "empty answers" in errors["noanswers"]
    assert "duplicate" in errors["good"] and "malformed JSON" in errors["broken"]


def test_missing_data_lists_what_is_expected(tmp_path):
    with pytest.raises(InputError, match=r"v2_OpenEnded_mscoco_<split>_questions\.json.*parquet"):
        tasks.get("vqav2").load(tmp_path)
    (tmp_path / "vqav2").mkdir()
    (tmp_path / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json").write_text("{not json")
    with pytest.raises(InputError, match=r"no annotation file .*v2_mscoco_val2014_annotations\.json"):
        tasks.get("vqav2").load(tmp_path)
    (tmp_path / "vqav2" / "v2_mscoco_val2014_annotations.json").write_text('{"annotations": []}')
    with pytest.raises(InputError, match=r"malformed JSON in .*questions\.json at line 1"):
        tasks.get("vqav2").load(tmp_path)


def test_image_ref_rejects_unreadable_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="bad.jpg"):
        ImageRef(path=bad).open()
