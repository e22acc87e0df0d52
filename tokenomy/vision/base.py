"""One interface over vision encoders: run layer by layer, hook between layers, compute only requested signals.

Signals are attention *rows* (CLS -> patches, mean query -> patches) and head-averaged value vectors, computed from
the layer's own q/k/v projections (reducers.md §0.2). The encoder's attention itself keeps running through SDPA or
FlashAttention; no full attention map is ever built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from tokenomy.errors import InputError
from tokenomy.ops.attention import attention_row  # noqa: F401  re-exported: tokenomy.vision.attention_row

# Signal names, shared by encoders and reducers.
CLS_ATTENTION = "cls_attention"  # [B, N] head-averaged softmax row of the CLS query over all tokens, patch part
MEAN_QUERY_ATTENTION = "mean_query_attention"  # [B, N] same with the mean of all queries as the query
VALUES = "values"  # [B, N, head_dim] head-averaged value vectors of the patches
CLS_VALUE_SIMILARITY = "cls_value_similarity"  # [B, N] head-averaged softmax(v_cls . v_j) row (FlowCut), patch part
WINDOW_ATTENTION = "window_attention"  # [B, N] attention each patch receives inside its window of 2 frames (SEATS I)
KEYS = "keys"  # [B, N, head_dim] head-averaged key vectors of the patches (VisionZip, PruMerge+, ToMe's merge metric)
CLS_OR_MEAN_ATTENTION = "cls_or_mean_attention"  # the CLS row on towers with a CLS token, else the mean-query row
SIGNAL_NAMES = (CLS_ATTENTION, MEAN_QUERY_ATTENTION, VALUES, CLS_VALUE_SIMILARITY, WINDOW_ATTENTION, KEYS, CLS_OR_MEAN_ATTENTION)


@dataclass(frozen=True)
class SignalRequest:
    """Which signals a reducer needs, by encoder layer index (0-based; negative counts from the end)."""

    layers: dict = field(default_factory=dict)  # signal name -> tuple of layer indices

    @staticmethod
    def of(**by_signal) -> "SignalRequest":
        unknown = set(by_signal) - set(SIGNAL_NAMES)
        if unknown:
            raise InputError(f"unknown vision signal(s) {sorted(unknown)}; known: {list(SIGNAL_NAMES)}")
        return SignalRequest({name: tuple(layers) for name, layers in by_signal.items() if layers})

    def merged(self, other: "SignalRequest") -> "SignalRequest":
        names = set(self.layers) | set(other.layers)
        return SignalRequest({n: tuple(sorted(set(self.layers.get(n, ())) | set(other.layers.get(n, ())))) for n in names})

    def resolve(self, num_layers: int) -> dict:
        """Signal name -> set of non-negative layer indices."""
        out = {}
        for name, layers in self.layers.items():
            resolved = set()
            for layer in layers:
                index = layer + num_layers if layer < 0 else layer
                if not 0 <= index < num_layers:
                    raise InputError(f"signal {name!r} asked for encoder layer {layer}, but the encoder has {num_layers} layers")
                resolved.add(index)
            out[name] = resolved
        return out

    def __bool__(self) -> bool:
        return bool(self.layers)


@dataclass
class EncoderState:
    """What a between-layer hook sees after encoder layer `layer` ran.

    `hidden` holds the layer output including the CLS token at index 0 when the encoder has one. `patch_index`
    [B, N] gives, for each current patch token, its index among the original patches, so a hook that drops or merges
    tokens keeps positions traceable. `signals` holds this layer's requested signals (computed on its input).
    """

    layer: int
    hidden: torch.Tensor
    patch_index: torch.Tensor
    signals: dict
    sources: Optional[torch.Tensor] = None  # [B, N, N0]: how much of each original patch a current token holds


LayerHook = Callable[[EncoderState], Optional[EncoderState]]


@dataclass
class VisionOutput:
    """Patch tokens of the feature layer and the signals asked for.

    tokens: [B, N, D] patch tokens (CLS removed); cls: [B, D] or None; grid: [N, 3] (t, h, w) of each patch in the
    original grid (after hooks, the grid rows of the surviving patches, per sample: [B, N, 3]); signals: name ->
    {layer: tensor}; patch_index: [B, N] original index of each returned patch.
    """

    tokens: torch.Tensor
    cls: Optional[torch.Tensor]
    grid: torch.Tensor
    patch_index: torch.Tensor
    signals: dict
    sources: Optional[torch.Tensor] = None  # [B, N, N0] when a hook merged tokens


def layers_to_run(feature_layer, num_layers: int) -> int:
    """How many encoder layers produce transformers' `hidden_states[feature_layer]` (0 is the embedding output)."""
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
        raise InputError(f"vision_feature_layer must be an integer, got {feature_layer!r}")
    count = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 0 <= count <= num_layers:
        raise InputError(
            f"vision_feature_layer {feature_layer} is outside hidden_states[0..{num_layers}] of this {num_layers}-layer encoder"
        )
    return count


def grid_positions(t: int, h: int, w: int, device=None) -> torch.Tensor:
    """(t, h, w) coordinates of a raster-ordered t*h*w grid, shape [t*h*w, 3]."""
    tt, hh, ww = torch.meshgrid(
        torch.arange(t, device=device), torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    return torch.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)], dim=-1)


class VisionEncoder:
    """Base of the encoder wrappers. Subclasses implement `_embed`, `_layers`, `_qkv` and `_run_layer`."""

    has_cls: bool = True
    # Whether encoder-site stages may merge tokens between layers (Qwen's ViT keeps its 2x2 merge units whole).
    takes_encoder_merges: bool = True
    has_frames: bool = False  # whether patches belong to video frames (the window_attention signal)

    @property
    def num_layers(self) -> int:
        return len(self._layers())

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels -> the input of layer 0, [B, T, D] (CLS first when `has_cls`)."""
        raise NotImplementedError

    def _layers(self):
        raise NotImplementedError

    def _qkv(self, layer_index: int, hidden: torch.Tensor):
        """The layer's q, k, v as [B, H, T, d] exactly as its attention sees them, and the logit scale."""
        raise NotImplementedError

    def _run_layer(self, layer_index: int, hidden: torch.Tensor) -> torch.Tensor:
        return self._layers()[layer_index](hidden)

    def _patch_grid(self, pixel_values: torch.Tensor) -> tuple:
        """(t, h, w) of the patch grid for these pixels."""
        raise NotImplementedError

    def _finish(self, hidden: torch.Tensor, feature_layer: int) -> torch.Tensor:
        """Post-processing applied to the feature layer's output (e.g. a final norm when the last layer is used)."""
        return hidden

    def _run_layer_capturing(self, layer_index: int, hidden: torch.Tensor):
        """Run the layer and return (output, its attention's (q, k, v, scale)), or None where the encoder cannot
        capture them (the signals then recompute q/k/v with `_qkv`)."""
        return None

    def _signals(self, layer_index: int, hidden: torch.Tensor, wanted: set) -> dict:
        return self._signals_from(*self._qkv(layer_index, hidden), wanted)

    def _signals_from(self, q, k, v, scale, wanted: set) -> dict:
        first = 1 if self.has_cls else 0
        out = {}
        if CLS_ATTENTION in wanted:
            if not self.has_cls:
                raise InputError(f"{type(self).__name__} has no CLS token; ask for {MEAN_QUERY_ATTENTION!r} instead")
            out[CLS_ATTENTION] = attention_row(q[:, :, 0], k, scale)[:, first:]
        if CLS_VALUE_SIMILARITY in wanted:
            if not self.has_cls:
                raise InputError(f"{type(self).__name__} has no CLS token for {CLS_VALUE_SIMILARITY!r}")
            out[CLS_VALUE_SIMILARITY] = attention_row(v[:, :, 0], v, 1.0)[:, first:]
        if MEAN_QUERY_ATTENTION in wanted:
            out[MEAN_QUERY_ATTENTION] = attention_row(q.mean(dim=2), k, scale)[:, first:]
        if CLS_OR_MEAN_ATTENTION in wanted:
            query = q[:, :, 0] if self.has_cls else q.mean(dim=2)
            out[CLS_OR_MEAN_ATTENTION] = attention_row(query, k, scale)[:, first:]
        if VALUES in wanted:
            out[VALUES] = v[:, :, first:].float().mean(dim=1)
        if WINDOW_ATTENTION in wanted and not self.has_frames:
            raise InputError(f"{type(self).__name__} has no frames to window; {WINDOW_ATTENTION!r} needs a Qwen ViT")
        if KEYS in wanted:
            out[KEYS] = k[:, :, first:].float().mean(dim=1)
        return out

    @torch.no_grad()
    def encode(
        self,
        pixel_values: torch.Tensor,
        feature_layer: int = -1,
        request: SignalRequest = SignalRequest(),
        hooks: tuple = (),
        run_layers: Optional[int] = None,
    ) -> VisionOutput:
        """Run layers 0..feature_layer and return that layer's output patches plus the requested signals.

        `run_layers` (0..num_layers), when given, says how many layers run instead (transformers' hidden_states index);
        a list of counts concatenates those hidden states along the features, as transformers does for a list-valued
        `vision_feature_layer`.
        """
        num_layers = self.num_layers
        if isinstance(run_layers, (list, tuple)):
            return self._encode_concatenated(pixel_values, list(run_layers), request, hooks)
        if run_layers is None:
            last = feature_layer + num_layers if feature_layer < 0 else feature_layer
            if not 0 <= last < num_layers:
                raise InputError(f"feature_layer {feature_layer} is outside the encoder's {num_layers} layers")
            run_layers = last + 1
        wanted_by_layer = request.resolve(num_layers)
        hidden = self._embed(pixel_values)
        batch = hidden.shape[0]
        t, h, w = self._patch_grid(pixel_values)
        grid = grid_positions(t, h, w, device=hidden.device)
        patch_index = torch.arange(t * h * w, device=hidden.device).expand(batch, -1)
        sources = None
        signals = {name: {} for name in wanted_by_layer}
        for index in range(run_layers):
            wanted = {name for name, layers in wanted_by_layer.items() if index in layers}
            captured = self._run_layer_capturing(index, hidden) if wanted else None
            if captured is not None:
                hidden, qkv = captured
                layer_signals = self._signals_from(*qkv, wanted)
            else:
                layer_signals = self._signals(index, hidden, wanted) if wanted else {}
                hidden = self._run_layer(index, hidden)
            for name, value in layer_signals.items():
                signals[name][index] = (value, patch_index)
            for hook in hooks:
                state = hook(EncoderState(index, hidden, patch_index, layer_signals, sources))
                if state is not None:
                    hidden, patch_index, sources = state.hidden, state.patch_index, state.sources
        # Signals of the layer after the last one run read its input, the feature layer's output, without running it
        # (PruMerge+ scores LLaVA's layer-22 tokens with layer 23's q/k).
        wanted = {name for name, layers in wanted_by_layer.items() if run_layers in layers}
        if wanted:
            for name, value in self._signals(run_layers, hidden, wanted).items():
                signals[name][run_layers] = (value, patch_index)
        hidden = self._finish(hidden, run_layers - 1)
        first = 1 if self.has_cls else 0
        pruned = patch_index.shape[1] != t * h * w or sources is not None
        return VisionOutput(
            tokens=hidden[:, first:],
            cls=hidden[:, 0] if self.has_cls else None,
            grid=grid[patch_index] if pruned else grid,
            patch_index=patch_index,
            signals={name: {layer: _follow(value, at, patch_index) for layer, (value, at) in by_layer.items()}
                     for name, by_layer in signals.items()},
            sources=sources,
        )


    def _encode_concatenated(self, pixel_values, counts: list, request, hooks) -> VisionOutput:
        if hooks:
            raise InputError("encoder-site reducers cannot run with a list-valued vision_feature_layer")
        collected = {}

        def collect(state: EncoderState):
            if state.layer + 1 in counts:
                collected[state.layer + 1] = self._finish(state.hidden, state.layer)
            return None

        out = self.encode(pixel_values, request=request, hooks=(collect,), run_layers=max(counts))
        if 0 in counts:
            collected[0] = self._embed(pixel_values)
        first = 1 if self.has_cls else 0
        out.tokens = torch.cat([collected[count][:, first:] for count in counts], dim=-1)
        return out


def _follow(value: torch.Tensor, index_then: torch.Tensor, index_now: torch.Tensor) -> torch.Tensor:
    """A per-token signal taken when the tokens were `index_then` [B, N], gathered to the tokens `index_now` [B, N']."""
    if index_then.shape == index_now.shape and torch.equal(index_then, index_now):
        return value
    lookup = torch.full((index_then.shape[0], int(index_then.max()) + 1), -1, dtype=torch.long, device=value.device)
    lookup.scatter_(1, index_then, torch.arange(index_then.shape[1], device=value.device).expand_as(index_then).contiguous())
    slots = lookup.gather(1, index_now)
    expand = slots.view(*slots.shape, *([1] * (value.dim() - 2))).expand(*slots.shape, *value.shape[2:])
    return value.gather(1, expand)
