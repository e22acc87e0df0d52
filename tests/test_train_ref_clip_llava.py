"""The LLaVA-1.5 recipe on a frozen ref-clip tower, on tiny sizes: stage 1 moves the projector alone, stage 2 the
projector and the LLM, the tower never moves and is read at its second-to-last layer, a resume continues the same
loss curve, and the export loads with tokenomy.load."""
import json

import pytest
import torch
from transformers import CLIPModel

import tokenomy
from tokenomy.cli import main as cli_main
from tokenomy.errors import InputError
from tokenomy.eval import synthvqa
from tokenomy.train import clip, loop
from tokenomy.train.data import CaptionConversations, SynthVQATrain

TINY_CLIP = dict(steps=2, batch_size=4, warmup=1, vision_layers=3, width=32, text_layers=1, threads=1, tokenizer_scenes=20)
RECIPE = dict(arch="llava", batch_size=2, lr=3e-3, warmup=1, threads=1, llm_layers=1)


def _state(folder):
    return tokenomy.load(str(folder)).model.state_dict()


def _parts(state, prefix):
    return {key: value for key, value in state.items() if key.startswith(prefix)}


def _changed(before, after, prefix) -> set:
    return {key for key, value in _parts(before, prefix).items() if not torch.equal(value, after[key])}


TOWER, PROJECTOR, LLM = "model.vision_tower.", "model.multi_modal_projector.", "model.language_model."


@pytest.fixture(scope="module")
def ref_clip(tmp_path_factory):
    return clip.train_clip(clip.ClipConfig(out_dir=str(tmp_path_factory.mktemp("clip")), **TINY_CLIP), eval_scenes=0)


@pytest.fixture(scope="module")
def pretrained(ref_clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    code = cli_main(["train-ref", "--arch", "llava", "--vision-tower", str(ref_clip), "--stage", "pretrain", "--out", str(out),
                     "--steps", "3", "--batch-size", "2", "--lr", "3e-3", "--warmup", "1", "--threads", "1",
                     "--llm-layers", "1"])
    assert code == 0
    return out


def _fresh_state(run, ref_clip):
    from transformers import PreTrainedTokenizerFast

    from tokenomy.train.models import build

    tokenizer = PreTrainedTokenizerFast.from_pretrained(run / "tokenizer", local_files_only=True)
    return build("llava", tokenizer, seed=0, llm_layers=1, vision_tower=str(ref_clip))[0].state_dict()


def test_pretrain_moves_the_projector_alone(pretrained, ref_clip):
    trained = _state(pretrained / "model")
    fresh = _fresh_state(pretrained, ref_clip)
    assert _changed(fresh, trained, PROJECTOR) == set(_parts(fresh, PROJECTOR))  # both linear layers, weights and biases
    changed = {key for key in fresh if not torch.equal(fresh[key], trained[key])}
    assert changed == set(_parts(fresh, PROJECTOR))  # tower, LLM and (tied) output head bitwise as built
    tower = CLIPModel.from_pretrained(ref_clip, local_files_only=True).vision_model.state_dict()
    assert all(torch.equal(trained[TOWER + key], value) for key, value in tower.items())
    losses = [json.loads(line) for line in (pretrained / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in losses] == [0, 1, 2] and all(entry["probe_loss"] == 0 for entry in losses)


def test_pretrain_trains_on_captions_of_the_scene():
    conversation = CaptionConversations()[4]
    ((prompt, caption),) = conversation.turns
    assert prompt == "Describe the image." and conversation.scene == synthvqa.make_scene("train", 4)
    assert caption == clip.train_pair(4, 0)[1]  # ref-clip's caption of that scene
    assert CaptionConversations(seed=1)[4].turns != conversation.turns


def test_finetune_from_pretrain_moves_projector_and_llm_not_the_tower(pretrained, ref_clip, tmp_path):
    out = tmp_path / "finetune"
    loop.train(loop.TrainConfig(out_dir=str(out), steps=3, vision_tower=str(ref_clip), stage="finetune",
                                init_from=str(pretrained), **RECIPE))
    before, after = _state(pretrained / "model"), _state(out / "model")
    assert not _changed(before, after, TOWER)
    assert _changed(before, after, PROJECTOR) and _changed(before, after, LLM)
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    assert (out / "tokenizer" / "tokenizer.json").read_text() == (pretrained / "tokenizer" / "tokenizer.json").read_text()


def test_finetune_resume_continues_the_same_loss_curve(pretrained, ref_clip, tmp_path, monkeypatch):
    config = dict(steps=4, save_every=2, vision_tower=str(ref_clip), stage="finetune", init_from=str(pretrained), **RECIPE)
    loop.train(loop.TrainConfig(out_dir=str(tmp_path / "whole"), **config))

    class Interrupted(SynthVQATrain):
        def __getitem__(self, index):
            if index >= 3 * RECIPE["batch_size"]:  # dies during step 3, after the checkpoint of step 2
                raise KeyboardInterrupt
            return super().__getitem__(index)

    monkeypatch.setattr(loop, "SynthVQATrain", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        loop.train(loop.TrainConfig(out_dir=str(tmp_path / "split"), **config))
    monkeypatch.setattr(loop, "SynthVQATrain", SynthVQATrain)
    loop.train(loop.TrainConfig(out_dir=str(tmp_path / "split"), **config), resume=True)
    read = lambda run: [json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
    assert len(read("split")) == 4
    assert read("split") == pytest.approx(read("whole"), abs=1e-5)
    assert not _changed(_state(tmp_path / "whole" / "model"), _state(tmp_path / "split" / "model"), TOWER)


def test_export_reads_layer_minus_2_of_the_tower_and_generates(pretrained, ref_clip):
    pipeline = tokenomy.load(str(pretrained / "model"), reducer="random", keep=16)
    model = pipeline.model
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    assert model.config.projector_hidden_act == "gelu"
    image = synthvqa.render(synthvqa.make_scene("test", 0))
    pixels = pipeline.processor.image_processor(image, return_tensors="pt")["pixel_values"]
    tower = CLIPModel.from_pretrained(ref_clip, local_files_only=True).vision_model.eval()
    with torch.no_grad():
        penultimate = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # CLS dropped
        expected = model.model.multi_modal_projector(penultimate)
        features = model.model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(torch.cat(list(features)).view(expected.shape), expected)
    (generation,) = pipeline.generate([image], ["Describe the image."], max_new_tokens=4)
    assert generation.stats["visual_tokens_in"] == 256 and generation.stats["visual_tokens_kept"] == 16
    assert isinstance(generation.text, str)


def test_tower_stays_in_eval_mode_and_out_of_the_optimizer(ref_clip, tmp_path, monkeypatch):
    seen = {}
    real_adamw = torch.optim.AdamW

    def recording_adamw(parameters, **options):
        seen["parameters"] = list(parameters)
        return real_adamw(seen["parameters"], **options)

    real_loss = loop.answer_loss

    def recording_loss(model, batch):
        seen["tower_training"] = model.model.vision_tower.training
        seen["projector_training"] = model.model.multi_modal_projector.training
        seen["model"] = model
        return real_loss(model, batch)

    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)
    monkeypatch.setattr(loop, "answer_loss", recording_loss)
    loop.train(loop.TrainConfig(out_dir=str(tmp_path / "run"), steps=1, vision_tower=str(ref_clip), stage="finetune", **RECIPE))
    tower = {id(p) for p in seen["model"].model.vision_tower.parameters()}
    assert seen["parameters"] and not tower & {id(p) for p in seen["parameters"]}
    assert not any(p.requires_grad for p in seen["model"].model.vision_tower.parameters())
    assert seen["tower_training"] is False and seen["projector_training"] is True


def test_recipe_options_are_checked(ref_clip, tmp_path):
    run = lambda **options: loop.train(loop.TrainConfig(out_dir=str(tmp_path / "bad"), steps=1, **{**RECIPE, **options}))
    with pytest.raises(InputError, match="--vision-tower needs --stage"):
        run(vision_tower=str(ref_clip))
    with pytest.raises(InputError, match="--stage pretrain is a stage of the recipe on a frozen tower"):
        run(stage="pretrain")
    with pytest.raises(InputError, match="--stage pretrain trains on synthvqa captions"):
        run(vision_tower=str(ref_clip), stage="pretrain", data=str(tmp_path))
    with pytest.raises(InputError, match="holds a 'clip' model; .* `tokenomy train-clip --tower qwen`"):
        run(arch="qwen", vision_tower=str(ref_clip), stage="pretrain")
    with pytest.raises(InputError, match="not a transformers folder"):
        run(vision_tower=str(tmp_path), stage="pretrain")
    with pytest.raises(InputError, match="--init-from .*nowhere: no checkpoint.pt"):
        run(vision_tower=str(ref_clip), stage="finetune", init_from=str(tmp_path / "nowhere"))


def test_init_from_a_run_on_another_tower_is_refused(pretrained, tmp_path):
    other = clip.train_clip(clip.ClipConfig(out_dir=str(tmp_path / "other-clip"), **{**TINY_CLIP, "seed": 1}), eval_scenes=0)
    with pytest.raises(InputError, match="holds another vision tower than --vision-tower"):
        loop.train(loop.TrainConfig(out_dir=str(tmp_path / "run"), steps=1, vision_tower=str(other), stage="finetune",
                                    init_from=str(pretrained), **RECIPE))
