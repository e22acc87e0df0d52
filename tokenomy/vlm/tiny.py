"""Built-in tiny models: random weights from a fixed seed, built from configs, with an offline tokenizer/processor.

They exist so every code path runs on a CPU in seconds with no download. Their answers are noise; their shapes,
special tokens, processors and chat templates are those of the real families.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SEED = 0
VOCAB_SIZE = 288  # 256 byte tokens + the special tokens below, rounded up
SPECIAL_TOKENS = [
    "<pad>", "<s>", "</s>", "<image>",
    "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (no merges): every string encodes, nothing is downloaded."""
    byte_to_unicode = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(byte_to_unicode))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", padding_side="left",
        chat_template=chat_template,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<pad>", "<s>", "</s>")]})
    assert len(tokenizer) <= VOCAB_SIZE
    return tokenizer


def _text_config(model_type: str, **extra) -> dict:
    config = dict(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
    )
    config.update(extra)
    return {"model_type": model_type, **config}


def _ids(tokenizer) -> dict:
    return dict(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )


def _clip_vision(image_size: int) -> dict:
    return dict(
        model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=image_size, patch_size=8, projection_dim=32,
    )


def _clip_image_processor(size: int):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def build_tiny_llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = byte_tokenizer(LLAVA_CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config=_clip_vision(56), text_config=_text_config("llama", **_ids(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=49,
        vision_feature_layer=-2, vision_feature_select_strategy="default", **_ids(tokenizer),
    )
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=_clip_image_processor(56), tokenizer=tokenizer, patch_size=8,
        vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE, num_additional_image_tokens=1,
    )
    return model, processor


def build_tiny_llava_next():
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor

    tokenizer = byte_tokenizer(LLAVA_CHAT_TEMPLATE)
    pinpoints = [[56, 56], [56, 112], [112, 56], [112, 112]]
    config = LlavaNextConfig(
        vision_config=_clip_vision(56), text_config=_text_config("llama", **_ids(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2, vision_feature_select_strategy="default", **_ids(tokenizer),
    )
    torch.manual_seed(SEED)
    model = LlavaNextForConditionalGeneration(config)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE, num_additional_image_tokens=1,
    )
    return model, processor


def _qwen_processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    # Images are resized to 112..168 px a side (kept to multiples of 28): 16 to 36 LLM tokens after the 2x2 merge.
    size = {"shortest_edge": 112 * 112, "longest_edge": 168 * 168}
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2),
        video_processor=Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2),
        tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE,
    )


def _qwen_special_ids(tokenizer) -> dict:
    convert = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=convert("<|image_pad|>"), video_token_id=convert("<|video_pad|>"),
        vision_start_token_id=convert("<|vision_start|>"), vision_end_token_id=convert("<|vision_end|>"),
    )


def build_tiny_qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tokenizer = byte_tokenizer(QWEN_CHAT_TEMPLATE)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    config = Qwen2VLConfig(
        text_config=_text_config("qwen2_vl_text", rope_parameters=rope, **_ids(tokenizer)),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        **_qwen_special_ids(tokenizer), **_ids(tokenizer),
    )
    torch.manual_seed(SEED)
    return Qwen2VLForConditionalGeneration(config), _qwen_processor(tokenizer)


def build_tiny_qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = byte_tokenizer(QWEN_CHAT_TEMPLATE)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    config = Qwen2_5_VLConfig(
        text_config=_text_config("qwen2_5_vl_text", rope_parameters=rope, **_ids(tokenizer)),
        vision_config=dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1], tokens_per_second=2, in_channels=3),
        **_qwen_special_ids(tokenizer), **_ids(tokenizer),
    )
    torch.manual_seed(SEED)
    return Qwen2_5_VLForConditionalGeneration(config), _qwen_processor(tokenizer)


OMNI_TOKENS = {
    "image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
}

OMNI_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif item['type'] == 'video' %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif item['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen2_5_omni():
    """The Qwen2.5-Omni thinker (text out; no talker): a Qwen2.5-VL-like ViT, a Whisper-like audio encoder and a
    4-layer M-RoPE LLM, with an offline processor (Whisper features, 2 video frames per temporal grid at fps 2)."""
    from transformers import (
        Qwen2_5OmniProcessor, Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration, Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor, WhisperFeatureExtractor,
    )

    tokenizer = byte_tokenizer(OMNI_CHAT_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": list(OMNI_TOKENS.values())}, replace_extra_special_tokens=False)
    tokenizer._set_model_specific_special_tokens(special_tokens=OMNI_TOKENS)  # the processor reads tokenizer.audio_token etc.
    assert len(tokenizer) <= VOCAB_SIZE
    convert = tokenizer.convert_tokens_to_ids
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    config = Qwen2_5OmniThinkerConfig(
        text_config=_text_config("qwen2_5_omni_text", rope_parameters=rope, **_ids(tokenizer)),
        vision_config=dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                           tokens_per_second=25, in_channels=3),
        audio_config=dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, num_mel_bins=128,
                          n_window=50, output_dim=32, max_source_positions=1500),
        image_token_id=convert("<|IMAGE|>"), video_token_id=convert("<|VIDEO|>"), audio_token_id=convert("<|AUDIO|>"),
        vision_start_token_id=convert("<|vision_bos|>"), vision_end_token_id=convert("<|vision_eos|>"),
        audio_start_token_id=convert("<|audio_bos|>"), audio_end_token_id=convert("<|audio_eos|>"), **_ids(tokenizer),
    )
    torch.manual_seed(SEED)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    size = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
    processor = Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2),
        video_processor=Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2),
        feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer, chat_template=OMNI_CHAT_TEMPLATE,
    )
    processor.videos_kwargs = {}  # the class default resizes videos to 128..768 x 28^2 px a frame; keep them tiny
    return model, processor


REFERENCE_ASSETS = Path(__file__).resolve().parent.parent / "assets"


def _reference_model(name: str):
    """A reference model trained by `tokenomy train-ref` on synthvqa, shipped in tokenomy/assets/<name>."""

    def build():
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from tokenomy.errors import ModelLoadError

        folder = REFERENCE_ASSETS / name
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{name}: the shipped checkpoint {folder} is missing; retrain it with `tokenomy train-ref`")
        model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
        return model, AutoProcessor.from_pretrained(folder, local_files_only=True)

    return build


# Names kept for the reference VLMs built by the real recipes on ref-clip (docs/reference-models.md) while they
# train; a name never points at the end-to-end models in the meantime.
NOT_YET_SHIPPED = {"ref-llava": "ref-llava-e2e", "ref-qwen": "ref-qwen-e2e"}

BUILDERS = {
    "tiny-llava": build_tiny_llava,
    "tiny-llava-next": build_tiny_llava_next,
    "tiny-qwen2-vl": build_tiny_qwen2_vl,
    "tiny-qwen2.5-vl": build_tiny_qwen2_5_vl,
    "tiny-qwen2.5-omni": build_tiny_qwen2_5_omni,
    "ref-llava-e2e": _reference_model("ref-llava-e2e"),
    "ref-qwen-e2e": _reference_model("ref-qwen-e2e"),
}
