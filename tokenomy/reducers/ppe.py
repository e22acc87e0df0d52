"""PPE (reducers.md §4): DPC-KNN merged tokens that keep K of their members' (t, h, w) positions.

`ppe` merges at the post-projector site: the tokens of each super-frame (one t of Qwen's merged grid: one image, or
2 frames of a video) are clustered by DPC-KNN into ceil(N * ratio) clusters (or the `keep` budget), each cluster
becomes the mean of its members, placed in centre order (descending centre score), as the official code does. A
merged token carries K member positions: members in ascending index, taken from the last one backwards and cycling
when there are fewer than K (the official `select_pos_topk` order, made deterministic). `merger="tome"` uses ToMe's
bipartite matching instead (rounds of at most half until the count is reached; slots ordered by first member), as
the paper pairs PPE with other mergers.

Its rotary (`multi_rotary`) splits every M-RoPE axis band into K contiguous sub-bands of frequency pairs; sub-band k
of axis a rotates by axis a of member k. Text and unmerged tokens carry their single position K times, so with K=1
(or with K equal members) the rotation is exactly stock M-RoPE. K must divide every `mrope_section` entry. On a 1-D
RoPE LLM (LLaVA) the one band of all frequency pairs is split the same way [O]: PPE is published for Qwen only.

`ppe-cascade` re-clusters inside the LLM before the chosen decoder layers (default: the official 11/23/35 of a
36-layer LLM, i.e. the last layer of each third), per super-frame, with the same ratio. A re-merged token sits in
the slot of its last member and keeps that member's K positions and rotary rows: the official code's variant
(§4.4, `positions="code"`). `positions="paper"` fills the K positions round-robin over the members' sets, as the
paper's figure draws it ({2,6} + {7,5,9,14} -> {2,7,6,5}); the LLM site then gives those slots fresh cos/sin rows.
Unlike the official code, tokens merged inside the LLM stay in sequence order (the LLM site keeps original order)
instead of moving to centre order.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from tokenomy.errors import InputError
from tokenomy.kernels import dispatch
from tokenomy.kernels.dispatch import BACKENDS, dpc_knn
from tokenomy.reducers.base import ImageTokens, PositionPolicy, Reducer, Selection, Site
from tokenomy.reducers.registry import register

CASCADE_POSITIONS = ("code", "paper")  # a re-merged token's K positions: its last member's set, or round-robin
MERGERS = ("dpc-knn", "tome")  # the base merger: Chat-UniVi's density peaks (official), or ToMe's bipartite matching
ORDERS = ("centre", "raster")  # merged tokens in descending centre score (official), or by their kept index
MROPE_FAMILIES = {"qwen2_vl_text": [16, 24, 24], "qwen2_5_vl_text": [16, 24, 24]}  # transformers' default sections


def rotary_bands(text_config) -> list:
    """Frequency pairs per position axis: the M-RoPE sections (t, h, w) of Qwen2/2.5-VL, or one band holding every
    pair of a 1-D RoPE LLM (LLaVA's Llama), where PPE's sub-bands split that one band [O]."""
    rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    model_type = getattr(text_config, "model_type", "?")
    sections = rope.get("mrope_section") or MROPE_FAMILIES.get(model_type)
    if sections is not None:
        if len(sections) != 3:
            raise InputError(f"ppe reads 3-axis M-RoPE sections (t, h, w); {model_type!r} has mrope_section={list(sections)}")
        return list(sections)
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return [head_dim // 2]


def check_ppe_k(ppe_k: int, bands: list) -> None:
    if any(width % ppe_k for width in bands):
        carried = [k for k in range(1, min(bands) + 1) if all(width % k == 0 for width in bands)]
        what = f"mrope_section={bands}" if len(bands) == 3 else f"{bands[0]} rotary frequency pairs"
        raise InputError(f"ppe_k={ppe_k} cannot split this model's {what} into equal sub-bands; "
                         f"ppe_k must divide every band: one of {carried}")


class SubBandRotary:
    """(rotary_emb, hidden, position_ids [axes, B, L, K]) -> (cos, sin) [B, L, head_dim]: frequency pair d of axis
    band a rotates by position_ids[a, ..., k] for the sub-band k it falls in; the angles are cos/sin(position *
    inv_freq) as transformers' Qwen2-VL text rotary (and Llama's, for one band) computes them, so K=1 reproduces
    it bit for bit. `bands`: frequency pairs per axis (rotary_bands)."""

    def __init__(self, bands: list, ppe_k: int):
        check_ppe_k(ppe_k, bands)
        axis, member = [], []
        for band, width in enumerate(bands):
            axis += [band] * width
            member += [pair // (width // ppe_k) for pair in range(width)]
        self.axes = len(bands)
        self.axis, self.member = torch.tensor(axis), torch.tensor(member)

    def __call__(self, rotary_emb, hidden, position_ids):
        if position_ids.dim() == 3:  # [B, L, K]: one position row shared by every axis
            position_ids = position_ids[None].expand(self.axes, -1, -1, -1)
        device = position_ids.device
        per_pair = position_ids[self.axis.to(device), ..., self.member.to(device)].permute(1, 2, 0)  # [B, L, D/2]
        freqs = per_pair.float() * rotary_emb.inv_freq.to(device=hidden.device, dtype=torch.float)
        cos = freqs.cos() * rotary_emb.attention_scaling
        sin = freqs.sin() * rotary_emb.attention_scaling
        return torch.cat((cos, cos), dim=-1).to(hidden.dtype), torch.cat((sin, sin), dim=-1).to(hidden.dtype)


def split_budget(sizes: list, total: int) -> list:
    """`total` clusters over groups of `sizes` tokens, proportionally, each group >= 1 and <= its size."""
    n = sum(sizes)
    counts = [min(size, max(1, total * size // n)) for size in sizes]
    for index in range(len(sizes)):
        while sum(counts) < total and counts[index] < sizes[index]:
            counts[index] += 1
    return counts


def tome_assignment(features: torch.Tensor, count: int, backend=None) -> torch.Tensor:
    """ToMe as the base merger: rounds of bipartite soft matching on the (size-weighted mean) features, each removing
    at most half, until `count` tokens remain. Returns the slot (0..count-1) each original token ends in."""
    current, size = features[None].contiguous(), None
    assign = torch.arange(features.shape[0], device=features.device)
    while current.shape[1] > count:
        r = min(current.shape[1] - count, (current.shape[1] + 1) // 2)
        plan = dispatch.match(current, r, backend=backend)
        current, size = dispatch.merge(current, plan, size, backend=backend)
        assign = plan.out_row[0][assign]
    return assign.cpu()


def member_cycle(members: torch.Tensor, ppe_k: int) -> torch.Tensor:
    """K representatives of an ascending member list: the last one first, backwards, cycling."""
    return members.flip(0)[torch.arange(ppe_k, device=members.device) % len(members)]


@register("ppe")
class PPE(Reducer):
    description = "DPC-KNN merging after the projector; a merged token keeps K member positions in K rotary sub-bands"
    paper = "Huang et al., Positional Preservation Embedding for Multimodal LLMs (PPE), ICLR 2026, arXiv 2510.22936"
    site = Site.POST_PROJECTOR
    position_policy = PositionPolicy.MULTI

    def __init__(self, keep=None, ratio: float = 0.45, ppe_k: int = 8, knn: int = 5, order: str = "centre",
                 merger: str = "dpc-knn", backend: Optional[str] = None):
        super().__init__(keep=keep)
        if merger not in MERGERS:
            raise InputError(f"{self.name} merger must be one of {list(MERGERS)}, got {merger!r}")
        if order not in ORDERS:
            raise InputError(f"{self.name} order must be one of {list(ORDERS)}, got {order!r}")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise InputError(f"{self.name} ratio (clusters per token, official 0.45) must be in (0, 1], got {ratio!r}")
        if isinstance(ppe_k, bool) or not isinstance(ppe_k, int) or ppe_k < 1:
            raise InputError(f"{self.name} ppe_k (positions per merged token) must be an integer >= 1, got {ppe_k!r}")
        if isinstance(knn, bool) or not isinstance(knn, int) or knn < 1:
            raise InputError(f"{self.name} knn (neighbours for the DPC density, official 5) must be an integer >= 1, got {knn!r}")
        if backend is not None and backend not in BACKENDS:
            raise InputError(f"{self.name} backend must be one of {list(BACKENDS)}, got {backend!r}")
        self.ratio, self.ppe_k, self.knn, self.order, self.backend = float(ratio), ppe_k, knn, order, backend
        self.merger = merger
        self.positions_per_token = ppe_k

    def multi_rotary(self, text_config):
        return SubBandRotary(rotary_bands(text_config), self.ppe_k)

    def clusters(self, image: ImageTokens, sizes: list) -> list:
        if self.keep is None:
            return [max(1, math.ceil(size * self.ratio)) for size in sizes]
        return split_budget(sizes, self.budget(image))

    def select(self, image: ImageTokens) -> Selection:
        features = image.features.float().nan_to_num(0.0, 0.0, 0.0)
        positions = image.positions
        frame = positions[..., 0] if positions.dim() == 2 else positions[:, 0, 0]
        frames = torch.unique(frame)  # ascending super-frames (one for an image)
        groups = [torch.nonzero(frame == t).squeeze(1) for t in frames]
        kept, kept_positions = [], []
        merge_index = torch.empty(image.num_tokens, dtype=torch.long)
        for group, count in zip(groups, self.clusters(image, [len(g) for g in groups])):
            centres, assign = self.cluster(features[group], count)
            slot_kept, slot_positions = self.place(group.cpu(), centres, assign, positions)
            if self.order == "raster":
                order = torch.argsort(slot_kept)
                slot_kept, slot_positions = slot_kept[order], slot_positions[order.to(slot_positions.device)]
                assign = torch.argsort(order)[assign]
            merge_index[group.cpu()] = assign + sum(len(k) for k in kept)
            kept.append(slot_kept)
            kept_positions.append(slot_positions)
        kept = torch.cat(kept)
        return Selection(kept, torch.cat(kept_positions), merge_index=merge_index,
                         merge_weight=torch.ones(image.num_tokens))

    def cluster(self, features, count):
        """(centres [count] in slot order, assign [N] slot of every token), both local to the group, on the CPU."""
        if self.merger == "tome":
            assign = tome_assignment(features, count, self.backend)
            first = torch.full((count,), len(assign), dtype=torch.long).scatter_reduce(
                0, assign, torch.arange(len(assign)), reduce="amin")
            order = torch.argsort(first)  # ToMe has no centre score: slots by their first member
            return first[order], torch.argsort(order)[assign]
        knn = min(3, max(count // 2, 1)) if self.knn > count else self.knn  # the official CTM's rule
        result = dpc_knn(features[None].contiguous(), count, min(knn, len(features)), backend=self.backend)
        return result.centres[0].cpu(), result.assign[0].cpu()

    def place(self, group, centres, assign, positions):
        """Kept indices (the centres, in centre order) and the K positions of each cluster's members."""
        sets = [self.member_positions(group[assign == slot], positions) for slot in range(len(centres))]
        return group[centres], torch.stack(sets)

    def member_positions(self, members, positions):
        if positions.dim() == 3:  # tokens that already carry K positions: the last member's set
            return positions[int(members[-1])]
        return positions[member_cycle(members, self.ppe_k).to(positions.device)]


@register("ppe-cascade")
class PPECascade(PPE):
    description = "PPE re-merging inside the LLM at chosen layers (the cascade), positions as the official code keeps them"
    paper = PPE.paper
    site = Site.LLM

    def __init__(self, keep=None, ratio: float = 0.45, ppe_k: int = 8, knn: int = 5, layers=None,
                 positions: str = "code", merger: str = "dpc-knn", backend: Optional[str] = None):
        super().__init__(keep=keep, ratio=ratio, ppe_k=ppe_k, knn=knn, order="raster", merger=merger, backend=backend)
        if positions not in CASCADE_POSITIONS:
            raise InputError(f"ppe-cascade positions must be one of {list(CASCADE_POSITIONS)}, got {positions!r}")
        self.positions = positions
        self.layers = self._parse_layers(layers)
        self.last_layer = None  # set by llm_layers, which the pipeline calls at load

    def _parse_layers(self, layers):
        if layers is None:
            return None
        if isinstance(layers, str):
            try:
                layers = [int(part) for part in layers.split("/")]
            except ValueError:
                raise InputError(f"ppe-cascade layers must be integers joined by '/' (e.g. 11/23/35), got {layers!r}") from None
        layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
        valid = isinstance(layers, (list, tuple)) and layers and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in layers)
        if not valid:
            raise InputError(f"ppe-cascade layers must be decoder layers >= 1, got {layers!r}")
        return tuple(sorted(set(layers)))

    def llm_layers(self, num_layers):
        if self.layers is None:  # the last layer of each third: 11, 23, 35 of 36 (official)
            layers = tuple(sorted({num_layers * third // 3 - 1 for third in (1, 2, 3)} - {0}))
        elif self.layers[-1] >= num_layers:
            raise InputError(f"ppe-cascade layer {self.layers[-1]} must be in 1..{num_layers - 1} for this {num_layers}-layer LLM")
        else:
            layers = self.layers
        self.last_layer = layers[-1]
        return layers

    def clusters(self, image, sizes):
        """`ratio` at every step; with a `keep` budget, no step goes below it and the last step lands on it (the
        budget counts the tokens the last layers read, as for FastV)."""
        counts = [max(1, math.ceil(size * self.ratio)) for size in sizes]
        if self.keep is None:
            return counts
        target = self.budget(image) if image.layer == self.last_layer else max(sum(counts), self.budget(image))
        return counts if target == sum(counts) else split_budget(sizes, target)

    def place(self, group, centres, assign, positions):
        """Each cluster sits in the slot of its last member and keeps that slot's K positions (and rotary rows)."""
        order = torch.arange(len(assign), device=assign.device)
        last_member = torch.full((len(centres),), -1, dtype=torch.long, device=assign.device)
        last = group[last_member.scatter_reduce(0, assign, order, reduce="amax")]
        if self.positions == "paper":
            sets = torch.stack([round_robin(positions[group[assign == slot].to(positions.device)], self.ppe_k)
                                for slot in range(len(centres))])
            return last, sets
        sets = positions[last.to(positions.device)]
        if sets.dim() == 2:  # single positions: the slot rotates by its own one, K times
            sets = sets[:, None].expand(-1, self.ppe_k, -1)
        return last, sets


def round_robin(member_positions: torch.Tensor, ppe_k: int) -> torch.Tensor:
    """The paper figure's K slots of a re-merged token: slot 1 of every member (in order), then slot 2, ...,
    skipping repeats and cycling when the members hold fewer than K distinct positions.
    member_positions: [members, m, 3] or [members, 3]; returns [K, 3]."""
    if member_positions.dim() == 2:
        member_positions = member_positions[:, None]
    taken = []
    for candidate in member_positions.transpose(0, 1).reshape(-1, 3):
        if len(taken) == ppe_k:
            break
        if not any(torch.equal(candidate, seen) for seen in taken):
            taken.append(candidate)
    return torch.stack(taken)[torch.arange(ppe_k) % len(taken)]
