"""A LLaVA-style model composed of any supported vision tower, a two-layer MLP projector and any transformers causal LM.

The vision tower is the raw library module (timm, open_clip or transformers); `config.vision` says how to rebuild it
without downloads, so `save_pretrained` / `from_pretrained` round-trip through one safetensors file and a config.json.
Importing this module registers the config with `AutoConfig` (model_type "tokenomy_composed_vlm") and the model with
`AutoModelForImageTextToText`; no `trust_remote_code` is involved.

Image features are the patch tokens (CLS dropped) of encoder layer `vision_feature_layer`, read through
`tokenomy.vision.wrap_encoder`, so reducers reach them through the same encoder interface as for any other model. The
encoder runs without gradients: the vision tower is frozen, as in LLaVA; the projector and the LM train normally.
With a transformers CLIP tower the model computes exactly what transformers' LlavaForConditionalGeneration computes.

`from_pretrained` builds the model on the meta device and fills it from the safetensors file. Non-persistent buffers
of a library (non-transformers) tower would not be restored that way; the towers `wrap_encoder` accepts (timm and
open_clip VisionTransformer) have none, and transformers towers restore theirs in their own `_init_weights`.
"""
from __future__ import annotations

import json

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.activations import ACT2CLS, ACT2FN
from transformers.configuration_utils import SubConfigSpec

from tokenomy.errors import InputError, ModelLoadError, UnknownNameError
from tokenomy.vision import HFViTEncoder, OpenClipViTEncoder, TimmViTEncoder, VisionEncoder, wrap_encoder
from tokenomy.vision.base import layers_to_run

VISION_LIBRARIES = ("timm", "open_clip", "transformers")
_SPEC_ATTRIBUTE = "_tokenomy_vision_spec"


# ---------------------------------------------------------------- vision towers from specs


def build_vision_tower(spec: dict) -> nn.Module:
    """Build a vision tower, random-initialised, from a spec; never downloads.

    {"library": "timm", "model_name": "vit_base_patch16_clip_224", "kwargs": {...}}: `timm.create_model(name,
        pretrained=False, **kwargs)`.
    {"library": "open_clip", "model_name": "ViT-B-32", "vision_cfg": {...overrides}, "embed_dim": int,
        "quick_gelu": bool}: the vision tower of that open_clip architecture (name optional when `vision_cfg` and
        `embed_dim` are complete).
    {"library": "transformers", "config": {"model_type": "clip_vision_model", ...}}: `AutoModel.from_config`.
    The spec is remembered on the module, so `build_composed` can record it without being told again.
    """
    library = spec.get("library")
    if library == "timm":
        import timm

        if "model_name" not in spec:
            raise ModelLoadError(f"timm vision spec needs 'model_name': {spec}")
        tower = timm.create_model(spec["model_name"], **{**spec.get("kwargs", {}), "pretrained": False})
    elif library == "open_clip":
        tower = _build_open_clip_tower(spec)
    elif library == "transformers":
        if "config" not in spec or "model_type" not in spec["config"]:
            raise ModelLoadError(f"transformers vision spec needs 'config' with a 'model_type': {spec}")
        config = dict(spec["config"])
        tower = AutoModel.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    else:
        raise UnknownNameError("vision library", str(library), VISION_LIBRARIES)
    setattr(tower, _SPEC_ATTRIBUTE, spec)
    return tower


def _build_open_clip_tower(spec: dict) -> nn.Module:
    import open_clip
    from open_clip.model import _build_vision_tower

    base = {}
    if "model_name" in spec:
        base = open_clip.get_model_config(spec["model_name"])
        if base is None:
            raise UnknownNameError("open_clip model", spec["model_name"], open_clip.list_models())
    vision_cfg = {**base.get("vision_cfg", {}), **spec.get("vision_cfg", {})}
    embed_dim = spec.get("embed_dim", base.get("embed_dim"))
    if embed_dim is None or not vision_cfg:
        raise ModelLoadError(f"open_clip vision spec needs 'model_name' or both 'vision_cfg' and 'embed_dim': {spec}")
    # open_clip's own pretrained-weight flag for timm trunks would download; a spec never loads weights itself
    vision_cfg["timm_model_pretrained"] = False
    return _build_vision_tower(embed_dim, vision_cfg, quick_gelu=spec.get("quick_gelu", base.get("quick_gelu", False)))


def _inferred_vision_spec(tower: nn.Module) -> dict:
    """The spec of a tower built elsewhere: remembered, read from a transformers config, or a timm architecture."""
    if hasattr(tower, _SPEC_ATTRIBUTE):
        return getattr(tower, _SPEC_ATTRIBUTE)
    encoder = wrap_encoder(tower)
    if isinstance(encoder, HFViTEncoder) and isinstance(tower, PreTrainedModel):
        return {"library": "transformers", "config": tower.config.to_dict()}
    architecture = getattr(tower, "pretrained_cfg", {}).get("architecture")
    if isinstance(encoder, TimmViTEncoder) and encoder.model is tower and architecture:
        return {"library": "timm", "model_name": architecture, "kwargs": {"num_classes": tower.num_classes}}
    raise ModelLoadError(
        f"cannot tell how to rebuild a {type(tower).__name__} vision tower; build it with "
        "tokenomy.vlm.composed.build_vision_tower(spec) or pass vision_spec= to build_composed"
    )


def _check_spec_rebuilds(spec: dict, tower: nn.Module) -> None:
    """Building `spec` (on the meta device: no memory, no init cost) must give `tower`'s parameter names and shapes."""
    with torch.device("meta"):
        rebuilt = build_vision_tower(spec)
    want = {name: tuple(t.shape) for name, t in tower.state_dict().items()}
    got = {name: tuple(t.shape) for name, t in rebuilt.state_dict().items()}
    if want != got:
        differing = sorted(set(want.items()) ^ set(got.items()))[:3]
        raise ModelLoadError(
            f"vision spec {spec} does not rebuild the given {type(tower).__name__}: parameters differ at {differing}; "
            "pass the spec the tower was built from as vision_spec="
        )


def _tower_geometry(encoder: VisionEncoder) -> tuple:
    """(token width, patches per image at the tower's native input size)."""
    model = encoder.model
    if isinstance(encoder, TimmViTEncoder):
        return model.embed_dim, model.patch_embed.num_patches
    if isinstance(encoder, OpenClipViTEncoder):
        return model.transformer.width, model.grid_size[0] * model.grid_size[1]
    if isinstance(encoder, HFViTEncoder):
        return encoder.config.hidden_size, (encoder.config.image_size // encoder.config.patch_size) ** 2
    raise ModelLoadError(f"no geometry known for {type(encoder).__name__}")


# ---------------------------------------------------------------- config


@strict
class ComposedVLMConfig(PretrainedConfig):
    """vision: spec for `build_vision_tower`; text_config: any causal-LM config; vision_feature_layer: the
    `hidden_states` index (transformers' convention: 0 is the embedding output, -1 the last layer) whose patch tokens
    feed the projector (LLaVA: -2); image_token_id: the placeholder id in input_ids;
    image_seq_length: image tokens per image (filled in from the tower when left None)."""

    model_type = "tokenomy_composed_vlm"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    vision: dict | None = None
    text_config: dict | PretrainedConfig | None = None
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int = -2
    image_token_id: int | None = None
    image_seq_length: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.vision is not None:
            if self.vision.get("library") not in VISION_LIBRARIES:
                raise UnknownNameError("vision library", str(self.vision.get("library")), VISION_LIBRARIES)
            try:
                json.dumps(self.vision)
            except TypeError as error:  # config.json must hold the spec; a class or module object cannot go there
                raise ModelLoadError(f"vision spec is not JSON-serialisable ({error}): {self.vision}") from error
        if self.projector_hidden_act not in ACT2FN:
            raise UnknownNameError("projector activation", self.projector_hidden_act, ACT2FN.keys())
        # the LM ties its own embeddings; mirror its flag so transformers' tying bookkeeping agrees with it
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))


# ---------------------------------------------------------------- model


class ComposedVLMProjector(nn.Module):
    """LLaVA's projector: Linear -> activation -> Linear (same parameter names as transformers' Llava)."""

    def __init__(self, vision_width: int, text_width: int, activation: str = "gelu"):
        super().__init__()
        self.linear_1 = nn.Linear(vision_width, text_width)
        self.act = ACT2FN[activation]
        self.linear_2 = nn.Linear(text_width, text_width)

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_tokens)))


def _mark_initialized(module: nn.Module) -> nn.Module:
    """Keep `post_init` from re-initialising a module that arrives with its own weights."""
    for sub in module.modules():
        sub._is_hf_initialized = True
    return module


class ComposedVLMForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config: ComposedVLMConfig
    config_class = ComposedVLMConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: ComposedVLMConfig, vision_tower=None, multi_modal_projector=None, language_model=None):
        super().__init__(config)
        if config.vision is None and vision_tower is None:
            raise ModelLoadError("ComposedVLMConfig.vision is empty: it must say how to build the vision tower")
        self.vision_tower = build_vision_tower(config.vision) if vision_tower is None else vision_tower
        width, num_patches = _tower_geometry(self.vision_encoder)
        if config.image_seq_length is None:
            config.image_seq_length = num_patches
        if multi_modal_projector is None:
            text_width = config.text_config.hidden_size
            self.multi_modal_projector = ComposedVLMProjector(width, text_width, config.projector_hidden_act)
        else:
            self.multi_modal_projector = _mark_initialized(multi_modal_projector)
        if language_model is None:
            self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        else:
            self.language_model = _mark_initialized(language_model)
        if not isinstance(self.vision_tower, PreTrainedModel):  # library towers are initialised by their library
            _mark_initialized(self.vision_tower)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        if module in (self.multi_modal_projector.linear_1, self.multi_modal_projector.linear_2):
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)

    @property
    def vision_encoder(self) -> VisionEncoder:
        """The tower behind tokenomy's encoder interface (layer loop, hooks, attention-row signals)."""
        return wrap_encoder(self.vision_tower)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def get_decoder(self):
        return self.language_model.get_decoder()

    def get_image_features(self, pixel_values: torch.Tensor, vision_feature_layer: int | None = None) -> torch.Tensor:
        """[B, N, d_llm]: projected patch tokens of the feature layer."""
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        encoder = self.vision_encoder
        tokens = encoder.encode(pixel_values, run_layers=layers_to_run(layer, encoder.num_layers)).tokens
        return self.multi_modal_projector(tokens.to(self.multi_modal_projector.linear_1.weight.dtype))

    def merge_image_features(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor):
        """Write image features, in order, over the image placeholder positions of `inputs_embeds`."""
        placeholders = input_ids == self.config.image_token_id
        num_placeholders = int(placeholders.sum())
        num_features = image_features.shape[0] * image_features.shape[1]
        if num_placeholders != num_features:
            raise InputError(
                f"input_ids hold {num_placeholders} image placeholder tokens (id {self.config.image_token_id}) but the "
                f"images give {num_features} features ({image_features.shape[0]} images x {image_features.shape[1]})"
            )
        return inputs_embeds.masked_scatter(placeholders[..., None], image_features.to(inputs_embeds.dtype))

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        cache=None,
        labels=None,
        past_key_values=None,
        **kw,
    ):
        """Embed the text, write the projected image features over the `image_token_id` placeholders (in order:
        sample by sample, image by image) and run the LM; returns its output (logits, past_key_values, loss). Labels
        are passed to the LM unchanged, so mask the placeholder positions with -100 yourself."""
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids and inputs_embeds")
        if pixel_values is not None:
            if input_ids is None:
                raise InputError("pixel_values need input_ids: the image placeholders are found by token id")
            if self.config.image_token_id is None:
                raise InputError("config.image_token_id is unset, so images have nowhere to go")
            # placeholder ids may lie outside the LM vocabulary; their embeddings are overwritten anyway
            text_ids = input_ids.masked_fill(input_ids == self.config.image_token_id, 0)
            inputs_embeds = self.get_input_embeddings()(text_ids)
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, self.get_image_features(pixel_values))
            input_ids = None
        return self.language_model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,  # transformers 5.x renames past_key_values to cache
            labels=labels,
            **kw,
        )


def _projector_from(module: nn.Module | None, vision_width: int, text_width: int, activation: str):
    """A `ComposedVLMProjector` holding the given weights; accepts ours or nn.Sequential(Linear, act, Linear)."""
    if module is None or isinstance(module, ComposedVLMProjector):
        return module
    layers = list(module.children()) if isinstance(module, nn.Sequential) else []
    if len(layers) != 3 or not (isinstance(layers[0], nn.Linear) and isinstance(layers[2], nn.Linear)):
        raise ModelLoadError(
            f"projector must be a ComposedVLMProjector or nn.Sequential(Linear, activation, Linear), got {module}"
        )
    expected = type(ACT2FN[activation])
    if not isinstance(layers[1], expected) and not (activation == "gelu" and type(layers[1]) is nn.GELU
                                                      and layers[1].approximate == "none"):
        raise ModelLoadError(
            f"projector activation is {type(layers[1]).__name__}, but projector_hidden_act={activation!r} rebuilds "
            f"{expected.__name__}; pass the matching projector_hidden_act (one of {sorted(ACT2CLS)})"
        )
    projector = ComposedVLMProjector(vision_width, text_width, activation)
    projector.linear_1.load_state_dict(layers[0].state_dict())
    projector.linear_2.load_state_dict(layers[2].state_dict())
    return projector.to(layers[0].weight.device, layers[0].weight.dtype)


def build_composed(
    vision_model: nn.Module,
    projector: nn.Module | None,
    language_model: PreTrainedModel,
    *,
    image_token_id: int | None = None,
    vision_feature_layer: int = -2,
    projector_hidden_act: str = "gelu",
    vision_spec: dict | None = None,
) -> ComposedVLMForConditionalGeneration:
    """Compose live modules (their weights kept, not copied) into a savable `ComposedVLMForConditionalGeneration`.

    `vision_spec` says how to rebuild the tower; it defaults to what `build_vision_tower` remembered, a transformers
    config, or a timm architecture name, and is checked against the tower's parameter shapes. `projector=None` makes a
    fresh one.
    """
    spec = vision_spec if vision_spec is not None else _inferred_vision_spec(vision_model)
    _check_spec_rebuilds(spec, vision_model)
    width, _ = _tower_geometry(wrap_encoder(vision_model))
    projector = _projector_from(projector, width, language_model.config.hidden_size, projector_hidden_act)
    attn_implementation = language_model.config._attn_implementation
    config = ComposedVLMConfig(
        vision=spec,
        text_config=language_model.config,
        projector_hidden_act=projector_hidden_act,
        vision_feature_layer=vision_feature_layer,
        image_token_id=image_token_id,
    )
    # a new composite config resets its sub-configs' attention choice; the live LM keeps the one it was built with
    config.text_config._attn_implementation = attn_implementation
    return ComposedVLMForConditionalGeneration(
        config, vision_tower=vision_model, multi_modal_projector=projector, language_model=language_model
    )


AutoConfig.register(ComposedVLMConfig.model_type, ComposedVLMConfig, exist_ok=True)
AutoModelForImageTextToText.register(ComposedVLMConfig, ComposedVLMForConditionalGeneration, exist_ok=True)
