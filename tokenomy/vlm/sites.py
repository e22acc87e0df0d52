"""Running a plan's stages at the vision sites: between encoder layers, before and after the projector.

Reducers stay model-agnostic: here their `Selection`s are applied to one image's tokens (features, TRUE positions,
the sources each token holds, the signals asked for), and every step is recorded for the stats.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenomy.errors import InputError
from tokenomy.eval.efficiency import Timer
from tokenomy.reducers.base import ImageTokens, Selection, Site
from tokenomy.vision.base import EncoderState, SignalRequest


@dataclass
class StageRecord:
    """What one stage did in one request: per image, the (layer, tokens in, tokens out) of each of its steps."""

    reducer: str
    site: Site
    steps: dict = field(default_factory=dict)  # image index -> list of (layer, tokens in, tokens out)
    seconds: float = 0.0

    def add(self, image: int, layer, tokens_in: int, tokens_out: int) -> None:
        self.steps.setdefault(image, []).append((layer, tokens_in, tokens_out))

    def summary(self, images: list) -> dict:
        steps = [step for image in images for step in self.steps.get(image, [])]
        layers = sorted({layer for layer, _, _ in steps if layer is not None})
        first = {image: self.steps[image][0][1] for image in images if image in self.steps}
        last = {image: self.steps[image][-1][2] for image in images if image in self.steps}
        return dict(
            reducer=self.reducer, site=self.site.value, layers=layers,
            tokens_in=sum(first.values()), tokens_out=sum(last.values()), ms=self.seconds * 1e3,
        )


class Timed(Timer):
    """The project's Timer (CUDA events on a GPU), adding each block's time to a stage's record."""

    def __init__(self, record: StageRecord, device):
        super().__init__(device)
        self.record = record

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.record.seconds += self.ms / 1e3
        return False


def select_checked(stage, tokens: ImageTokens) -> Selection:
    return stage.select(tokens).check(tokens, stage.name)


def apply_selection(tokens: ImageTokens, selection: Selection) -> ImageTokens:
    """The image's tokens after a selection: gathered or merged features, the selection's positions, and sources
    summed over merged members. Signals are not carried (a stage gets its own; see `VisionSignals`)."""
    return ImageTokens(
        features=selection.apply(tokens.features),
        positions=selection.positions,
        sources=selection.apply_sources(tokens.source_matrix()),
        layer=tokens.layer,
        project=tokens.project,
        context=tokens.context,
    )


class VisionSignals:
    """One image's encoder signals, {name: {layer: [N, ...]}}, kept aligned with its tokens as stages select."""

    def __init__(self, by_layer: dict):
        self.by_layer = by_layer

    def for_stage(self, request: SignalRequest, num_layers: int) -> dict:
        """{name: [n_layers, N, ...]} of the layers the stage asked for, ascending."""
        out = {}
        for name, layers in request.resolve(num_layers).items():
            missing = [layer for layer in layers if layer not in self.by_layer.get(name, {})]
            if missing:
                raise InputError(f"signal {name!r} of encoder layer(s) {sorted(missing)} was not computed (those layers did not run)")
            out[name] = torch.stack([self.by_layer[name][layer] for layer in sorted(layers)])
        return out

    def follow(self, selection: Selection) -> None:
        for layers in self.by_layer.values():
            for layer, value in layers.items():
                layers[layer] = value[selection.kept.to(value.device)]


def run_vision_stages(stages: list, tokens: ImageTokens, signals: VisionSignals, num_layers: int, feature_layer: int,
                      image: int, records: dict) -> ImageTokens:
    """Apply pre- or post-projector stages in order to one image's tokens."""
    for stage in stages:
        record = records[id(stage)]
        with Timed(record, tokens.features.device):
            view = ImageTokens(tokens.features, tokens.positions, signals.for_stage(stage.vision_request(num_layers, feature_layer), num_layers),
                               tokens.sources, tokens.layer, tokens.project, tokens.context)
            selection = select_checked(stage, view)
            record.add(image, None, tokens.num_tokens, selection.num_kept)
            tokens = apply_selection(tokens, selection)
            signals.follow(selection)
    return tokens


class EncoderSiteHook:
    """Between encoder layers: runs the encoder-site stages of a plan on one image (the encoder runs one image at a
    time when a plan has such stages, so a sample's result never depends on its batch).

    `grid` [N0, 3] gives the TRUE (t, h, w) of each original token; tokens carry `sources` [N, N0] through merges,
    and a merged token takes the position and patch index of its kept slot.
    """

    def __init__(self, stages: list, requests: dict, grid: torch.Tensor, has_cls: bool, image: int, records: dict):
        self.stages, self.requests, self.grid = stages, requests, grid
        self.first = 1 if has_cls else 0
        self.image, self.records = image, records
        self.positions = None  # [N, 3] or [N, m, 3] of the current tokens once a stage has selected

    def __call__(self, state: EncoderState):
        acting = [stage for stage in self.stages if state.layer in self.requests[id(stage)]["layers"]]
        if not acting:
            return None
        if state.hidden.shape[0] != 1:
            raise InputError("encoder-site stages run on one image at a time")
        hidden, patch_index, sources = state.hidden[0], state.patch_index[0], state.sources
        cls, patches = hidden[: self.first], hidden[self.first :]
        positions = self.positions if self.positions is not None else self.grid[patch_index]
        for stage in acting:
            wanted = self.requests[id(stage)]["signals"].get(state.layer, ())
            signals = {name: state.signals[name][0][None] for name in wanted if name in state.signals}
            tokens = ImageTokens(patches, positions, signals, sources[0] if sources is not None else None, state.layer)
            record = self.records[id(stage)]
            with Timed(record, patches.device):
                selection = select_checked(stage, tokens)
                record.add(self.image, state.layer, tokens.num_tokens, selection.num_kept)
                patches = selection.apply(patches)
                if selection.merge_index is not None or sources is not None:
                    sources = selection.apply_sources(tokens.source_matrix())[None]
                patch_index = patch_index[selection.kept.to(patch_index.device)]
                positions = selection.positions
        self.positions = positions
        return EncoderState(state.layer, torch.cat([cls, patches])[None], patch_index[None], state.signals, sources)


def encoder_requests(stages: list, num_layers: int, layers_run: int) -> dict:
    """Per encoder-site stage: the layers it acts after, and the signals it asked for by layer; checked against the
    layers that run."""
    out = {}
    for stage in stages:
        layers = tuple(stage.encoder_layers(num_layers, layers_run - 1))
        for layer in layers:
            if not 0 <= layer < layers_run:
                raise InputError(
                    f"{stage.name} acts after encoder layer {layer}, but only layers 0..{layers_run - 1} run for the feature layer"
                )
        resolved = stage.vision_request(num_layers, layers_run - 1).resolve(num_layers)
        by_layer = {}
        for name, at in resolved.items():
            for layer in at:
                by_layer.setdefault(layer, []).append(name)
        out[id(stage)] = dict(layers=set(layers), signals=by_layer)
    return out


def union_request(requests) -> SignalRequest:
    total = SignalRequest()
    for request in requests:
        total = total.merged(request)
    return total
