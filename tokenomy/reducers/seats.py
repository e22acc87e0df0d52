"""SEATS (reducers.md §5): stage-adaptive selection of audio and video tokens for omni-modal LLMs, as pure tensor code.

- Stage I, before the LLM: per temporal window of one modality, greedy max-min diversity on the LLM-input embeddings
  weighted by the attention each token received inside its window in the encoder's last layer (the `window_attention`
  vision signal, tokenomy.ops.window_attention; `window_diversity_keep`).
- Stage II, at scheduled LLM layers: the last text token's attention row ranks the tokens; budgets go to windows by
  softmax(tau) over window means, then split between video and audio (`inner_llm_keep`).
- Stage III, before the late block: every audio and video token goes (`text_only_keep`).
- The block-wise retention scheduler (`retention_schedule`) picks Stage II's keep ratios so that the layer-averaged
  retention of each modality equals its target.

Budgets count tokens as layer-averaged retention (a token kept for half the layers counts half), not tokens entering
the LLM; see `RetentionSchedule.layer_retention`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokenomy.errors import InputError
from tokenomy.ops.diversity import cosine_distance, max_min_diversity
from tokenomy.reducers.base import LAST_TEXT_ATTENTION_AFTER, ImageTokens, Reducer, Selection, Site
from tokenomy.reducers.registry import register
from tokenomy.vision.base import WINDOW_ATTENTION, SignalRequest

ENCODER_RATIO_SCALE = 1.4  # lambda: Stage I keeps lambda * target (config.yaml encoder_ratio_scale)
WINDOW_TEMPERATURE = 0.1  # tau of the inter-window softmax (inner_llm_units.py `temp`)
AUDIO_TOKENS_PER_SECOND = 25  # Qwen2.5-Omni: 50 Hz encoder frames pooled 2x
# Official layer configurations (config.yaml, config_qwen3_30b.yaml), by LLM depth: (drop layers, late_block_layer).
LAYER_CONFIGS = {28: ((16, 18, 20), 24), 48: ((27, 31, 35), 40)}


# ---- the scheduler (§5.5) ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RetentionSchedule:
    """Retention of one modality through the LLM.

    encoder_ratio: fraction kept by Stage I (what enters the LLM). drop_layers: the layers before which Stage II acts.
    keep_ratios: per Stage II step, the fraction of the tokens alive before it that it keeps. late_layer: the layer
    before which Stage III removes everything (None: never). layer_retention: per LLM layer, the fraction of the
    modality's original tokens it reads; its mean is the layer-averaged retention.
    """

    encoder_ratio: float
    drop_layers: tuple
    keep_ratios: tuple
    late_layer: int | None
    layer_retention: tuple

    @property
    def average(self) -> float:
        return sum(self.layer_retention) / len(self.layer_retention)


def retention_schedule(target: float, num_layers: int, drop_layers, late_block_layer: int | None,
                       encoder_scale: float = ENCODER_RATIO_SCALE) -> RetentionSchedule:
    """Block-wise TRR decay: Stage I keeps min(1, encoder_scale * target); Stage II steps remove amounts weighted
    1, e, e^2, ... (more in deeper steps) of one total, chosen so that the mean over all `num_layers` layers of the
    retained fraction equals `target`.

    `drop_layers` and `late_block_layer` are the 1-based numbers of the official configuration ("16-18-20", 24): a
    drop layer d acts after 1-based layer d, i.e. before 0-based layer d; Stage III acts before 0-based layer
    late_block_layer - 1. The official code finds the total by bisection; retention is linear in it, so it is solved
    exactly here, and ratios are not rounded to 4 decimals, so the average is the target to float precision.
    When even no Stage II drop cannot reach the target (Stage III removes everything from the late layer on), nothing
    is dropped and `average` says what was reached.
    """
    if not 0 < target <= 1:
        raise InputError(f"seats target retention must be in (0, 1], got {target!r}")
    if num_layers < 2:
        raise InputError(f"seats needs an LLM of at least 2 layers, got {num_layers}")
    late = num_layers if late_block_layer is None else min(late_block_layer - 1, num_layers)
    if late_block_layer is not None and not 1 <= late:
        raise InputError(f"seats late_block_layer must be in 2..{num_layers + 1}, got {late_block_layer}")
    drops = sorted({int(d) for d in drop_layers})
    if drops and not (1 <= drops[0] and drops[-1] < num_layers):
        raise InputError(f"seats drop layers must be in 1..{num_layers - 1}, got {drops}")
    drops = [d for d in drops if d < late]  # a step at or after the late layer has nothing left to drop
    encoder_ratio = min(1.0, encoder_scale * target)
    bounds = [0, *drops, late]
    segments = [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]
    weights = [math.exp(i) for i in range(len(drops))]
    cumulative = [sum(weights[: i + 1]) / sum(weights) for i in range(len(drops))]
    # sum_layers retention = enc * (sum(segments) - f * sum_i segments[i+1] * cumulative[i]); solve for f in [0, 1].
    full = encoder_ratio * sum(segments)
    slope = encoder_ratio * sum(seg * share for seg, share in zip(segments[1:], cumulative))
    fraction = 0.0 if slope == 0 else min(1.0, max(0.0, (full - target * num_layers) / slope))
    levels = [encoder_ratio] + [encoder_ratio * (1 - fraction * share) for share in cumulative]
    keep_ratios = tuple(after / before if before > 0 else 0.0 for before, after in zip(levels, levels[1:]))
    per_layer = []
    for level, length in zip(levels, segments):
        per_layer += [level] * length
    per_layer += [0.0] * (num_layers - late)
    return RetentionSchedule(encoder_ratio, tuple(drops), keep_ratios, None if late_block_layer is None else late,
                             tuple(per_layer))


# ---- Stage I (§5.2) -----------------------------------------------------------------------------------------------

def window_keep_count(size: int, ratio: float) -> int:
    return max(1, min(size, round(ratio * size)))


def window_diversity_keep(features: torch.Tensor, weights: torch.Tensor | None, bounds: list, ratio: float) -> torch.Tensor:
    """Stage I for one modality: in each window [start, end) of `bounds` keep clamp(round(ratio * |W|), 1, |W|) tokens
    by weighted max-min diversity (weights on the candidate side). features [N, D], weights [N] or None. Returns kept
    indices, ascending. Equal windows are batched (same size and count): one [n, w, w] distance tensor per group."""
    if features.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=features.device)
    groups: dict = {}
    kept = []
    for start, end in bounds:
        count = window_keep_count(end - start, ratio)
        if count >= end - start:
            kept.append(torch.arange(start, end, device=features.device))
        else:
            groups.setdefault((end - start, count), []).append(start)
    for (size, count), starts in groups.items():
        spans = torch.stack([torch.arange(s, s + size, device=features.device) for s in starts])
        distance = cosine_distance(features[spans])
        chosen = max_min_diversity(distance, count, None if weights is None else weights[spans].float())
        kept.extend(spans.gather(1, chosen).unbind(0))
    return torch.cat(kept).sort().values


# ---- Stage II (§5.3) and III (§5.4) ---------------------------------------------------------------------------------

def runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous runs of True in a 1-D mask, as [start, end) into the list of True positions (not the sequence)."""
    where = torch.nonzero(mask).squeeze(1)
    if where.numel() == 0:
        return []
    breaks = (torch.nonzero(where[1:] - where[:-1] > 1).squeeze(1) + 1).tolist()
    starts, ends = [0, *breaks], [*breaks, where.numel()]
    return list(zip(starts, ends))


def temporal_windows(video_mask: torch.Tensor, audio_mask: torch.Tensor) -> list[tuple]:
    """Window w = the w-th contiguous video run with the w-th contiguous audio run (interleaved chunks); runs without a
    partner are windows of their own. Each entry: (video run or None, audio run or None)."""
    video_runs, audio_runs = runs(video_mask), runs(audio_mask)
    paired = min(len(video_runs), len(audio_runs))
    windows = [(video_runs[i], audio_runs[i]) for i in range(paired)]
    windows += [(run, None) for run in video_runs[paired:]]
    windows += [(None, run) for run in audio_runs[paired:]]
    return windows


def window_budgets(video_means, audio_means, video_sizes, audio_sizes, video_total: int, audio_total: int,
                   temperature: float = WINDOW_TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window video and audio budgets ([W] each) from per-window mean relevances (§5.3 steps 4-5).

    Windows get (softmax_w(video means / tau) + softmax_w(audio means / tau)) / 2 of the combined budget, rounded,
    at least 1 and at most their size, then nudged by single tokens until the sum is exact; each window splits its
    budget between video and audio by their shares of the per-modality budgets, fills up to capacity video first,
    and every modality present in a window keeps at least one token (the order of these fixes is the official one).
    """
    video_sizes, audio_sizes = video_sizes.long(), audio_sizes.long()
    capacity = video_sizes + audio_sizes
    video_weight = (video_means.float() / max(temperature, 1e-4)).softmax(dim=0)
    audio_weight = (audio_means.float() / max(temperature, 1e-4)).softmax(dim=0)
    combined = video_total + audio_total
    budget = ((video_weight + audio_weight) / 2 * combined).round().long().clamp(min=1)
    budget = torch.minimum(budget, capacity)
    excess = int(budget.sum()) - combined
    while excess != 0:
        if excess > 0:
            room = budget > 1
            if not bool(room.any()):
                break
            budget[budget.masked_fill(~room, -1).argmax()] -= 1
        else:
            room = budget < capacity
            if not bool(room.any()):
                break
            budget[budget.masked_fill(~room, int(capacity.max()) + 1).argmin()] += 1
        excess = int(budget.sum()) - combined
    video_share = video_weight * video_total
    audio_share = audio_weight * audio_total
    video_fraction = video_share / (video_share + audio_share + 1e-12)
    video = torch.minimum((budget.float() * video_fraction).round().long().clamp(min=0), video_sizes)
    audio = torch.minimum((budget - video).clamp(min=0), audio_sizes)
    left = budget - video - audio
    extra = torch.minimum(left.clamp(min=0), (video_sizes - video).clamp(min=0))
    video, left = video + extra, left - extra
    audio = audio + torch.minimum(left.clamp(min=0), (audio_sizes - audio).clamp(min=0))
    starved = (video_sizes > 0) & (video < 1)
    video = torch.where(starved, torch.ones_like(video), video)
    refit = torch.minimum(audio_sizes, (budget - video).clamp(min=0)).clamp(min=1)
    audio = torch.where(starved & (audio > 1), refit, audio)
    starved = (audio_sizes > 0) & (audio < 1)
    audio = torch.where(starved, torch.ones_like(audio), audio)
    refit = torch.minimum(video_sizes, (budget - audio).clamp(min=0)).clamp(min=1)
    video = torch.where(starved & (video > 1), refit, video)
    return video, audio


def _top_in_groups(scores: torch.Tensor, groups: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """Mask of the budgets[g] highest scores inside each group g (ties to the lower index; NaN ranks last)."""
    order = torch.sort(scores.float().nan_to_num(nan=float("-inf")), descending=True, stable=True).indices
    sorted_groups = groups[order]
    one_hot = torch.nn.functional.one_hot(sorted_groups, num_classes=budgets.numel())
    rank = one_hot.cumsum(dim=0).gather(1, sorted_groups[:, None]).squeeze(1) - 1
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep[order[rank < budgets[sorted_groups]]] = True
    return keep


def inner_llm_keep(relevance: torch.Tensor, video_mask: torch.Tensor, audio_mask: torch.Tensor,
                   video_keep_ratio: float, audio_keep_ratio: float,
                   temperature: float = WINDOW_TEMPERATURE) -> torch.Tensor:
    """Stage II for one sample: a keep mask over its current sequence ([L] bool; every non-audio/video token kept).

    relevance [L]: the last text token's head-averaged attention row; video_mask / audio_mask [L] bool. Each modality
    keeps max(1, round(ratio * n)) tokens; with several windows and both modalities they are spread over windows by
    `window_budgets` and each window keeps its top tokens, otherwise each modality keeps its global top tokens.
    """
    keep = torch.ones_like(video_mask, dtype=torch.bool)
    n_video, n_audio = int(video_mask.sum()), int(audio_mask.sum())
    video_total = max(1, round(video_keep_ratio * n_video)) if n_video else 0
    audio_total = max(1, round(audio_keep_ratio * n_audio)) if n_audio else 0
    windows = temporal_windows(video_mask, audio_mask)
    video_scores, audio_scores = relevance[video_mask].float(), relevance[audio_mask].float()
    device = relevance.device
    if len(windows) > 1 and n_video and n_audio:
        video_window = torch.zeros(n_video, dtype=torch.long, device=device)
        audio_window = torch.zeros(n_audio, dtype=torch.long, device=device)
        video_sizes = torch.zeros(len(windows), dtype=torch.long, device=device)
        audio_sizes = torch.zeros(len(windows), dtype=torch.long, device=device)
        for index, (video_run, audio_run) in enumerate(windows):
            if video_run is not None:
                video_window[video_run[0]:video_run[1]] = index
                video_sizes[index] = video_run[1] - video_run[0]
            if audio_run is not None:
                audio_window[audio_run[0]:audio_run[1]] = index
                audio_sizes[index] = audio_run[1] - audio_run[0]

        def window_means(scores, window_of, sizes):
            sums = torch.zeros(len(windows), dtype=torch.float32, device=device).scatter_add_(0, window_of, scores)
            return sums / sizes.float().clamp(min=1)

        video_budget, audio_budget = window_budgets(
            window_means(video_scores.nan_to_num(0.0), video_window, video_sizes),
            window_means(audio_scores.nan_to_num(0.0), audio_window, audio_sizes),
            video_sizes, audio_sizes, video_total, audio_total, temperature)
        video_keep = _top_in_groups(video_scores, video_window, video_budget)
        audio_keep = _top_in_groups(audio_scores, audio_window, audio_budget)
    else:
        single = torch.zeros(1, dtype=torch.long, device=device)
        video_keep = _top_in_groups(video_scores, single.expand(n_video), torch.tensor([video_total], device=device))
        audio_keep = _top_in_groups(audio_scores, single.expand(n_audio), torch.tensor([audio_total], device=device))
    keep[video_mask] = video_keep
    keep[audio_mask] = audio_keep
    return keep


def text_only_keep(video_mask: torch.Tensor, audio_mask: torch.Tensor) -> torch.Tensor:
    """Stage III: keep every token that is neither audio nor video."""
    return ~(video_mask | audio_mask)


# ---- the reducer -------------------------------------------------------------------------------------------------

def _ratio(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise InputError(f"seats option {name} must be a retention fraction in (0, 1], got {value!r}")
    return float(value)


def _layers(value) -> tuple | None:
    """'16-18-20' (the official config's form), '16,18,20' or a sequence of ints."""
    if value is None:
        return None
    try:
        items = [int(x) for x in value.replace(",", "-").split("-") if x.strip()] if isinstance(value, str) else [int(x) for x in value]
    except (TypeError, ValueError):
        raise InputError(f"seats option drop_layers must be layer numbers like '16-18-20', got {value!r}") from None
    return tuple(items)


def modality_masks(image: ImageTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """(video, audio) masks of a token set: adapters give audio tokens the position (j, -1, -1), video (t, h, w)."""
    positions = image.positions if image.positions.dim() == 2 else image.positions[:, 0]
    audio = positions[:, 1] < 0
    return ~audio, audio


def _window_bounds_of(ids: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) runs of equal consecutive window ids."""
    if ids.numel() == 0:
        return []
    change = (torch.nonzero(ids[1:] != ids[:-1]).squeeze(1) + 1).tolist()
    starts, ends = [0, *change], [*change, ids.numel()]
    return list(zip(starts, ends))


@register("seats")
class Seats(Reducer):
    description = ("omni-modal: diversity per audio/video window after the projector, relevance budgets at scheduled "
                   "LLM layers, all audio/video gone before a late layer")
    paper = "SEATS: Stage-adaptive Token Selection for Efficient Omni-modal LLMs, 2026, arXiv 2605.20035"
    """SEATS. Stage I acts after the projector (this stage); `expand` adds the LLM stage that runs Stage II at the
    drop layers and Stage III before the late layer, cutting earlier layers' caches each time.

    Options: video / audio are the target retention of each modality averaged over all LLM layers (not the fraction
    entering the LLM); drop_layers ('16-18-20') and late_block_layer (24) are the official 1-based numbers (a drop
    layer d acts before 0-based layer d, Stage III before late_block_layer - 1); defaults are the official ones for
    28- and 48-layer LLMs and scaled from the 28-layer ones otherwise. encoder_scale (1.4) is lambda, grid_in_window
    (2) and audio_window_seconds (2) size Stage I's windows, temperature (0.1) is tau.
    Stage I weights each candidate by the attention it received inside its window in the encoder's last layer (the
    `window_attention` signal: the ViT for video, the audio encoder for audio); a modality without the statistic (NaN)
    is selected by plain max-min diversity, the official code's mode without attention.
    """

    site = Site.POST_PROJECTOR
    reduces_images = False

    def __init__(self, video: float = 0.3, audio: float = 0.65, drop_layers=None, late_block_layer: int | None = None,
                 encoder_scale: float = ENCODER_RATIO_SCALE, grid_in_window: int = 2, audio_window_seconds: int = 2,
                 temperature: float = WINDOW_TEMPERATURE, keep: int | None = None):
        if keep is not None:
            raise InputError("seats budgets are layer-averaged retention per modality: give video= and audio= fractions, not keep")
        super().__init__(None)
        self.video, self.audio = _ratio("video", video), _ratio("audio", audio)
        self.drop_layers = _layers(drop_layers)
        if late_block_layer is not None and (isinstance(late_block_layer, bool) or not isinstance(late_block_layer, int)):
            raise InputError(f"seats option late_block_layer must be an integer layer number, got {late_block_layer!r}")
        self.late_block_layer = late_block_layer
        if isinstance(encoder_scale, bool) or not isinstance(encoder_scale, (int, float)) or encoder_scale < 1:
            raise InputError(f"seats option encoder_scale must be a number >= 1, got {encoder_scale!r}")
        self.encoder_scale = float(encoder_scale)
        for name, value in (("grid_in_window", grid_in_window), ("audio_window_seconds", audio_window_seconds)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"seats option {name} must be an integer >= 1, got {value!r}")
        self.grid_in_window, self.audio_window_seconds = grid_in_window, audio_window_seconds
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
            raise InputError(f"seats option temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)

    @property
    def applies_budget(self) -> bool:
        return False  # no `keep`: the budgets are the per-modality retention targets

    def expand(self, family: str) -> list:
        if not family.startswith("qwen"):
            raise InputError(f"seats needs a model with frames and M-RoPE (Qwen2-VL, Qwen2.5-VL, Qwen2.5-Omni), not {family}")
        return [self, SeatsInLLM(self)]

    def vision_request(self, num_layers: int, feature_layer: int) -> SignalRequest:
        # The encoder's last block, on its input, as the official statistic is taken inside that block's attention.
        return SignalRequest.of(**{WINDOW_ATTENTION: (num_layers - 1,)})

    def layer_config(self, num_layers: int) -> tuple[tuple, int]:
        if self.drop_layers is not None and self.late_block_layer is not None:
            return self.drop_layers, self.late_block_layer
        drops, late = LAYER_CONFIGS.get(num_layers, (None, None))
        if drops is None:
            drops = tuple(sorted({max(1, round(d * num_layers / 28)) for d in LAYER_CONFIGS[28][0]}))
            late = max(2, round(LAYER_CONFIGS[28][1] * num_layers / 28))
        return self.drop_layers if self.drop_layers is not None else drops, self.late_block_layer or late

    def schedules(self, num_layers: int) -> tuple[RetentionSchedule, RetentionSchedule]:
        drops, late = self.layer_config(num_layers)
        return (retention_schedule(self.video, num_layers, drops, late, self.encoder_scale),
                retention_schedule(self.audio, num_layers, drops, late, self.encoder_scale))

    def select(self, image: ImageTokens) -> Selection:
        """Stage I: per temporal window of each modality, (weighted) max-min diversity on the LLM-input embeddings."""
        video, audio = modality_masks(image)
        positions = image.positions if image.positions.dim() == 2 else image.positions[:, 0]
        weights = image.signals.get(WINDOW_ATTENTION)
        weights = None if weights is None else weights[-1]
        kept = []
        for mask, window_of, target in (
                (video, positions[:, 0] // self.grid_in_window, self.video),
                (audio, positions[:, 0] // (self.audio_window_seconds * AUDIO_TOKENS_PER_SECOND), self.audio)):
            members = torch.nonzero(mask).squeeze(1)
            if members.numel() == 0:
                continue
            ratio = min(1.0, self.encoder_scale * target)
            weight = None if weights is None or bool(weights[members].isnan().any()) else weights[members]
            local = window_diversity_keep(image.features[members], weight, _window_bounds_of(window_of[members]), ratio)
            kept.append(members[local])
        return Selection.from_indices(image, torch.cat(kept).sort().values)

    def __repr__(self) -> str:
        return f"Seats(video={self.video}, audio={self.audio})"


class SeatsInLLM(Reducer):
    """SEATS Stages II and III at the LLM site (made by `Seats.expand`); each step cuts the earlier layers' caches."""

    name = "seats-llm"
    site = Site.LLM
    cuts_caches = True

    def __init__(self, seats: Seats):
        super().__init__(None)
        self.seats = seats

    @property
    def applies_budget(self) -> bool:
        return False

    def llm_layers(self, num_layers: int) -> tuple:
        video, _ = self.seats.schedules(num_layers)
        self._num_layers = num_layers
        late = () if video.late_layer is None else (video.late_layer,)
        return tuple(video.drop_layers) + late

    def llm_request(self, layer: int) -> tuple:
        video, _ = self.seats.schedules(self._num_layers)
        return (LAST_TEXT_ATTENTION_AFTER,) if layer in video.drop_layers else ()

    def select(self, image: ImageTokens) -> Selection:
        video_schedule, audio_schedule = self.seats.schedules(self._num_layers)
        video, audio = modality_masks(image)
        if image.layer not in video_schedule.drop_layers:  # Stage III: only text goes on
            return Selection.from_indices(image, torch.nonzero(text_only_keep(video, audio)).squeeze(1))
        step = video_schedule.drop_layers.index(image.layer)
        keep = inner_llm_keep(image.signals[LAST_TEXT_ATTENTION_AFTER], video, audio, video_schedule.keep_ratios[step],
                              audio_schedule.keep_ratios[step], self.seats.temperature)
        return Selection.from_indices(image, torch.nonzero(keep).squeeze(1))
