"""Composed LLaVA-style model over timm / open_clip / transformers towers and a tiny Llama: forward, save/load, generate."""
import json

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, LlamaConfig, LlamaForCausalLM

from tokenomy.errors import InputError, ModelLoadError, UnknownNameError
from tokenomy.vision import wrap_encoder
from tokenomy.vlm.composed import (
    ComposedVLMConfig,
    ComposedVLMForConditionalGeneration,
    build_composed,
    build_vision_tower,
)

IMAGE, VOCAB, IMAGE_TOKEN = 32, 300, 299
NUM_PATCHES = 16  # 32x32 pixels, 8x8 patches

VISION_SPECS = {
    "timm": {"library": "timm", "model_name": "vit_tiny_patch16_224",
             "kwargs": dict(img_size=IMAGE, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=0)},
    "open_clip": {"library": "open_clip", "model_name": "ViT-B-32",
                  "vision_cfg": dict(layers=3, width=32, head_width=16, patch_size=8, image_size=IMAGE)},
    "transformers": {"library": "transformers", "config": dict(
        model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, image_size=IMAGE, patch_size=8)},
}


def text_config(**overrides):
    kwargs = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def composed(library, **text_overrides):
    torch.manual_seed(0)
    config = ComposedVLMConfig(vision=VISION_SPECS[library], text_config=text_config(**text_overrides).to_dict(),
                               image_token_id=IMAGE_TOKEN)
    return ComposedVLMForConditionalGeneration(config).eval()


def prompt(batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(3, 200, (batch, 3), generator=g), torch.full((batch, NUM_PATCHES), IMAGE_TOKEN),
                     torch.randint(3, 200, (batch, 4), generator=g)], dim=1)
    return ids, torch.randn(batch, 3, IMAGE, IMAGE, generator=g)


def greedy(model, ids, pixels, steps=6):
    return model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=steps, min_new_tokens=steps,
                          do_sample=False)


@pytest.fixture(params=sorted(VISION_SPECS), scope="module")
def model(request):
    return composed(request.param)


def test_forward_logits_shape_and_image_features(model):
    ids, pixels = prompt(batch=2)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
        features = model.get_image_features(pixels)
    assert logits.shape == (2, ids.shape[1], VOCAB)
    assert features.shape == (2, NUM_PATCHES, 32)
    assert model.config.image_seq_length == NUM_PATCHES
    assert wrap_encoder(model.vision_tower).num_layers == 3


def test_images_change_the_logits(model):
    ids, pixels = prompt()
    with torch.no_grad():
        first = model(input_ids=ids, pixel_values=pixels).logits
        second = model(input_ids=ids, pixel_values=pixels.flip(-1)).logits
    assert torch.equal(first[:, :3], second[:, :3])  # causal: text before the image cannot see it
    assert (first[:, -1] - second[:, -1]).abs().max() > 1e-4


def test_save_load_round_trip_is_exact(model, tmp_path):
    ids, pixels = prompt()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "tokenomy_composed_vlm"
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(reloaded) is ComposedVLMForConditionalGeneration
    assert type(reloaded.vision_tower) is type(model.vision_tower)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits,
                           reloaded(input_ids=ids, pixel_values=pixels).logits)
    assert torch.equal(greedy(model, ids, pixels), greedy(reloaded, ids, pixels))


def test_cached_generation_matches_full_recompute(model):
    """Decoding with the cache (pixel_values dropped after prefill) gives the logits of re-running the whole sequence."""
    ids, pixels = prompt()
    out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                         suppress_tokens=[IMAGE_TOKEN], return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        full = model(input_ids=out.sequences[:, :-1], pixel_values=pixels, use_cache=False).logits
    step_logits = torch.stack(out.logits, dim=1)
    assert (step_logits - full[:, ids.shape[1] - 1:]).abs().max() <= 1e-5
    allowed = step_logits.clone()
    allowed[..., [IMAGE_TOKEN, model.config.text_config.eos_token_id]] = float("-inf")  # suppressed, min_new_tokens
    assert torch.equal(out.sequences[:, ids.shape[1]:], allowed.argmax(-1))


def test_feature_layer_is_the_libraries_own_layer_output():
    """timm: the projector input is the raw output of block -2, as a forward hook on it sees it."""
    model = composed("timm")
    _, pixels = prompt()
    seen = []
    handle = model.vision_tower.blocks[-2].register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        model.vision_tower.forward_features(pixels)
        features = model.get_image_features(pixels)
        expected = model.multi_modal_projector(seen[0][:, 1:])
    handle.remove()
    assert (features - expected).abs().max() <= 1e-6


def test_left_padded_batch_generates_like_single_prompts():
    model = composed("open_clip")
    (ids_a, pixels_a), (ids_b, pixels_b) = prompt(seed=1), prompt(seed=2)
    ids_b = ids_b[:, 2:]  # shorter prompt: left-padded by two in the batch
    batch_ids = torch.cat([ids_a, torch.cat([torch.zeros(1, 2, dtype=torch.long), ids_b], 1)])
    mask = torch.ones_like(batch_ids)
    mask[1, :2] = 0
    batched = model.generate(input_ids=batch_ids, attention_mask=mask, pixel_values=torch.cat([pixels_a, pixels_b]),
                             max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(batched[0, ids_a.shape[1]:], greedy(model, ids_a, pixels_a, 4)[0, ids_a.shape[1]:])
    assert torch.equal(batched[1, batch_ids.shape[1]:], greedy(model, ids_b, pixels_b, 4)[0, ids_b.shape[1]:])


def test_placeholder_count_mismatch_names_both_counts():
    model = composed("timm")
    ids, pixels = prompt()
    with pytest.raises(InputError, match=r"15 image placeholder.*16 features"):
        model(input_ids=torch.cat([ids[:, :3], ids[:, 4:]], dim=1), pixel_values=pixels)  # one placeholder short


def test_tied_embeddings_survive_the_round_trip(tmp_path):
    model = composed("transformers", tie_word_embeddings=True)
    lm = model.language_model
    assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_path)
    reloaded = ComposedVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    lm2 = reloaded.language_model
    assert lm2.lm_head.weight.data_ptr() == lm2.get_input_embeddings().weight.data_ptr()
    ids, pixels = prompt()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits,
                           reloaded(input_ids=ids, pixel_values=pixels).logits)


def test_build_composed_keeps_live_weights(tmp_path):
    import timm

    torch.manual_seed(3)
    tower = timm.create_model(VISION_SPECS["timm"]["model_name"], pretrained=False, **VISION_SPECS["timm"]["kwargs"])
    projector = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))
    lm = LlamaForCausalLM(text_config()).eval()
    before = {k: v.clone() for k, v in {**tower.state_dict(), **lm.state_dict()}.items()}

    with pytest.raises(ModelLoadError, match="does not rebuild"):  # architecture name alone misses the kwargs
        build_composed(tower, projector, lm, image_token_id=IMAGE_TOKEN)
    model = build_composed(tower, projector, lm, image_token_id=IMAGE_TOKEN, vision_spec=VISION_SPECS["timm"]).eval()

    assert model.vision_tower is tower and model.language_model is lm
    after = {**tower.state_dict(), **lm.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    _, pixels = prompt()
    with torch.no_grad():
        tokens = wrap_encoder(tower).encode(pixels, feature_layer=-2).tokens
        assert torch.equal(model.get_image_features(pixels), projector(tokens))
    ids, _ = prompt()
    model.save_pretrained(tmp_path)
    reloaded = ComposedVLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert torch.equal(greedy(model, ids, pixels), greedy(reloaded, ids, pixels))


def test_build_composed_infers_specs_it_can():
    from transformers import CLIPVisionModel

    hf_tower = build_vision_tower(VISION_SPECS["transformers"])
    assert isinstance(hf_tower, CLIPVisionModel)
    plain_hf = CLIPVisionModel(hf_tower.config)  # built without tokenomy: the spec comes from its config
    model = build_composed(plain_hf, None, LlamaForCausalLM(text_config()), image_token_id=IMAGE_TOKEN)
    assert model.config.vision["library"] == "transformers"
    assert model.config.vision["config"]["hidden_size"] == 32
    open_clip_tower = build_vision_tower(VISION_SPECS["open_clip"])
    model = build_composed(open_clip_tower, None, LlamaForCausalLM(text_config()), image_token_id=IMAGE_TOKEN)
    assert model.config.vision == VISION_SPECS["open_clip"]


def test_projector_activation_must_match():
    tower = build_vision_tower(VISION_SPECS["timm"])
    projector = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    with pytest.raises(ModelLoadError, match="ReLU"):
        build_composed(tower, projector, LlamaForCausalLM(text_config()), image_token_id=IMAGE_TOKEN)


def test_unknown_vision_library_is_named():
    with pytest.raises(UnknownNameError, match="'jax'"):
        ComposedVLMConfig(vision={"library": "jax"}, text_config=text_config().to_dict(), image_token_id=IMAGE_TOKEN)


def test_vision_spec_must_fit_in_config_json():
    spec = {"library": "timm", "model_name": "vit_tiny_patch16_224", "kwargs": {"block_fn": nn.Identity}}
    with pytest.raises(ModelLoadError, match="JSON"):
        ComposedVLMConfig(vision=spec, text_config=text_config().to_dict(), image_token_id=IMAGE_TOKEN)


def test_images_without_image_token_id_are_refused():
    model = build_composed(build_vision_tower(VISION_SPECS["timm"]), None, LlamaForCausalLM(text_config()))
    ids, pixels = prompt()
    with pytest.raises(InputError, match="image_token_id"):
        model(input_ids=ids, pixel_values=pixels)


def test_config_reloads_through_auto_config(tmp_path):
    config = ComposedVLMConfig(vision=VISION_SPECS["open_clip"], text_config=text_config().to_dict(),
                               image_token_id=IMAGE_TOKEN, vision_feature_layer=-3)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ComposedVLMConfig) and isinstance(loaded.text_config, LlamaConfig)
    assert loaded.vision == VISION_SPECS["open_clip"] and loaded.vision_feature_layer == -3


def test_transformers_tower_equals_stock_llava():
    """With a CLIP tower the composed model is LLaVA-1.5: same weights in transformers' Llava give the same logits."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    model = composed("transformers")
    llava_config = LlavaConfig(vision_config=dict(VISION_SPECS["transformers"]["config"]),
                               text_config=text_config().to_dict(), image_token_id=IMAGE_TOKEN,
                               vision_feature_layer=-2, vision_feature_select_strategy="default",
                               projector_hidden_act="gelu", image_seq_length=NUM_PATCHES)
    llava = LlavaForConditionalGeneration(llava_config).eval()
    renamed = {}
    for key, value in model.state_dict().items():
        if key.startswith("language_model.lm_head"):
            renamed[key.removeprefix("language_model.")] = value
        elif key.startswith("language_model.model."):
            renamed["model.language_model." + key.removeprefix("language_model.model.")] = value
        else:
            renamed["model." + key] = value
    assert set(renamed) == set(llava.state_dict())
    llava.load_state_dict(renamed)
    ids, pixels = prompt(batch=2)
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=pixels).logits
        stock = llava(input_ids=ids, pixel_values=pixels).logits
    assert (ours - stock).abs().max() <= 1e-6
