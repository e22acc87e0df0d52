"""Model adapters: the only place that knows transformers' VLM classes.

An adapter turns prompts and images into processor inputs, encodes each image into reducible tokens (running the
encoder-site stages between its layers and computing the signals asked for), projects tokens into the LLM, lays a
reduced image out as the LLM reads it, and tells where the LLM, its decoder layers and its reference positions are.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from tokenomy.errors import InputError, ModelLoadError
from tokenomy.reducers.base import ImageTokens, PositionPolicy
from tokenomy.ops.window_attention import window_attention_received
from tokenomy.vision.base import WINDOW_ATTENTION, SignalRequest, grid_positions, layers_to_run
from tokenomy.vision.hf import HFViTEncoder
from tokenomy.vision.qwen_vit import QwenViTEncoder
from tokenomy.vlm import composed as _composed  # noqa: F401  registers the composed model with the Auto classes
from tokenomy.vlm.sites import EncoderSiteHook, VisionSignals
from tokenomy.vlm.views import cell_boxes, unnormalised


@dataclass
class EncodedImage:
    """One image after the encoder site: its pre-projector tokens and how they reach the LLM.

    tokens: ImageTokens at the pre-projector site (TRUE positions; sources when the encoder site merged). signals: the
    encoder signals asked for, aligned with the tokens. num_placeholders: the placeholder tokens the image fills in the
    unreduced prompt. project(features) -> LLM-dim features. offsets(positions [..., 3]) -> placeholder offsets [...]:
    where a token of that grid position sits in the unreduced span, so it takes that placeholder's reference position.
    layout(features [K, d], offsets [K, ...]) -> (features [M, d], offsets [M, ...], visual [K]): the image's span as
    the LLM reads it, structure tokens (LLaVA-NeXT's newlines) included; visual[i] is the span slot of token i.
    """

    tokens: ImageTokens
    signals: VisionSignals
    num_placeholders: int
    project: Callable
    offsets: Callable
    layout: Callable
    num_tokens_in: int  # reducible tokens of the unreduced image
    index_of: Callable  # positions [..., 3] -> index among the unreduced image's reducible tokens (stats)
    token_ids: tuple = ()  # placeholder ids its span is made of (a video's, or audio and video interleaved); () = image
    # For tokenomy.vis: () -> (pixels uint8 [H, W, 3] as the encoder saw them, boxes [num_tokens_in, 4] (x0, y0, x1, y1)
    # of each reducible token by index), called only when a picture is wanted; None where no picture is defined (videos).
    view: Optional[Callable] = None
    # When `tokens.sources` is set (the encoder site merged): for each of its columns the reducible index of that
    # original token, or -1 for one that never reaches the LLM (LLaVA-NeXT's unpadded patches).
    source_index: Optional[torch.Tensor] = None


def _in_order(features, offsets):
    return features, offsets, torch.arange(len(features), device=features.device)


def _raster_offsets(grid_shape: tuple) -> Callable:
    """Offsets of a raster-ordered (t, h, w) grid."""
    _, h, w = grid_shape

    def offsets(positions):
        return positions[..., 0] * h * w + positions[..., 1] * w + positions[..., 2]

    return offsets


def _per_image_signals(signals: dict, row: int) -> VisionSignals:
    return VisionSignals({name: {layer: value[row] for layer, value in by_layer.items()} for name, by_layer in signals.items()})


class Adapter(ABC):
    family = "?"
    default_policy = PositionPolicy.CONTIGUOUS
    supported_policies = (PositionPolicy.CONTIGUOUS, PositionPolicy.KEEP, PositionPolicy.MULTI)

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
    supports_video = False
    reads_audio = False  # whether a video's audio track is an input

    def chat_text(self, prompt: str, num_images: int, num_videos: int = 0) -> str:
        """The model's chat template around the user's prompt; '<image>' and '<video>' mark where each image and
        video goes (without markers: the images, then the videos, then the text)."""
        content = []
        if "<image>" not in prompt and "<video>" not in prompt:
            content = [{"type": "image"}] * num_images + [{"type": "video"}] * num_videos + [{"type": "text", "text": prompt}]
        else:
            for piece in re.split(r"(<image>|<video>)", prompt):
                if piece in ("<image>", "<video>"):
                    content.append({"type": piece[1:-1]})
                elif piece:
                    content.append({"type": "text", "text": piece})
        messages = [{"role": "user", "content": content}]
        if getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        image = getattr(self.processor, "image_token", "<image>")
        return "".join(image + "\n" if item["type"] == "image" else item["text"] for item in content)

    def process(self, texts: list, images: list, videos: list = ()):
        """Processor inputs; videos are (frames uint8 [T, H, W, 3], audio or None, note) as tokenomy.io.video_clip gives."""
        if videos and not self.supports_video:
            raise InputError(f"{self.family} models do not read videos; use a Qwen2-VL, Qwen2.5-VL or Qwen2.5-Omni model, or "
                             "pass a video's frames as images")
        self.tokenizer.padding_side = "left"
        return self.processor(**self._processor_kwargs(texts, images, videos))

    @staticmethod
    def _processor_kwargs(texts, images, videos) -> dict:
        kwargs = dict(text=texts, return_tensors="pt", padding=True)
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = [frames for frames, _, _ in videos]
        return kwargs

    def reference_positions(self, batch) -> torch.Tensor:
        """Position ids of the unreduced sequence, as `generate` would build them: [B, L] (or [3, B, L] for M-RoPE)."""
        mask = batch["attention_mask"]
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def llm_position_ids(self, positions: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What to pass to the LLM as position_ids given assembled positions."""
        return positions

    @abstractmethod
    def encode_images(self, batch, request: SignalRequest, encoder_stages: list, requests: dict, records: dict) -> list:
        """One `EncodedImage` per image of the batch, in batch order, with the signals of `request`."""

    @property
    @abstractmethod
    def vision(self):
        """The vision encoder behind tokenomy's encoder interface."""

    @property
    def layers_run(self) -> int:
        """Encoder layers that run for the feature layer (the last one when several are concatenated)."""
        return layers_to_run(self.feature_layer, self.vision.num_layers) if not isinstance(self.feature_layer, list) \
            else max(layers_to_run(layer, self.vision.num_layers) for layer in self.feature_layer)


class LlavaAdapter(Adapter):
    """LlavaForConditionalGeneration: CLIP/SigLIP tower -> hidden_states[vision_feature_layer] -> (drop CLS) -> MLP."""

    family = "llava"

    def __init__(self, model, processor):
        super().__init__(model, processor)
        config = model.config
        self._vision = HFViTEncoder(model.model.vision_tower)
        self.feature_layer = self._checked_feature_layer(config.vision_feature_layer)
        if config.vision_feature_select_strategy == "full" and self.vision.has_cls:
            raise ModelLoadError("vision_feature_select_strategy='full' with a CLS token is not supported")
        self.projector = model.model.multi_modal_projector

    def _checked_feature_layer(self, layer):
        """transformers' `hidden_states` index (0 = embedding output, negative from the end) or a list of them."""
        layers = list(layer) if isinstance(layer, (list, tuple)) else [layer]
        if not layers:
            raise ModelLoadError("vision_feature_layer is an empty list")
        for item in layers:
            try:
                layers_to_run(item, self.vision.num_layers)
            except InputError as error:
                raise ModelLoadError(str(error)) from error
        return layers if isinstance(layer, (list, tuple)) else layer

    @property
    def vision(self):
        return self._vision

    def run_layers(self):
        if isinstance(self.feature_layer, list):
            return [layers_to_run(layer, self.vision.num_layers) for layer in self.feature_layer]
        return layers_to_run(self.feature_layer, self.vision.num_layers)

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features)

    def _encode(self, pixel_values, request, encoder_stages, requests, records, image_ids) -> list:
        """Encode a batch of crops or images: all at once, or one at a time when encoder-site stages act (so that a
        sample's result never depends on its batch). Returns (tokens, grid, sources, signals) per row."""
        run_layers = self.run_layers()
        if encoder_stages and isinstance(run_layers, list):
            raise InputError("encoder-site reducers cannot run with a list-valued vision_feature_layer")
        if not encoder_stages:
            out = self.vision.encode(pixel_values, request=request, run_layers=run_layers)
            return [(out.tokens[row], out.grid, None, _per_image_signals(out.signals, row)) for row in range(len(out.tokens))]
        rows = []
        for row, image_id in enumerate(image_ids):
            pixels = pixel_values[row : row + 1]
            t, h, w = self.vision._patch_grid(pixels)
            hook = EncoderSiteHook(encoder_stages, requests, grid_positions(t, h, w, device=pixels.device),
                                   self.vision.has_cls, image_id, records)
            out = self.vision.encode(pixels, request=request, hooks=(hook,), run_layers=run_layers)
            grid = hook.positions if hook.positions is not None else out.grid
            sources = out.sources[0] if out.sources is not None else None
            rows.append((out.tokens[0], grid, sources, _per_image_signals(out.signals, 0)))
        return rows

    def encode_images(self, batch, request, encoder_stages=(), requests=None, records=None):
        pixel_values = batch["pixel_values"]
        rows = self._encode(pixel_values, request, encoder_stages, requests, records, range(len(pixel_values)))
        grid_shape = self.vision._patch_grid(pixel_values)
        encoded = []
        for row, (features, grid, sources, signals) in enumerate(rows):
            tokens = ImageTokens(features, grid, sources=sources, project=self._project)
            num_placeholders = grid_shape[0] * grid_shape[1] * grid_shape[2]
            offsets = _raster_offsets(grid_shape)
            encoded.append(EncodedImage(tokens, signals, num_placeholders, self._project, offsets, _in_order, num_placeholders, offsets,
                                        view=self._raster_view(pixel_values[row], grid_shape),
                                        source_index=torch.arange(num_placeholders)))
        return encoded

    def _raster_view(self, pixels: torch.Tensor, grid_shape: tuple) -> Callable:
        """The picture of one image [3, H, W]: its patches in raster order."""
        _, h, w = grid_shape

        def view():
            picture = unnormalised(pixels, self.processor.image_processor)
            return picture, cell_boxes(h, w, picture.shape[0] // h, picture.shape[1] // w)

        return view


class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT anyres: base view + tiles, unpadded and packed with one newline token per row.

    Reducible tokens are the packed patch tokens; newline tokens are structure, always kept, never counted in budgets.
    Positions are (crop, row, column) of each patch in its crop. Encoder-site stages act on each crop; a patch they
    keep that unpadding would drop is dropped as transformers drops it.
    """

    family = "llava-next"

    def encode_images(self, batch, request, encoder_stages=(), requests=None, records=None):
        pixel_values, image_sizes = batch["pixel_values"], batch["image_sizes"]
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.model.config
        crops_per_image = [
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size) for size in image_sizes
        ]
        flat = torch.cat([pixels[:count] for pixels, count in zip(pixel_values, crops_per_image)], dim=0)
        crop_image = [image for image, count in enumerate(crops_per_image) for _ in range(count)]
        rows = self._encode(flat, request, encoder_stages, requests, records, crop_image)
        _, side, _ = self.vision._patch_grid(flat)
        per_crop = side * side
        newline = self.model.model.image_newline
        encoded, start = [], 0
        for image_index, count in enumerate(crops_per_image):
            crop_rows = rows[start : start + count]
            # Pack token indices (1-based, 0 marks a newline) the way transformers packs the features themselves.
            index_features = torch.arange(1, count * per_crop + 1, dtype=torch.float32).view(count, per_crop, 1)
            (packed,), _ = self.model.model.pack_image_features(
                [index_features], image_sizes[image_index : image_index + 1], config.vision_feature_select_strategy,
                image_newline=torch.zeros(1),
            )
            packed = packed[:, 0].round().long() - 1
            is_patch = packed >= 0
            slot_of_flat = torch.full((count * per_crop,), -1, dtype=torch.long)
            slot_of_flat[packed[is_patch]] = torch.nonzero(is_patch).squeeze(1)  # packed offset of each crop patch
            features, positions, sources, signals = [], [], [], {}
            for crop, (crop_features, crop_grid, crop_sources, crop_signals) in enumerate(crop_rows):
                flat_index = crop * per_crop + crop_grid[:, 1] * side + crop_grid[:, 2]
                survives = slot_of_flat[flat_index.cpu()] >= 0
                features.append(crop_features[survives.to(crop_features.device)])
                positions.append(torch.cat([torch.full_like(crop_grid[:, :1], crop), crop_grid[:, 1:]], 1)[survives])
                if crop_sources is not None:
                    expanded = crop_sources.new_zeros(len(crop_sources), count * per_crop)
                    expanded[:, crop * per_crop : (crop + 1) * per_crop] = crop_sources
                    sources.append(expanded[survives])
                for name, by_layer in crop_signals.by_layer.items():
                    for layer, value in by_layer.items():
                        signals.setdefault(name, {}).setdefault(layer, []).append(value[survives.to(value.device)])
            features, positions = torch.cat(features), torch.cat(positions)
            offsets_of = self._packed_offsets(slot_of_flat, per_crop, side)
            order = torch.argsort(offsets_of(positions).cpu(), stable=True)  # packed order, as transformers reads them
            signals = VisionSignals({name: {layer: torch.cat(parts)[order.to(parts[0].device)] for layer, parts in by_layer.items()}
                                     for name, by_layer in signals.items()})
            tokens = ImageTokens(features[order.to(features.device)], positions[order], project=self._project,
                                 sources=torch.cat(sources)[order] if sources else None)
            reducible_index = is_patch.long().cumsum(0) - 1  # packed offset -> index among the patch tokens
            source_index = torch.where(slot_of_flat >= 0, reducible_index[slot_of_flat.clamp(min=0)], -1)
            encoded.append(EncodedImage(tokens, signals, int(packed.numel()), self._project, offsets_of,
                                        self._packed_layout(is_patch, newline), int(is_patch.sum()),
                                        lambda positions, o=offsets_of, r=reducible_index: r.to(positions.device)[o(positions)],
                                        view=self._anyres_view(pixel_values[image_index][:count], image_sizes[image_index],
                                                               packed[is_patch], side),
                                        source_index=source_index))
            start += count
        return encoded

    def _anyres_view(self, crops: torch.Tensor, image_size, flat_of_token: torch.Tensor, side: int) -> Callable:
        """The picture of one anyres image: its base view, then (after a gap) its tiles in their grid. flat_of_token:
        per reducible token, crop * side^2 + row * side + column."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        crop_size = crops.shape[-1]
        _, columns = get_anyres_image_grid_shape(image_size.tolist(), self.model.config.image_grid_pinpoints, crop_size)
        gap = max(crop_size // 8, 2)

        def view():
            pictures = [unnormalised(crop, self.processor.image_processor) for crop in crops]
            rows = (len(pictures) - 2) // columns + 1  # tiles after the base view, columns to a row
            canvas = torch.zeros(max(crop_size, rows * crop_size), crop_size + gap + columns * crop_size, 3, dtype=torch.uint8)
            corners = [(0, 0)] + [((tile // columns) * crop_size, crop_size + gap + (tile % columns) * crop_size)
                                  for tile in range(len(pictures) - 1)]
            for picture, (top, left) in zip(pictures, corners):
                canvas[top : top + crop_size, left : left + crop_size] = picture
            cell = crop_size // side
            crop, within = flat_of_token.cpu() // (side * side), flat_of_token.cpu() % (side * side)
            corner = torch.tensor(corners)[crop]  # [N, 2] (top, left)
            y0, x0 = corner[:, 0] + (within // side) * cell, corner[:, 1] + (within % side) * cell
            return canvas, torch.stack([x0, y0, x0 + cell, y0 + cell], dim=1)

        return view

    @staticmethod
    def _packed_offsets(slot_of_flat, per_crop, side):
        def offsets(positions):
            flat = positions[..., 0] * per_crop + positions[..., 1] * side + positions[..., 2]
            return slot_of_flat.to(flat.device)[flat]

        return offsets

    @staticmethod
    def _packed_layout(is_patch, newline):
        newline_offsets = torch.nonzero(~is_patch).squeeze(1)

        def layout(features, offsets):
            extra = newline_offsets.to(offsets.device)
            if offsets.dim() == 2:  # several positions per token: a newline repeats its own
                extra = extra[:, None].expand(-1, offsets.shape[1])
            rows = torch.cat([features, newline[None].to(features).expand(len(extra), -1)])
            every = torch.cat([offsets, extra])
            order = torch.argsort(every[:, 0] if every.dim() == 2 else every, stable=True)
            slot = torch.empty_like(order)
            slot[order] = torch.arange(len(order), device=order.device)
            return rows[order], every[order], slot[: len(features)]

        return layout


class QwenVLAdapter(Adapter):
    """Qwen2-VL / Qwen2.5-VL: ViT with a 2x2 patch merger (the projector) and M-RoPE positions (t, h, w).

    Pre-projector tokens are merge units (4 patches concatenated); post-projector tokens are the merger outputs.
    Positions are TRUE (t, h, w) in the merged grid, also after encoder-site pruning. Kept tokens keep their M-RoPE ids
    (P-keep); contiguous renumbering is not defined for M-RoPE and is refused.
    """

    family = "qwen2-vl"
    default_policy = PositionPolicy.KEEP
    supported_policies = (PositionPolicy.KEEP, PositionPolicy.MULTI)
    supports_video = True

    def __init__(self, model, processor):
        super().__init__(model, processor)
        self._vision = QwenViTEncoder(model.model.visual)
        self.feature_layer = -1

    @property
    def vision(self):
        return self._vision

    def _project(self, units: torch.Tensor) -> torch.Tensor:
        merger = self.model.model.visual.merger
        width = units.shape[-1] // self.vision.merge ** 2
        return merger(units.reshape(-1, width))

    def encode_images(self, batch, request, encoder_stages=(), requests=None, records=None):
        """Images and videos (a video is one item: its (t, h, w) grid of merged tokens), in the order they appear in
        the batch's sequences, which is the order assembly fills placeholder spans in."""
        pieces = {}
        for kind, pixels_key, grid_key in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw")):
            grid_thw = batch.get(grid_key)
            pieces[kind] = [] if grid_thw is None else self._encode_grids(batch[pixels_key], grid_thw)
        order = _sequence_order(batch["input_ids"], {"image": self.image_token_id, "video": self.video_token_id},
                                {kind: [item[0] for item in items] for kind, items in pieces.items()})
        encoded = []
        for kind, number in order:
            pixels, grid_thw = pieces[kind][number][1:]
            encoded.append(self._encode_one(pixels, grid_thw, request, encoder_stages, requests, records, len(encoded),
                                            () if kind == "image" else (self.video_token_id,)))
        return encoded

    def _encode_grids(self, pixel_values, grid_thw):
        """Per item: (placeholders, its patch rows, grid_thw [1, 3])."""
        items, start = [], 0
        for row in range(len(grid_thw)):
            count = int(grid_thw[row].prod())
            items.append((count // self.vision.merge ** 2, pixel_values[start : start + count], grid_thw[row : row + 1]))
            start += count
        return items

    def _encode_one(self, pixels, grid_thw, request, encoder_stages, requests, records, item, token_ids):
        t, h, w = grid_thw[0].tolist()
        merged_grid = (t, h // self.vision.merge, w // self.vision.merge)
        hooks, site_hook, last_units = (), None, {}
        if encoder_stages:
            site_hook = EncoderSiteHook(encoder_stages, requests, grid_positions(*merged_grid, device=grid_thw.device),
                                        False, item, records)

            def recording(state):
                result = site_hook(state)
                if result is not None:
                    last_units["units"] = result.patch_index[0]
                return result

            hooks = (recording,)
        out = self.vision.encode_image(pixels, grid_thw, request, hooks)
        positions = out.grid
        if site_hook is not None and site_hook.positions is not None:
            # The stages' positions follow the encoder's unit order (window order on Qwen2.5-VL); the tokens come out
            # in merged-raster order, i.e. sorted by unit id. TRUE positions unless a stage says otherwise.
            positions = site_hook.positions[torch.argsort(last_units["units"]).to(site_hook.positions.device)]
        tokens = ImageTokens(out.tokens[0], positions, project=self._project)
        units = t * merged_grid[1] * merged_grid[2]
        offsets = _raster_offsets(merged_grid)
        return EncodedImage(tokens, _per_image_signals(out.signals, 0), units, self._project, offsets, _in_order, units, offsets,
                            token_ids, view=None if token_ids else self._patches_view(pixels, grid_thw[0].tolist()))

    def _patches_view(self, patches: torch.Tensor, grid_thw: list) -> Callable:
        """The picture of one image from the processor's flattened patches [t*h*w, C * temporal * p * p], which it lays
        out merge unit by merge unit (t, h/m, w/m, m, m, C, temporal, p, p); one reducible token is one merge unit."""
        t, h, w = grid_thw
        processor = self.processor.image_processor
        merge, temporal, patch = self.vision.merge, processor.temporal_patch_size, processor.patch_size

        def view():
            grid = patches.reshape(t, h // merge, w // merge, merge, merge, 3, temporal, patch, patch)
            frames = grid.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t * temporal, 3, h * patch, w * patch)
            cell = merge * patch
            return unnormalised(frames[0], processor), cell_boxes(h // merge, w // merge, cell, cell)

        return view

    @property
    def video_token_id(self):
        return int(self.model.config.video_token_id)

    def reference_positions(self, batch):
        extra = {"second_per_grid_ts": batch["second_per_grid_ts"]} if "second_per_grid_ts" in batch else {}
        positions, _ = self.model.model.get_rope_index(
            batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch.get("image_grid_thw"),
            video_grid_thw=batch.get("video_grid_thw"), attention_mask=batch["attention_mask"], **extra,
        )
        return positions

    def llm_position_ids(self, positions, attention_mask):
        # Row 0 is the plain text position transformers uses to build the mask; rows 1..3 are the M-RoPE ids.
        text_row = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return torch.cat([text_row[None], positions], dim=0)


def _sequence_order(input_ids, token_ids: dict, sizes: dict, also: dict | None = None) -> list:
    """(kind, number within its kind) of every item, in the order their placeholder runs appear in the batch: a run of
    one kind's token is that kind's next items, `sizes[kind][number]` placeholders each (counting the `also[kind]`
    tokens interleaved with them: a video's audio)."""
    cursor = {kind: 0 for kind in token_ids}
    also = also or {}
    order = []
    for row in input_ids:
        ids = row.tolist()
        position = 0
        while position < len(ids):
            kind = next((k for k, token in token_ids.items() if ids[position] == token), None)
            if kind is None:
                position += 1
                continue
            if cursor[kind] >= len(sizes[kind]):
                raise InputError(f"the prompts hold more {kind} placeholders than the {len(sizes[kind])} {kind}(s) given fill")
            order.append((kind, cursor[kind]))
            members, remaining = {token_ids[kind], also.get(kind)}, sizes[kind][cursor[kind]]
            while remaining and position < len(ids):
                remaining -= ids[position] in members
                position += 1
            cursor[kind] += 1
    for kind, count in cursor.items():
        if count != len(sizes[kind]):
            raise InputError(f"the prompts hold placeholders for {count} {kind}(s) but {len(sizes[kind])} were given")
    return order


AUDIO_FRAMES_PER_SECOND = 50  # Qwen2.5-Omni's audio encoder frames after its convolutions
AUDIO_WINDOW_SECONDS = 2  # SEATS' sec_in_audio_window: the window of the audio window_attention signal


class QwenOmniThinkerAdapter(QwenVLAdapter):
    """Qwen2.5-Omni's thinker: Qwen2.5-VL's ViT and merger, a Whisper-like audio encoder, an M-RoPE LLM with TMRoPE.

    A video with an audio track is one item: its video and audio tokens interleaved per 2-second chunk, as the
    processor lays them out (`use_audio_in_video`). Its tokens reach the sites already in LLM width (video after the
    merger, audio after the audio encoder's projection), in sequence order; positions are (t, h, w) in the merged
    video grid for video tokens and (j, -1, -1) for the j-th audio token. A video without audio is a plain video item.
    The window_attention signal covers both: the ViT's last block for video, the audio encoder's last layer (windows
    of 2 s, pooled over frame pairs as the encoder pools) for audio.
    Encoder-site stages are not supported on Omni models yet.
    """

    family = "qwen2.5-omni"
    reads_audio = True

    def process(self, texts, images, videos=()):
        heard = [audio is not None for _, audio, _ in videos]
        if any(heard) and not all(heard):
            raise InputError("in one batch, either every video has an audio track or none has (use_audio_in_video is one "
                             "setting per batch in transformers); run them in separate batches")
        kwargs = self._processor_kwargs(texts, images, videos)
        if any(heard):
            kwargs.update(audio=[audio for _, audio, _ in videos], audio_from_video_indices=list(range(len(videos))),
                          load_audio_from_video=True)
        self.tokenizer.padding_side = "left"
        batch = self.processor(**kwargs)
        batch["use_audio_in_video"] = any(heard)
        return batch

    @property
    def audio_token_id(self):
        return int(self.model.config.audio_token_id)

    def encode_images(self, batch, request, encoder_stages=(), requests=None, records=None):
        if encoder_stages:
            raise InputError("encoder-site reducers are not supported on Qwen2.5-Omni models yet")
        interleaved = bool(batch.get("use_audio_in_video"))
        audio = self._audio_features(batch, WINDOW_ATTENTION in request.layers) if interleaved else []
        pieces = {}
        for kind, pixels_key, grid_key in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw")):
            grid_thw = batch.get(grid_key)
            pieces[kind] = [] if grid_thw is None else self._encode_grids(batch[pixels_key], grid_thw)
        sizes = {"image": [item[0] for item in pieces["image"]],
                 "video": [item[0] + (len(audio[n][0]) if interleaved else 0) for n, item in enumerate(pieces["video"])]}
        ids = {"image": self.image_token_id, "video": self.video_token_id}
        order = _sequence_order(batch["input_ids"], ids, sizes, also={"video": self.audio_token_id} if interleaved else None)
        encoded, spans = [], self._video_spans(batch["input_ids"]) if interleaved else None
        for kind, number in order:
            pixels, grid_thw = pieces[kind][number][1:]
            if kind == "video" and interleaved:
                encoded.append(self._encode_interleaved(pixels, grid_thw, *audio[number], spans[number], request))
            else:
                encoded.append(self._encode_one(pixels, grid_thw, request, (), requests, records, len(encoded),
                                                () if kind == "image" else (self.video_token_id,)))
        return encoded

    def _audio_features(self, batch, window_attention: bool) -> list:
        """Per audio track (= per video, in order): (its LLM-width tokens [n, d], and when asked the attention each
        token received inside its 2-second window of the audio encoder's last layer [n], else None)."""
        thinker = self.model.model
        tower = thinker.audio_tower
        captured = {}
        last = tower.layers[-1].self_attn
        handle = last.register_forward_pre_hook(
            lambda module, args, kwargs: captured.update(hidden=args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
        try:
            features = thinker.get_audio_features(batch["input_features"], batch["feature_attention_mask"], return_dict=True)
        finally:
            handle.remove()
        frames, lengths = tower._get_feat_extract_output_lengths(batch["feature_attention_mask"].sum(-1))
        tokens = torch.split(features.last_hidden_state, lengths.tolist())
        if not window_attention:
            return [(track, None) for track in tokens]
        hidden = captured["hidden"]
        heads = last.num_heads
        query = last.q_proj(hidden).reshape(len(hidden), heads, -1).transpose(0, 1)
        keys = last.k_proj(hidden).reshape(len(hidden), heads, -1).transpose(0, 1)
        out, start = [], 0
        for track, count, pooled in zip(tokens, frames.tolist(), lengths.tolist()):
            window = AUDIO_WINDOW_SECONDS * AUDIO_FRAMES_PER_SECOND
            bounds = [(s, min(s + window, count)) for s in range(0, count, window)]
            received = window_attention_received(query[:, start:start + count], keys[:, start:start + count], bounds, last.scaling)
            # The encoder pools frame pairs into one token (50 -> 25 per second); the statistic follows.
            out.append((track, received[: 2 * pooled].view(pooled, 2).mean(-1)))
            start += count
        return out

    def _video_spans(self, input_ids) -> list:
        """Per video with audio, in batch order: is_video [n] over its interleaved placeholders, in sequence order."""
        spans = []
        for row in input_ids:
            starts = torch.nonzero(row == int(self.model.config.audio_start_token_id)).squeeze(1)
            ends = torch.nonzero(row == int(self.model.config.audio_end_token_id)).squeeze(1)
            for start, end in zip(starts.tolist(), ends.tolist()):
                spans.append(row[start + 1 : end] == self.video_token_id)
        return spans

    def _encode_interleaved(self, pixels, grid_thw, audio, audio_attention, is_video, request):
        t, h, w = grid_thw[0].tolist()
        merged = (t, h // self.vision.merge, w // self.vision.merge)
        out = self.vision.encode_image(pixels, grid_thw, request, ())
        video = self._project(out.tokens[0])
        n = len(is_video)
        features = video.new_zeros(n, video.shape[-1])
        features[is_video] = video
        features[~is_video] = audio.to(video.dtype)
        positions = torch.full((n, 3), -1, dtype=torch.long, device=video.device)
        positions[is_video] = out.grid.to(video.device)
        positions[~is_video, 0] = torch.arange(len(audio), device=video.device)
        video_offset = torch.full((merged[0] * merged[1] * merged[2],), -1, dtype=torch.long, device=video.device)
        video_offset[_raster_offsets(merged)(out.grid.to(video.device))] = torch.nonzero(is_video).squeeze(1)
        audio_offset = torch.nonzero(~is_video).squeeze(1)

        def offsets(where):
            heard = where[..., 1] < 0
            raster = _raster_offsets(merged)(where.clamp(min=0))
            return torch.where(heard, audio_offset.to(where.device)[where[..., 0].clamp(max=len(audio_offset) - 1)],
                               video_offset.to(where.device)[raster.clamp(max=len(video_offset) - 1)])

        # Vision signals cover the video tokens; audio tokens hold the audio encoder's window attention for that
        # signal and NaN (no statistic) for the others.
        signals = {}
        for name, by_layer in out.signals.items():
            for layer, value in by_layer.items():
                spread = torch.full((n, *value.shape[2:]), float("nan"), dtype=torch.float32, device=video.device)
                spread[is_video] = value[0].float()
                if name == WINDOW_ATTENTION and audio_attention is not None:
                    spread[~is_video] = audio_attention.to(video.device)
                signals.setdefault(name, {})[layer] = spread
        tokens = ImageTokens(features, positions, project=lambda x: x)
        return EncodedImage(tokens, VisionSignals(signals), n, lambda x: x, offsets, _in_order, n, offsets,
                            (self.video_token_id, self.audio_token_id))

    def reference_positions(self, batch):
        lengths = batch["feature_attention_mask"].sum(-1) if "feature_attention_mask" in batch else None
        positions, _ = self.model.model.get_rope_index(
            batch["input_ids"], batch.get("image_grid_thw"), batch.get("video_grid_thw"), batch["attention_mask"],
            bool(batch.get("use_audio_in_video")), lengths, batch.get("video_second_per_grid"),
        )
        return positions


class ComposedAdapter(LlavaAdapter):
    """tokenomy's composed model: any timm / open_clip / transformers tower + MLP projector + any causal LM."""

    family = "composed"

    def __init__(self, model, processor):
        Adapter.__init__(self, model, processor)
        self._vision = model.vision_encoder
        self.feature_layer = self._checked_feature_layer(model.config.vision_feature_layer)
        self.projector = model.multi_modal_projector

    def _project(self, features):
        return self.projector(features.to(self.projector.linear_1.weight.dtype))

    @property
    def language_model(self):
        return self.model.language_model.get_decoder()


ADAPTERS = {
    "ComposedVLMForConditionalGeneration": ComposedAdapter,
    "LlavaForConditionalGeneration": LlavaAdapter,
    "LlavaNextForConditionalGeneration": LlavaNextAdapter,
    "Qwen2VLForConditionalGeneration": QwenVLAdapter,
    "Qwen2_5_VLForConditionalGeneration": QwenVLAdapter,
    "Qwen2_5OmniThinkerForConditionalGeneration": QwenOmniThinkerAdapter,
}


def adapter_for(model, processor) -> Adapter:
    name = type(model).__name__
    if name not in ADAPTERS:
        raise ModelLoadError(f"model class {name} is not supported; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name](model, processor)
