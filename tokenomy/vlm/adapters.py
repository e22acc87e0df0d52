"""Model adapters: the only place that knows transformers' VLM classes.

An adapter turns prompts and images into processor inputs, encodes the images into reducible visual tokens with the
signals a reducer asked for, projects kept tokens into the LLM, and tells where the LLM, its decoder layers and its
reference positions are.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from tokenomy.errors import ModelLoadError
from tokenomy.reducers.base import ImageTokens, PositionPolicy, Selection
from tokenomy.vision.base import SignalRequest, grid_positions
from tokenomy.vision.hf import HFViTEncoder
from tokenomy.vision.qwen_vit import QwenViTEncoder
from tokenomy.vlm import composed as _composed  # noqa: F401  registers the composed model with the Auto classes


@dataclass
class EncodedImage:
    """One image's reducible tokens, the number of placeholders it fills, and how a selection reaches the LLM.

    `to_llm(selection)` returns the LLM-dim features of the image's span after reduction, [M, d_llm], and for each of
    them the placeholder offset (0..num_placeholders-1) whose reference position it takes.
    """

    tokens: ImageTokens
    num_placeholders: int
    to_llm: Callable


class Adapter(ABC):
    family = "?"
    default_policy = PositionPolicy.CONTIGUOUS
    supported_policies = (PositionPolicy.CONTIGUOUS, PositionPolicy.KEEP)

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_token_id = int(model.config.image_token_id)

    # ---- the language model -------------------------------------------------------------------------------------
    @property
    def language_model(self):
        return self.model.model.language_model

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def decoder_layers(self):
        return self.language_model.layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    # ---- inputs ---------------------------------------------------------------------------------------------------
    def chat_text(self, prompt: str, num_images: int) -> str:
        """The model's chat template around the user's prompt; '<image>' marks where each image goes."""
        pieces = prompt.split("<image>")
        content = []
        if len(pieces) == 1:
            content = [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]
        else:
            for index, piece in enumerate(pieces):
                if index:
                    content.append({"type": "image"})
                if piece:
                    content.append({"type": "text", "text": piece})
        messages = [{"role": "user", "content": content}]
        if getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        image = getattr(self.processor, "image_token", "<image>")
        return "".join(image + "\n" if item["type"] == "image" else item["text"] for item in content)

    def process(self, texts: list, images: list):
        kwargs = dict(text=texts, return_tensors="pt", padding=True)
        if images:
            kwargs["images"] = images
        self.tokenizer.padding_side = "left"
        return self.processor(**kwargs)

    def reference_positions(self, batch) -> torch.Tensor:
        """Position ids of the unreduced sequence, as `generate` would build them: [B, L] (or [3, B, L] for M-RoPE)."""
        mask = batch["attention_mask"]
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def llm_position_ids(self, positions: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What to pass to the LLM as position_ids given assembled positions."""
        return positions

    @abstractmethod
    def encode_images(self, batch, request: SignalRequest) -> list:
        """One `EncodedImage` per image of the batch, in batch order, with the signals of `request`."""


class LlavaAdapter(Adapter):
    """LlavaForConditionalGeneration: CLIP/SigLIP tower -> feature layer -> (drop CLS) -> MLP projector."""

    family = "llava"

    def __init__(self, model, processor):
        super().__init__(model, processor)
        config = model.config
        if not isinstance(config.vision_feature_layer, int):
            raise ModelLoadError("several vision_feature_layer values are not supported; use a single layer index")
        self.feature_layer = config.vision_feature_layer
        self.vision = HFViTEncoder(model.model.vision_tower)
        if config.vision_feature_select_strategy == "full" and self.vision.has_cls:
            raise ModelLoadError("vision_feature_select_strategy='full' with a CLS token is not supported")
        self.projector = model.model.multi_modal_projector

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)

    def encode_images(self, batch, request):
        pixel_values = batch["pixel_values"]
        out = self.vision.encode(pixel_values, feature_layer=self.feature_layer, request=request)
        encoded = []
        for index in range(out.tokens.shape[0]):
            signals = {name: torch.stack([by_layer[layer][index] for layer in sorted(by_layer)]) for name, by_layer in out.signals.items()}
            tokens = ImageTokens(out.tokens[index], out.grid, signals)
            encoded.append(EncodedImage(tokens, tokens.num_tokens, self._span_builder(tokens)))
        return encoded

    def _span_builder(self, tokens: ImageTokens):
        def to_llm(selection: Selection):
            return self._project(selection.apply(tokens.features)), selection.kept
        return to_llm


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT anyres: base view + tiles, unpadded and packed with one newline token per row.

    Reducible tokens are the packed patch tokens; newline tokens are structure, always kept, never counted in budgets.
    Positions are (crop, row, column) of each patch in its crop.
    """

    family = "llava-next"

    def encode_images(self, batch, request):
        pixel_values, image_sizes = batch["pixel_values"], batch["image_sizes"]
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.model.config
        crops_per_image = [
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size) for size in image_sizes
        ]
        flat = torch.cat([pixels[:count] for pixels, count in zip(pixel_values, crops_per_image)], dim=0)
        out = self.vision.encode(flat, feature_layer=self.feature_layer, request=request)
        per_crop = out.tokens.shape[1]
        newline = self.model.model.image_newline
        encoded, start = [], 0
        for image_index, count in enumerate(crops_per_image):
            crop_tokens = out.tokens[start : start + count]
            # Pack token indices (1-based, 0 marks a newline) the way transformers packs the features themselves.
            index_features = torch.arange(1, count * per_crop + 1, dtype=torch.float32).view(count, per_crop, 1)
            (packed,), _ = self.model.model.pack_image_features(
                [index_features], image_sizes[image_index : image_index + 1], config.vision_feature_select_strategy,
                image_newline=torch.zeros(1),
            )
            packed = packed[:, 0].round().long() - 1
            is_patch = packed >= 0
            source = packed[is_patch]  # flat (crop * per_crop + patch) index of each reducible token, packed order
            features = crop_tokens.reshape(count * per_crop, -1)[source]
            side = int(round(per_crop ** 0.5))
            crop_grid = grid_positions(1, side, side, device=features.device)
            positions = torch.cat([(source // per_crop)[:, None], crop_grid[source % per_crop][:, 1:]], dim=1)
            signals = {
                name: torch.stack([by_layer[layer][start : start + count].reshape(-1)[source] for layer in sorted(by_layer)])
                for name, by_layer in out.signals.items()
            }
            tokens = ImageTokens(features, positions, signals)
            encoded.append(EncodedImage(tokens, int(packed.numel()), self._packed_builder(tokens, is_patch, newline)))
            start += count
        return encoded

    def _packed_builder(self, tokens, is_patch, newline):
        token_offsets = torch.nonzero(is_patch).squeeze(1)  # placeholder offset of each reducible token

        def to_llm(selection: Selection):
            projected = self._project(selection.apply(tokens.features))
            kept_offsets = token_offsets[selection.kept]
            newline_offsets = torch.nonzero(~is_patch).squeeze(1)
            offsets = torch.cat([kept_offsets, newline_offsets])
            features = torch.cat([projected, newline[None].to(projected).expand(len(newline_offsets), -1)])
            order = torch.argsort(offsets, stable=True)
            return features[order], offsets[order]

        return to_llm


class QwenVLAdapter(Adapter):
    """Qwen2-VL / Qwen2.5-VL: ViT with 2x2 patch merger (the projector) and M-RoPE positions (t, h, w).

    Reducible tokens are the merger outputs (LLM-dim); positions are their (t, h, w) in the merged grid. Kept tokens
    keep their M-RoPE ids (P-keep); contiguous renumbering is not defined for M-RoPE and is refused.
    """

    family = "qwen2-vl"
    default_policy = PositionPolicy.KEEP
    supported_policies = (PositionPolicy.KEEP,)

    def __init__(self, model, processor):
        super().__init__(model, processor)
        self.vision = QwenViTEncoder(model.model.visual)
        self.feature_layer = -1

    def encode_images(self, batch, request):
        grid_thw = batch["image_grid_thw"]
        counts = grid_thw.prod(-1).tolist()
        encoded, start = [], 0
        for image, count in enumerate(counts):
            out = self.vision.encode_image(batch["pixel_values"][start : start + count], grid_thw[image : image + 1], request)
            start += count
            signals = {name: torch.stack([by_layer[layer][0] for layer in sorted(by_layer)]) for name, by_layer in out.signals.items()}
            tokens = ImageTokens(out.tokens[0], out.grid, signals)
            encoded.append(EncodedImage(tokens, tokens.num_tokens, self._span_builder(tokens)))
        return encoded

    def _span_builder(self, tokens):
        def to_llm(selection: Selection):
            return selection.apply(tokens.features), selection.kept
        return to_llm

    def reference_positions(self, batch):
        positions, _ = self.model.model.get_rope_index(
            batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch.get("image_grid_thw"),
            attention_mask=batch["attention_mask"],
        )
        return positions

    def llm_position_ids(self, positions, attention_mask):
        # Row 0 is the plain text position transformers uses to build the mask; rows 1..3 are the M-RoPE ids.
        text_row = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return torch.cat([text_row[None], positions], dim=0)


class ComposedAdapter(LlavaAdapter):
    """tokenomy's composed model: any timm / open_clip / transformers tower + MLP projector + any causal LM."""

    family = "composed"

    def __init__(self, model, processor):
        Adapter.__init__(self, model, processor)
        self.feature_layer = model.config.vision_feature_layer
        self.vision = model.vision_encoder
        self.projector = model.multi_modal_projector

    @property
    def language_model(self):
        return self.model.language_model.get_decoder()


ADAPTERS = {
    "ComposedVLMForConditionalGeneration": ComposedAdapter,
    "LlavaForConditionalGeneration": LlavaAdapter,
    "LlavaNextForConditionalGeneration": LlavaNextAdapter,
    "Qwen2VLForConditionalGeneration": QwenVLAdapter,
    "Qwen2_5_VLForConditionalGeneration": QwenVLAdapter,
}


def adapter_for(model, processor) -> Adapter:
    name = type(model).__name__
    if name not in ADAPTERS:
        raise ModelLoadError(f"model class {name} is not supported; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name](model, processor)
