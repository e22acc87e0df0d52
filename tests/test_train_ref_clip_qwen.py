"""The Qwen2-VL recipe on tiny sizes: train-clip --tower qwen trains a Qwen2-VL ViT contrastively (image embedding =
mean of its merged tokens), and train-ref --arch qwen --vision-tower starts the ViT from it and trains it on: with
the LLM frozen in the pretrain stage, with the LLM in the finetune stage."""
import json

import pytest
import torch
from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

import tokenomy
from tokenomy.cli import main as cli_main
from tokenomy.errors import InputError
from tokenomy.eval import synthvqa
from tokenomy.train import clip, loop
from tokenomy.train.models import build

TINY_TOWER = dict(steps=4, batch_size=6, lr=3e-3, warmup=1, vision_layers=2, width=32, text_layers=1, threads=1,
                  tokenizer_scenes=20, tower="qwen")
RECIPE = dict(arch="qwen", batch_size=2, lr=3e-3, warmup=1, threads=1, llm_layers=1)
VISUAL, LLM = "model.visual.", "model.language_model."


@pytest.fixture(scope="module")
def qwen_tower(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen-clip")
    options = [f"--{key.replace('_', '-')}={value}" for key, value in TINY_TOWER.items()]
    assert cli_main(["train-clip", "--out", str(out), "--eval-scenes", "6", *options]) == 0
    return out


def _changed(before: dict, after: dict, prefix: str) -> set:
    return {key for key, value in before.items() if key.startswith(prefix) and not torch.equal(value, after[key])}


def test_tower_trains_contrastively_and_exports_the_vit_alone(qwen_tower):
    config = clip.ClipConfig(out_dir=str(qwen_tower), **TINY_TOWER)
    tokenizer = clip.caption_tokenizer(config, qwen_tower)
    initial, processor = clip.build_clip(tokenizer, config)
    trained = initial.__class__(initial.visual.config, initial.text_model.config, config.width)
    trained.load_state_dict(torch.load(qwen_tower / "checkpoint.pt", weights_only=True)["model"])

    def loss(model):
        with torch.no_grad():
            return sum(model(**clip.batch(s, config, tokenizer, processor)).loss.item() for s in range(4)) / 4

    assert loss(trained.eval()) < loss(initial.eval()) - 0.05
    exported = Qwen2VisionTransformerPretrainedModel.from_pretrained(qwen_tower / "model", local_files_only=True)
    assert all(torch.equal(value, trained.visual.state_dict()[key]) for key, value in exported.state_dict().items())
    scores = json.loads((qwen_tower / "model" / "retrieval.json").read_text())
    assert scores["chance"] == pytest.approx(100 / 6) and 0 <= scores["image_to_caption"] <= 100


def test_image_embedding_is_the_mean_of_each_images_merged_tokens(qwen_tower):
    config = clip.ClipConfig(out_dir=str(qwen_tower), **TINY_TOWER)
    model, processor = clip.build_clip(clip.caption_tokenizer(config, qwen_tower), config)
    images = [synthvqa.render(synthvqa.make_scene("test", i)) for i in range(2)]
    with torch.no_grad():
        both = model.get_image_features(**clip.encode_images(processor, images)).pooler_output
        alone = model.get_image_features(**clip.encode_images(processor, images[1:])).pooler_output
        inputs = clip.encode_images(processor, images[:1])
        merged = model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    assert merged.shape == (64, 96)  # 8x8 merged tokens as wide as ref-qwen-e2e's LLM
    torch.testing.assert_close(both[0], model.visual_projection(merged.mean(0)))
    torch.testing.assert_close(both[1], alone[0])  # one image's embedding never depends on the batch


def test_pretrain_then_finetune_train_the_vit_from_the_tower(qwen_tower, tmp_path):
    tower = Qwen2VisionTransformerPretrainedModel.from_pretrained(qwen_tower / "model", local_files_only=True).state_dict()
    common = dict(vision_tower=str(qwen_tower / "model"), steps=2, **RECIPE)
    loop.train(loop.TrainConfig(out_dir=str(tmp_path / "pt"), stage="pretrain", **common))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "pt" / "tokenizer", local_files_only=True)
    built, processor = build("qwen", tokenizer, llm_layers=1, vision_tower=str(qwen_tower / "model"))
    built = built.state_dict()
    assert all(torch.equal(built[VISUAL + key], value) for key, value in tower.items())
    assert isinstance(processor.image_processor, Qwen2VLImageProcessorPil)

    pretrained = tokenomy.load(str(tmp_path / "pt" / "model")).model.state_dict()
    assert _changed(built, pretrained, VISUAL) and not _changed(built, pretrained, LLM)
    assert torch.equal(built["lm_head.weight"], pretrained["lm_head.weight"])

    loop.train(loop.TrainConfig(out_dir=str(tmp_path / "ft"), stage="finetune", init_from=str(tmp_path / "pt"), **common))
    pipeline = tokenomy.load(str(tmp_path / "ft" / "model"), reducer="random", keep=8)
    finetuned = pipeline.model.state_dict()
    assert _changed(pretrained, finetuned, VISUAL) and _changed(pretrained, finetuned, LLM)
    (generation,) = pipeline.generate([synthvqa.render(synthvqa.make_scene("val", 0))], ["What word is written?"], max_new_tokens=3)
    assert generation.stats["visual_tokens_in"] == 64 and generation.stats["visual_tokens_kept"] == 8


def test_a_clip_tower_is_refused_for_qwen_and_a_qwen_tower_for_llava(qwen_tower, tmp_path):
    with pytest.raises(InputError, match="holds a 'qwen2_vl_vision' model; .* `tokenomy train-clip --tower clip`"):
        loop.train(loop.TrainConfig(out_dir=str(tmp_path / "run"), vision_tower=str(qwen_tower / "model"),
                                    stage="pretrain", steps=1, **{**RECIPE, "arch": "llava"}))
    with pytest.raises(InputError, match="--tower 'vit'"):
        clip.train_clip(clip.ClipConfig(out_dir=str(tmp_path / "clip"), tower="vit"))


def test_the_pretrained_vit_learns_at_a_tenth_of_the_llms_rate(qwen_tower, tmp_path):
    config = loop.TrainConfig(out_dir=str(tmp_path), vision_tower=str(qwen_tower / "model"), stage="finetune", **RECIPE)
    tokenizer = clip.caption_tokenizer(clip.ClipConfig(out_dir=str(qwen_tower), **TINY_TOWER), qwen_tower)
    model, _ = build("qwen", tokenizer, llm_layers=1, vision_tower=str(qwen_tower / "model"))
    llm_group, vision_group = loop._param_groups(model, None, config)
    assert (llm_group["lr"], vision_group["lr"]) == (pytest.approx(3e-3), pytest.approx(3e-4))
    assert {id(p) for p in vision_group["params"]} == {id(p) for p in model.model.visual.parameters()}
    assert len(llm_group["params"]) + len(vision_group["params"]) == len(list(model.parameters()))
    (only,) = loop._param_groups(model, None, loop.TrainConfig(**{**config.__dict__, "vision_lr_scale": 1.0}))
    assert len(only["params"]) == len(list(model.parameters()))
