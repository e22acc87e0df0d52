"""A composed model (timm tower + projector + Llama) saved to a folder runs through tokenomy.load like LLaVA."""
import pytest
import torch
from transformers import CLIPImageProcessor, LlamaConfig, LlavaProcessor

import tokenomy
from tests.conftest import random_images
from tokenomy.vlm.composed import ComposedVLMConfig, ComposedVLMForConditionalGeneration
from tokenomy.vlm.tiny import LLAVA_CHAT_TEMPLATE, VOCAB_SIZE, byte_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tokenizer = byte_tokenizer(LLAVA_CHAT_TEMPLATE)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    text = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, **ids)
    vision = {"library": "timm", "model_name": "vit_tiny_patch16_224",
              "kwargs": dict(img_size=48, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=0)}
    torch.manual_seed(0)
    config = ComposedVLMConfig(vision=vision, text_config=text.to_dict(), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                               vision_feature_layer=-2, **ids)
    model = ComposedVLMForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    path = tmp_path_factory.mktemp("composed")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def test_composed_folder_identity_and_reducers(folder):
    images = random_images(3)
    prompts = ["What is it?", "Describe it in detail.", "Colour?"]
    base = tokenomy.load(folder, "none")
    _, _, info = base.prepare(images[:1], prompts[:1])
    with torch.no_grad():
        stock = base.model(**info["batch"]).logits
    assert (base.forward(images[:1], prompts[:1]) - stock).abs().max() <= 1e-5
    for reducer in ("vtc-cls", "fastv", "random"):
        pipeline = tokenomy.load(folder, reducer, keep=5)
        batched = pipeline.generate(images, prompts, max_new_tokens=4)
        assert all(g.stats["visual_tokens_in"] == 36 and g.stats["visual_tokens_kept"] == 5 for g in batched)
        for image, prompt, together in zip(images, prompts, batched):
            (alone,) = pipeline.generate([image], [prompt], max_new_tokens=4)
            assert alone.token_ids == together.token_ids
            assert alone.stats["kept_indices"] == together.stats["kept_indices"]
