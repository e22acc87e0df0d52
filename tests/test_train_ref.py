"""Reference-model training: prompts match inference, loss only on answers, loss decreases, resume is exact."""
import json

import pytest
import torch
from transformers import PreTrainedTokenizerFast

import tokenomy
from tokenomy.cli import main as cli_main
from tokenomy.eval import synthvqa
from tokenomy.train import loop
from tokenomy.train.data import IGNORE, Conversation, SynthVQATrain, collate, conversation_text, encode
from tokenomy.train.models import build, train_tokenizer
from tokenomy.vlm.pipeline import Pipeline
from tokenomy.reducers import create


@pytest.fixture(scope="module", params=["llava", "qwen"])
def arch_model(request):
    arch = request.param
    tokenizer = train_tokenizer(SynthVQATrain().texts(arch, limit=200), arch)
    model, processor = build(arch, tokenizer)
    return arch, model, processor


def test_first_turn_is_the_inference_prompt(arch_model):
    arch, model, processor = arch_model
    conversation = SynthVQATrain()[5]
    encoded = encode(arch, processor, conversation)
    pipeline = Pipeline(model.eval(), processor, create("none"))
    prompt = pipeline.adapter.chat_text(conversation.turns[0][0], 1)
    inference = pipeline.adapter.process([prompt], [conversation.image])
    prompt_ids = inference["input_ids"][0]
    assert torch.equal(encoded["input_ids"][: len(prompt_ids)], prompt_ids)
    assert torch.equal(encoded["pixel_values"], inference["pixel_values"])


def test_conversation_is_the_chat_template(arch_model):
    arch, _, processor = arch_model
    conversation = SynthVQATrain()[3]
    messages = []
    for index, (question, answer) in enumerate(conversation.turns):
        content = ([{"type": "image"}] if index == 0 else []) + [{"type": "text", "text": question}]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    rendered = processor.apply_chat_template(messages, tokenize=False)
    # The template closes the last assistant turn with a newline that no label covers.
    assert rendered.rstrip("\n") == conversation_text(arch, conversation).rstrip("\n")


def test_labels_cover_exactly_the_answers(arch_model):
    arch, model, processor = arch_model
    conversation = Conversation(synthvqa.render(synthvqa.make_scene("train", 0)), [("What word is written?", "cat"), ("How many objects are there?", "4")])
    encoded = encode(arch, processor, conversation)
    supervised = encoded["labels"] != IGNORE
    tokenizer = processor.tokenizer
    end = tokenizer.eos_token
    assert tokenizer.decode(encoded["labels"][supervised]).replace(" ", "") == f"cat{end}4{end}"
    assert torch.equal(encoded["labels"][supervised], encoded["input_ids"][supervised])
    batch = collate([encoded, encode(arch, processor, SynthVQATrain()[1])], tokenizer.pad_token_id, model.config.image_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert loop.answer_loss(model.train(), batch).isfinite()


def _losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "log.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_resume_continues_the_curve(tmp_path, monkeypatch):
    config = dict(arch="llava", steps=8, batch_size=3, lr=3e-3, warmup=2, save_every=4, threads=1)
    loop.train(loop.TrainConfig(out_dir=str(tmp_path / "whole"), **config))
    whole = _losses(tmp_path / "whole")
    assert len(whole) == 8
    assert sum(whole[-2:]) / 2 < whole[0] - 0.5

    class Interrupted(SynthVQATrain):
        def __getitem__(self, index):
            if index >= 5 * config["batch_size"]:  # die during step 5, after the checkpoint of step 4
                raise KeyboardInterrupt
            return super().__getitem__(index)

    monkeypatch.setattr(loop, "SynthVQATrain", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        loop.train(loop.TrainConfig(out_dir=str(tmp_path / "split"), **config))
    assert len(_losses(tmp_path / "split")) == 5
    monkeypatch.setattr(loop, "SynthVQATrain", SynthVQATrain)
    with pytest.raises(tokenomy.errors.InputError, match="--resume"):
        loop.train(loop.TrainConfig(out_dir=str(tmp_path / "split"), **config))
    loop.train(loop.TrainConfig(out_dir=str(tmp_path / "split"), **config), resume=True)
    split = _losses(tmp_path / "split")
    assert len(split) == 8  # the step logged after the checkpoint was dropped and redone
    assert split == pytest.approx(whole, abs=1e-4)


def test_batches_built_by_worker_processes_give_the_same_loss_curve(tmp_path):
    config = dict(arch="qwen", steps=3, batch_size=2, lr=3e-3, warmup=1, save_every=3, threads=1)
    loop.train(loop.TrainConfig(out_dir=str(tmp_path / "inline"), **config))
    loop.train(loop.TrainConfig(out_dir=str(tmp_path / "workers"), workers=2, **config))
    assert _losses(tmp_path / "workers") == pytest.approx(_losses(tmp_path / "inline"), abs=1e-5)


def test_asking_for_a_gpu_that_is_not_there_is_an_input_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(tokenomy.errors.InputError, match="no CUDA GPU"):
        loop.train(loop.TrainConfig(arch="llava", out_dir=str(tmp_path / "run"), device="cuda", steps=1))
    with pytest.raises(tokenomy.errors.InputError, match="--device 'gpu'"):
        loop.train(loop.TrainConfig(arch="llava", out_dir=str(tmp_path / "run"), device="gpu", steps=1))


def test_train_ref_cli_on_user_vqa_jsonl(tmp_path):
    synthvqa.export_jsonl(tmp_path / "data", "val", num_scenes=4)
    (tmp_path / "data" / "val.jsonl").rename(tmp_path / "data" / "train.jsonl")
    out = tmp_path / "run"
    code = cli_main(["train-ref", "--arch", "qwen", "--data", str(tmp_path / "data"), "--out", str(out), "--steps", "2",
                     "--batch-size", "2", "--threads", "1"])
    assert code == 0
    assert (out / "checkpoint.pt").is_file() and len(_losses(out)) == 2
    pipeline = tokenomy.load(str(out / "model"), reducer="random", keep=8)
    (generation,) = pipeline.generate([synthvqa.render(synthvqa.make_scene("val", 0))], ["What word is written?"], max_new_tokens=3)
    assert generation.stats["visual_tokens_in"] == 64 and generation.stats["visual_tokens_kept"] == 8


def test_probe_labels_follow_the_scene():
    from tokenomy.train.probe import HEADS, cell_labels

    colors, shapes = list(synthvqa.COLORS), list(synthvqa.SHAPES)
    for index in range(5):
        scene = synthvqa.make_scene("train", index)
        for grid in (16, 8):
            labels = cell_labels(scene, synthvqa.render(scene), grid).view(grid, grid, len(HEADS))
            cell = synthvqa.IMAGE_SIZE // grid
            scene_colors = {1 + colors.index(o.color) for o in scene.objects}
            large = [o for o in scene.objects if not o.small]
            assert {1 + colors.index(o.color) for o in large} <= set(labels[..., 0].unique().tolist()) - {0} <= scene_colors
            for o in large if grid == 16 else []:  # an 8 px cell at a large object's centre lies mostly inside it
                assert labels[o.y // cell, o.x // cell].tolist()[:3] == [1 + colors.index(o.color), 1 + shapes.index(o.shape), 1]
            centres = labels[..., 4]
            for o in scene.objects:
                assert centres[o.y // cell, o.x // cell] == 1
            assert 0 < int(centres.sum()) <= len(scene.objects)
            words = labels[..., 3]
            assert set(words.unique().tolist()) == {0, 1 + synthvqa.WORDS.index(scene.word)}
            left, top, right, bottom = scene.text_box
            assert (words[top // cell : bottom // cell + 1, left // cell : right // cell + 1] > 0).any()
            assert (words[: max(0, top // cell - 1)] == 0).all()


def test_extra_training_turns_are_answered_right():
    from test_synthvqa import derive_answer

    stream = SynthVQATrain()
    for index in range(30):
        scene = synthvqa.make_scene("train", index)
        turns = stream[index].turns
        assert len(turns) > len(scene.questions)  # more look-ups than the seven benchmark questions
        assert len({question for question, _ in turns}) == len(turns)
        assert {q["question"] for q in scene.questions} <= {question for question, _ in turns}
        description = synthvqa.scene_description(scene)
        for question, answer in turns:
            assert answer == derive_answer(question, description), (index, question)


def test_clip_positions_start_as_2d_sincos():
    from tokenomy.train.models import sincos_2d

    model, _ = build("llava", train_tokenizer(SynthVQATrain().texts("llava", limit=50), "llava"))
    table = model.model.vision_tower.embeddings.position_embedding.weight.detach()
    assert torch.equal(table[1:], sincos_2d(16, table.shape[1])) and not table[0].any()
    # neighbouring patches are more alike than distant ones: the locality the init is for
    similarity = table[1:] @ table[1:].T
    assert similarity[0, 1] > similarity[0, 15] and similarity[0, 16] > similarity[0, 16 * 15]


def test_vision_steps_train_the_vision_side_only(tmp_path):
    config = loop.TrainConfig(arch="qwen", out_dir=str(tmp_path / "run"), steps=2, vision_steps=2, batch_size=2, threads=1, warmup=1)
    loop.train(config)
    trained = tokenomy.load(str(tmp_path / "run" / "model")).model
    # same seed and tokenizer: only the vision tower and its merger may differ
    fresh, _ = build("qwen", PreTrainedTokenizerFast.from_pretrained(tmp_path / "run" / "tokenizer"), seed=config.seed)
    fresh_state, trained_state = fresh.state_dict(), trained.state_dict()
    changed = {key for key in fresh_state if not torch.equal(fresh_state[key], trained_state[key])}
    assert changed and all(key.startswith("model.visual.") for key in changed)
    losses = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [entry["loss"] for entry in losses] == [0, 0] and all(entry["probe_loss"] > 0 for entry in losses)


@pytest.mark.parametrize("arch", ["llava", "qwen"])
def test_grown_llm_starts_as_the_shallow_model(arch, tmp_path):
    from tokenomy.errors import InputError
    from tokenomy.train.models import grow_llm

    tokenizer = train_tokenizer(SynthVQATrain().texts(arch, limit=50), arch)
    shallow, processor = build(arch, tokenizer, seed=1, llm_layers=2)
    deep, _ = build(arch, tokenizer, seed=2, llm_layers=5)
    assert grow_llm(deep, shallow.state_dict()) == [1, 3, 4]
    batch = collate([encode(arch, processor, SynthVQATrain()[i]) for i in range(2)], tokenizer.pad_token_id,
                    shallow.config.image_token_id)
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        assert torch.allclose(shallow.eval()(**inputs).logits, deep.eval()(**inputs).logits, atol=1e-5)
    # the new layers are not dead: one training step moves their output projections off zero
    loop.answer_loss(deep.train(), batch).backward()
    assert deep.model.language_model.layers[1].self_attn.o_proj.weight.grad.abs().sum() > 0
    with pytest.raises(InputError, match="cannot grow an LLM of 5 layers into one of 2"):
        grow_llm(shallow, deep.state_dict())
    other_arch, _ = build("qwen" if arch == "llava" else "llava", tokenizer, llm_layers=2)
    with pytest.raises(InputError, match="same --arch and sizes"):
        grow_llm(deep, other_arch.state_dict())


def test_train_grows_from_a_shallower_run(tmp_path):
    common = dict(arch="llava", batch_size=2, threads=1, warmup=1)
    loop.train(loop.TrainConfig(out_dir=str(tmp_path / "shallow"), steps=1, llm_layers=2, **common))
    loop.train(loop.TrainConfig(out_dir=str(tmp_path / "deep"), steps=1, llm_layers=3, grow_from=str(tmp_path / "shallow"), **common))
    deep = tokenomy.load(str(tmp_path / "deep" / "model")).model
    shallow = tokenomy.load(str(tmp_path / "shallow" / "model")).model
    assert deep.config.text_config.num_hidden_layers == 3
    assert (tmp_path / "deep" / "tokenizer" / "tokenizer.json").read_text() == (tmp_path / "shallow" / "tokenizer" / "tokenizer.json").read_text()
    # after one step from the shallow weights (lr warmup 1), the carried layer 0 is close to, not equal to, its source
    carried, source = (m.model.language_model.layers[0].mlp.up_proj.weight for m in (deep, shallow))
    assert not torch.equal(carried, source) and (carried - source).abs().max() < 0.05
    with pytest.raises(tokenomy.errors.InputError, match="no checkpoint.pt"):
        loop.train(loop.TrainConfig(out_dir=str(tmp_path / "bad"), steps=1, grow_from=str(tmp_path / "nowhere"), **common))
