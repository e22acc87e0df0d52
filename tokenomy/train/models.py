"""Reference model architectures: small LLaVA and Qwen2-VL models in the transformers formats, with a BPE tokenizer
trained on the task's own text so questions and answers are a few tokens each.

Sizes are chosen so a model trains on two CPU cores in hours: ref-qwen-e2e reached its accuracy in about three; ref-llava-e2e
took four on the CPU and eight more minutes on a GPU (docs/reference-models.md has the times and the accuracy).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tokenomy.errors import InputError, UnknownNameError
from tokenomy.vlm.tiny import LLAVA_CHAT_TEMPLATE, QWEN_CHAT_TEMPLATE, SPECIAL_TOKENS

IMAGE_SIZE = 128
PATCH_SIZE = 8
ARCHES = ("llava", "qwen")
CHAT_TEMPLATES = {"llava": LLAVA_CHAT_TEMPLATE, "qwen": QWEN_CHAT_TEMPLATE}
EOS_TOKENS = {"llava": "</s>", "qwen": "<|im_end|>"}  # what ends an assistant turn in each chat template

LLM_SIZE = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=3)
VISION_SIZE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)


def train_tokenizer(texts, arch: str, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`: every string still encodes, frequent words become single tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token=EOS_TOKENS[arch], pad_token="<pad>",
        padding_side="left", chat_template=CHAT_TEMPLATES[arch],
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<pad>", "<s>", "</s>")]})
    return tokenizer


def _text_ids(tokenizer) -> dict:
    return dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def _text_config(model_type: str, tokenizer, llm_layers: int, **extra) -> dict:
    size = dict(LLM_SIZE, num_hidden_layers=llm_layers)
    return dict(model_type=model_type, vocab_size=len(tokenizer), max_position_embeddings=2048,
                tie_word_embeddings=True, **size, **_text_ids(tokenizer), **extra)


def sincos_2d(grid: int, dim: int, base: float = 100.0) -> torch.Tensor:
    """[grid*grid, dim] 2D sine-cosine position codes (row codes, then column codes), row-major cells."""
    freqs = 1.0 / base ** (torch.arange(dim // 4) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    angles = [coord.flatten()[:, None] * freqs[None] for coord in (rows, cols)]
    return torch.cat([part for angle in angles for part in (angle.sin(), angle.cos())], dim=-1)


def _init_clip_positions(model) -> None:
    """Start CLIP's learned position embeddings from 2D sine-cosine codes (MAE's fixed choice, here only the init),
    so neighbouring patches start with similar codes instead of unrelated random ones. In a 300-step vision-only
    comparison it made no measurable difference to the shape probe (27% vs 29%); it is kept as the better prior.
    """
    table = model.model.vision_tower.embeddings.position_embedding.weight
    grid = math.isqrt(table.shape[0] - 1)
    with torch.no_grad():
        table.zero_()  # the CLS row stays zero
        table[1:] = sincos_2d(grid, table.shape[1])


# arch -> (model_type of the tower folder it takes, the `train-clip --tower` that writes one)
TOWER_TYPES = {"llava": ("clip", "clip"), "qwen": ("qwen2_vl_vision", "qwen")}


def check_vision_tower(arch: str, folder) -> None:
    """Refuse a --vision-tower folder that is not the kind of tower export `arch` takes, before anything is trained."""
    model_type, tower = TOWER_TYPES[arch]
    config = Path(folder) / "config.json"
    if not config.is_file():
        raise InputError(f"--vision-tower {folder}: not a transformers folder (no config.json); pass the OUT/model "
                         f"folder of `tokenomy train-clip --tower {tower}`")
    found = json.loads(config.read_text()).get("model_type")
    if found != model_type:
        raise InputError(f"--vision-tower {folder} holds a {found!r} model; this architecture takes the export of "
                         f"`tokenomy train-clip --tower {tower}` ({model_type!r})")


def load_ref_clip_tower(folder):
    """(vision model, image processor) of a ref-clip export (`tokenomy train-clip`'s OUT/model, a CLIPModel folder)."""
    from transformers import CLIPImageProcessorPil, CLIPModel

    check_vision_tower("llava", folder)
    clip = CLIPModel.from_pretrained(folder, local_files_only=True)
    # The tower is read with the preprocessing it was trained with.
    return clip.vision_model, CLIPImageProcessorPil.from_pretrained(folder, local_files_only=True)


def load_qwen_tower(folder):
    """(ViT, image processor) of `tokenomy train-clip --tower qwen`'s export: a Qwen2-VL ViT with its merger."""
    from transformers import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    check_vision_tower("qwen", folder)
    tower = Qwen2VisionTransformerPretrainedModel.from_pretrained(folder, local_files_only=True)
    if tower.config.hidden_size != LLM_SIZE["hidden_size"]:
        raise InputError(f"--vision-tower {folder}: its merger writes {tower.config.hidden_size}-wide tokens, the LLM "
                         f"reads {LLM_SIZE['hidden_size']}")
    return tower, Qwen2VLImageProcessorPil.from_pretrained(folder, local_files_only=True)


def build_llava(tokenizer, seed: int = 0, llm_layers: int = LLM_SIZE["num_hidden_layers"], vision_tower=None):
    """CLIP ViT (with CLS) + 2-layer MLP projector + Llama, exactly LlavaForConditionalGeneration.

    With `vision_tower` (a ref-clip folder) it is the LLaVA-1.5 layout: that tower's config and weights, read at its
    second-to-last layer; without, a 3-layer tower trained end to end with the model, read at its last layer."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    if vision_tower is None:
        vision = dict(model_type="clip_vision_model", image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=64, **VISION_SIZE)
        # The last ViT layer feeds the projector (-1): a layer -2 feature would leave the last layer untrained here.
        feature_layer = -1
        # The PIL processors are ~15x faster than the torchvision ones on small CPU images, and give the same pixels.
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        )
    else:
        tower, image_processor = load_ref_clip_tower(vision_tower)
        vision = tower.config.to_dict()
        # LLaVA-1.5 reads the penultimate layer of its frozen CLIP tower: the last one is shaped by the contrastive
        # objective through CLS alone.
        feature_layer = -2
    tokens_per_image = (IMAGE_SIZE // PATCH_SIZE) ** 2
    config = LlavaConfig(
        vision_config=vision, text_config=_text_config("llama", tokenizer, llm_layers),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=tokens_per_image,
        vision_feature_layer=feature_layer, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=True, **_text_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    if vision_tower is None:
        _init_clip_positions(model)
    else:
        model.model.vision_tower.load_state_dict(tower.state_dict())
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE, num_additional_image_tokens=1,
    )
    return model, processor


def build_qwen(tokenizer, seed: int = 0, llm_layers: int = LLM_SIZE["num_hidden_layers"], vision_tower=None):
    """Qwen2-VL: ViT without CLS, 2x2 patch merger into the LLM, M-RoPE; Qwen2VLForConditionalGeneration.

    With `vision_tower` (`train-clip --tower qwen`'s export) the ViT and merger start from that contrastively
    trained tower, the Qwen2-VL recipe; without, from random weights."""
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil, Qwen2VLProcessor,
                              Qwen2VLVideoProcessor)

    head_dim = LLM_SIZE["hidden_size"] // LLM_SIZE["num_attention_heads"]
    # M-RoPE splits the rotary half-dimension between (t, h, w) in Qwen2-VL's 1:1.5:1.5 proportion.
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]}
    convert = tokenizer.convert_tokens_to_ids
    if vision_tower is None:
        vision = dict(depth=VISION_SIZE["num_hidden_layers"], embed_dim=VISION_SIZE["hidden_size"],
                      hidden_size=LLM_SIZE["hidden_size"], num_heads=VISION_SIZE["num_attention_heads"],
                      mlp_ratio=VISION_SIZE["intermediate_size"] // VISION_SIZE["hidden_size"], patch_size=PATCH_SIZE,
                      spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
    else:
        tower, tower_processor = load_qwen_tower(vision_tower)
        vision = tower.config.to_dict()
    config = Qwen2VLConfig(
        text_config=_text_config("qwen2_vl_text", tokenizer, llm_layers, rope_parameters=rope),
        vision_config=vision,
        image_token_id=convert("<|image_pad|>"), video_token_id=convert("<|video_pad|>"),
        vision_start_token_id=convert("<|vision_start|>"), vision_end_token_id=convert("<|vision_end|>"),
        tie_word_embeddings=True, **_text_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    size = {"shortest_edge": IMAGE_SIZE * IMAGE_SIZE, "longest_edge": IMAGE_SIZE * IMAGE_SIZE}
    common = dict(size=size, patch_size=PATCH_SIZE, merge_size=2, temporal_patch_size=2)
    if vision_tower is not None:
        model.model.visual.load_state_dict(tower.state_dict())
    # A pretrained tower is read with the preprocessing it was trained with.
    image_processor = tower_processor if vision_tower is not None else Qwen2VLImageProcessorPil(**common)
    processor = Qwen2VLProcessor(
        image_processor=image_processor, video_processor=Qwen2VLVideoProcessor(**common),
        tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE,
    )
    return model, processor


BUILDERS = {"llava": build_llava, "qwen": build_qwen}


def build(arch: str, tokenizer, seed: int = 0, llm_layers: int = LLM_SIZE["num_hidden_layers"], vision_tower=None):
    if arch not in BUILDERS:
        raise UnknownNameError("reference architecture", arch, BUILDERS)
    model, processor = BUILDERS[arch](tokenizer, seed, llm_layers, vision_tower)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


_LLM_LAYER = re.compile(r"^(model\.language_model\.layers\.)(\d+)(\..*)$")


def grow_llm(model, shallow_state: dict) -> list[int]:
    """Load a trained model with fewer LLM layers into `model`, spreading its layers evenly over the deeper stack;
    every layer without a trained source starts as the identity (attention and MLP output projections zero), so the
    grown model computes exactly what the shallow one did and training goes on from there. Returns the new layers'
    indices."""
    old_layers = 1 + max((int(m.group(2)) for m in map(_LLM_LAYER.match, shallow_state) if m), default=-1)
    new_layers = model.config.text_config.num_hidden_layers
    if not 0 < old_layers <= new_layers:
        raise InputError(f"cannot grow an LLM of {old_layers} layers into one of {new_layers}")
    placed = {old: old * new_layers // old_layers for old in range(old_layers)}
    moved = {}
    for key, value in shallow_state.items():
        match = _LLM_LAYER.match(key)
        moved[f"{match.group(1)}{placed[int(match.group(2))]}{match.group(3)}" if match else key] = value
    fresh = sorted(set(range(new_layers)) - set(placed.values()))
    layers = model.model.language_model.layers
    with torch.no_grad():
        for index in fresh:
            layers[index].self_attn.o_proj.weight.zero_()
            layers[index].mlp.down_proj.weight.zero_()
            for name, value in layers[index].state_dict().items():
                moved[f"model.language_model.layers.{index}.{name}"] = value.clone()
    try:
        model.load_state_dict(moved)
    except RuntimeError as error:  # another architecture or width: name what does not fit instead of torch's dump
        raise InputError(f"cannot grow this model from the given checkpoint: {str(error).splitlines()[0]} "
                         f"(it must be the same --arch and sizes, with fewer LLM layers)") from error
    return fresh
