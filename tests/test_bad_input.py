"""Every documented bad input raises the package's own error, naming the culprit."""
import json
import subprocess
import sys

import pytest
import torch

import tokenomy
from tokenomy.errors import InputError, ModelLoadError, UnknownNameError
from tests.conftest import random_images


@pytest.fixture(scope="module")
def pipeline():
    return tokenomy.load("tiny-llava", "random", keep=4)


def test_missing_and_truncated_image_files(pipeline, tmp_path):
    with pytest.raises(InputError, match="not found: .*missing.png"):
        pipeline.generate([str(tmp_path / "missing.png")], ["x"])
    good = tmp_path / "good.png"
    random_images(1)[0].save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(InputError, match="truncated.png"):
        pipeline.generate([str(truncated)], ["x"])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_text("not an image")
    with pytest.raises(InputError, match="garbage.jpg"):
        pipeline.generate([str(garbage)], ["x"])


def test_placeholder_count_must_match_images(pipeline):
    two = random_images(2)
    with pytest.raises(InputError, match="prompt 0 has 1 '<image>' placeholders but 2 images"):
        pipeline.generate([two], ["<image> compare"])
    with pytest.raises(InputError, match="2 prompts but 1 image"):
        pipeline.generate([two[0]], ["a", "b"])


def test_multiple_images_per_prompt_in_placeholder_order(pipeline):
    two = random_images(2)
    (generation,) = pipeline.generate([two], ["<image> left, <image> right: same?"], max_new_tokens=2)
    assert generation.stats["visual_tokens_in"] == 98
    assert len(generation.stats["kept_indices"]) == 2


@pytest.mark.parametrize("keep", [0, -3, 2.5, "8"])
def test_keep_must_be_a_positive_integer(keep):
    with pytest.raises(InputError, match="keep must be"):
        tokenomy.load("tiny-llava", "vtc-cls", keep=keep)


def test_unknown_reducer_and_model_list_known_names():
    with pytest.raises(UnknownNameError, match="known reducers: .*fastv.*random.*vtc-cls"):
        tokenomy.load("tiny-llava", "fastv2")
    with pytest.raises(UnknownNameError, match="known models: .*tiny-llava, tiny-llava-next, tiny-qwen2-vl"):
        tokenomy.load("tiny-lava")
    assert set(tokenomy.reducers.available()) >= {"none", "random", "vtc-cls", "fastv"}


def test_folder_that_is_not_a_supported_model(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        tokenomy.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ModelLoadError, match="LlamaForCausalLM.*supported"):
        tokenomy.load(str(tmp_path))
    with pytest.raises(ModelLoadError, match="does not exist"):
        tokenomy.load(str(tmp_path / "nothing" / "here"))


def test_cls_reducer_on_a_vit_without_cls_is_refused_clearly():
    with pytest.raises(InputError, match="vtc-cls needs the CLS attention row.*QwenViTEncoder.*has no CLS token"):
        tokenomy.load("tiny-qwen2-vl", "vtc-cls", keep=4)


def test_cli_generate_and_errors(tmp_path):
    image = tmp_path / "image.png"
    random_images(1)[0].save(image)
    command = [sys.executable, "-m", "tokenomy.cli"]
    assert "generate" in subprocess.run(command + ["--help"], capture_output=True, text=True).stdout
    done = subprocess.run(command + ["generate", "--model", "tiny-llava", "--image", str(image), "--prompt", "What?",
                                     "--reducer", "vtc-cls", "--keep", "8", "--max-new-tokens", "3", "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["stats"]["visual_tokens_kept"] == 8 and result["stats"]["visual_tokens_in"] == 49
    failed = subprocess.run(command + ["generate", "--model", "tiny-llava", "--image", str(tmp_path / "no.png"), "--prompt", "x"],
                            capture_output=True, text=True)
    assert failed.returncode == 2 and "no.png" in failed.stderr


def test_reserved_model_tokens_in_a_prompt_are_refused():
    pipeline = tokenomy.load("tiny-qwen2-vl", "none")
    with pytest.raises(InputError, match=r"prompt 1 contains the model's reserved token\(s\) \['<\|image_pad\|>'\]"):
        pipeline.generate(random_images(2), ["ok", "what is <|image_pad|> here?"], max_new_tokens=1)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_max_new_tokens_must_be_positive(bad):
    with pytest.raises(InputError, match="max_new_tokens must be an integer >= 1"):
        tokenomy.load("tiny-llava", "none").generate(random_images(1), ["x"], max_new_tokens=bad)


def test_prompt_beyond_the_context_is_refused_before_the_llm_runs():
    pipeline = tokenomy.load("tiny-llava", "none")  # 1024 positions
    calls = []
    handle = pipeline.adapter.language_model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(InputError, match="prompt 0 needs positions up to .* beyond this model's 1024"):
            pipeline.generate(random_images(1), ["word " * 300], max_new_tokens=4)
    finally:
        handle.remove()
    assert not calls


def test_nan_scores_rank_last_in_vtc_cls():
    from tokenomy.reducers import ImageTokens, create
    from tokenomy.vision.base import CLS_ATTENTION, grid_positions

    rows = torch.tensor([[float("nan"), 0.5, 0.1, float("nan"), 0.9, 0.2]])
    image = ImageTokens(torch.randn(6, 4), grid_positions(1, 2, 3), {CLS_ATTENTION: rows})
    assert create("vtc-cls", keep=3).select(image).kept.tolist() == [1, 4, 5]


def test_fastv_layer_beyond_the_llm_is_refused_at_load():
    with pytest.raises(InputError, match="fastv layer 9 must be in 1..3"):
        tokenomy.load("tiny-llava", "fastv", keep=4, layer=9)
