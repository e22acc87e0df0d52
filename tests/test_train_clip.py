"""ref-clip's trainer on a tiny config: captions say what the scene holds, a few steps lower the contrastive loss on
the batches seen, the export loads through transformers and tokenomy.vision, and a resume continues the same curve."""
import json
import re

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

from tokenomy.cli import main
from tokenomy.eval import synthvqa
from tokenomy.train import clip
from tokenomy.vision import HFViTEncoder, wrap_encoder

TINY = dict(steps=6, batch_size=8, lr=3e-3, warmup=2, vision_layers=2, width=32, text_layers=1, save_every=3, threads=1,
            tokenizer_scenes=40)


@pytest.mark.parametrize("style", clip.CAPTION_STYLES)
def test_captions_are_true_of_the_scene(style):
    for index in range(60):
        scene = synthvqa.make_scene("train", index)
        text = clip.caption(scene, np.random.default_rng([0, index]), style)
        if style == "v2":  # the word in every caption, lower case; at least two objects named
            assert scene.word in text and scene.word.upper() not in text, text
            assert len(re.findall(r"\b(circle|square|triangle|diamond)", text)) >= 2, text
        names = {o.name for o in scene.objects}
        for color, shape in re.findall(r"(red|green|blue|yellow|purple|orange) (circle|square|triangle|diamond)\b", text):
            assert f"{color} {shape}" in names, (text, names)
        for number, thing in re.findall(r"\b(\d) (objects|shapes|things)\b", text):
            assert int(number) == len(scene.objects), text
        for word in re.findall(r"the word \"?(\w+)", text):
            assert word == scene.word, text
        assert clip.full_caption(scene).startswith(f"{len(scene.objects)} objects: ")
    assert clip.where(synthvqa.SceneObject("circle", "red", 10, 120, 9, False)) == "bottom left"


def batch_loss(model, config, tokenizer, processor, steps) -> float:
    with torch.no_grad():
        return sum(model(**clip.batch(s, config, tokenizer, processor), return_loss=True).loss.item() for s in steps) / len(steps)


def test_a_few_steps_lower_the_loss_and_the_export_loads(tmp_path):
    config = clip.ClipConfig(out_dir=str(tmp_path / "run"), **TINY)
    folder = clip.train_clip(config, eval_scenes=10)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    trained = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    initial, _ = clip.build_clip(tokenizer, config)
    seen = range(TINY["steps"])
    assert batch_loss(trained, config, tokenizer, processor, seen) < batch_loss(initial.eval(), config, tokenizer, processor, seen) - 0.05
    assert (folder / "model.safetensors").is_file()
    scores = json.loads((folder / "retrieval.json").read_text())
    assert scores["chance"] == 10.0 and 0 <= scores["image_to_caption"] <= 100
    # The vision tower through tokenomy's encoder interface: 256 patch tokens and the CLS token.
    encoder = wrap_encoder(trained.vision_model)
    assert isinstance(encoder, HFViTEncoder) and encoder.has_cls and encoder.num_layers == TINY["vision_layers"]
    pixels = processor(synthvqa.render(synthvqa.make_scene("test", 0)), return_tensors="pt")["pixel_values"]
    output = encoder.encode(pixels, feature_layer=-2)  # LLaVA's feature layer
    assert output.tokens.shape == (1, (128 // 8) ** 2, TINY["width"]) and output.cls.shape == (1, TINY["width"])
    reference = trained.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(output.tokens, reference)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(seen)


def test_resume_continues_the_same_curve(tmp_path, monkeypatch):
    clip.train_clip(clip.ClipConfig(out_dir=str(tmp_path / "straight"), **TINY), eval_scenes=0)
    real_batch = clip.batch

    def killed_at_step_4(step, *args):
        if step == 4:
            raise KeyboardInterrupt  # after the checkpoint of step 3, with step 3's log line written
        return real_batch(step, *args)

    monkeypatch.setattr(clip, "batch", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        clip.train_clip(clip.ClipConfig(out_dir=str(tmp_path / "resumed"), **TINY), eval_scenes=0)
    monkeypatch.setattr(clip, "batch", real_batch)
    assert main(["train-clip", "--out", str(tmp_path / "resumed"), "--resume", "--eval-scenes", "0",
                 *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]]) == 0
    read = lambda run: [json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
    assert read("resumed") == read("straight")


def test_worker_processes_build_the_same_batches(tmp_path):
    config = clip.ClipConfig(out_dir=str(tmp_path), **{**TINY, "workers": 2})
    tokenizer = clip.caption_tokenizer(config, tmp_path)
    _, processor = clip.build_clip(tokenizer, config)
    loader = torch.utils.data.DataLoader(clip.Batches(config, tokenizer, processor), batch_size=None, sampler=range(2, 5),
                                         num_workers=2)
    for step, built in enumerate(loader, 2):
        expected = clip.batch(step, config, tokenizer, processor)
        assert all(torch.equal(built[key], expected[key]) for key in expected)


def test_twins_differ_in_one_fact_that_both_captions_name():
    edits = {"word": 0, "shape": 0}
    for index in range(40):
        scene = synthvqa.make_scene("train", index)
        seed = [clip.CAPTION_SEED, 0, index]
        other = clip.twin(scene, index, seed)
        changed = [(o.shape, t.shape) for o, t in zip(scene.objects, other.objects) if o != t]
        if other.word != scene.word:
            edits["word"] += 1
            assert not changed and other.text_box[:2] == scene.text_box[:2]
            assert synthvqa.pixel_mask(other, word=True).any()
        else:
            edits["shape"] += 1
            assert len(changed) == 1 and changed[0][0] != changed[0][1]
            assert [(o.color, o.x, o.y, o.radius, o.small) for o in scene.objects] == \
                   [(o.color, o.x, o.y, o.radius, o.small) for o in other.objects]
        (image, text), (twin_image, twin_text) = clip.train_pair(index, 0), clip.train_pair(index, 0, twinned=True)
        assert text != twin_text and (np.asarray(image) != np.asarray(twin_image)).any()
        if other.word != scene.word:  # the same phrases in the same order; only the word differs
            assert re.sub(rf"\b{scene.word}\b", other.word, text) == twin_text, (text, twin_text)
    assert edits["word"] >= 10 and edits["shape"] >= 10


def test_twin_batches_pair_each_scene_with_its_twin(tmp_path):
    config = clip.ClipConfig(out_dir=str(tmp_path), twins=True, **TINY)
    tokenizer = clip.caption_tokenizer(config, tmp_path)
    _, processor = clip.build_clip(tokenizer, config)
    built = clip.batch(1, config, tokenizer, processor)
    expected = clip.encode_images(processor, [clip.train_pair(8 + i // 2, 0, twinned=bool(i % 2))[0] for i in range(8)])
    assert torch.equal(built["pixel_values"], expected["pixel_values"])
    with pytest.raises(clip.InputError, match="--batch-size must be even"):
        clip.train_clip(clip.ClipConfig(out_dir=str(tmp_path / "odd"), twins=True, **{**TINY, "batch_size": 7}))


def test_cocas_caption_loss_trains_the_tower_and_only_clip_is_exported(tmp_path):
    config = clip.ClipConfig(out_dir=str(tmp_path / "run"), caption_weight=2.0, **TINY)
    tokenizer = clip.caption_tokenizer(config, tmp_path)
    model, processor = clip.build_clip(tokenizer, config)
    assert isinstance(model, clip.CaptioningClip)
    inputs = clip.batch(0, config, tokenizer, processor)
    model(**inputs)
    losses = model.last_losses
    torch.testing.assert_close(model(**inputs).loss.item(), losses["contrastive"] + 2.0 * losses["captioning"])
    # The captioning loss alone reaches the tower's patch tokens (the decoder reads them all, not only CLS).
    model.zero_grad()
    tokens = model.clip.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
    model.caption_loss(tokens, inputs["input_ids"], inputs["attention_mask"]).backward()
    assert model.clip.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0

    folder = clip.train_clip(config, eval_scenes=4)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"contrastive", "captioning"} <= set(log[0]) and log[-1]["captioning"] < log[0]["captioning"]
    trained = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    exported = CLIPModel.from_pretrained(folder, local_files_only=True).state_dict()
    assert exported.keys() == {key.removeprefix("clip.") for key in trained if key.startswith("clip.")}
    assert all(torch.equal(value, trained[f"clip.{key}"]) for key, value in exported.items())
    with pytest.raises(clip.InputError, match="--caption-weight .* --tower clip"):
        clip.train_clip(clip.ClipConfig(out_dir=str(tmp_path / "qwen"), caption_weight=1.0, tower="qwen", **TINY))
