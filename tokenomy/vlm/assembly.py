"""Sequence assembly after the vision sites: inputs_embeds, attention_mask and position ids for the LLM.

Image spans are found from the input ids (runs of the image token, split by each image's placeholder count), never
from fixed offsets. A reduced image's tokens take the reference position of the placeholder their TRUE grid position
maps to (`keep`, `multi`), or the sequence is renumbered (`contiguous`). Every sample is rebuilt on its own, then the
batch is left-padded again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from tokenomy.errors import InputError
from tokenomy.reducers.base import PositionPolicy


@dataclass
class LLMInputs:
    inputs_embeds: torch.Tensor  # [B, L', d]
    attention_mask: torch.Tensor  # [B, L'] (1 = token, 0 = left padding)
    position_ids: torch.Tensor  # [B, L'] or [3, B, L'] (under multi: each token's first position)
    visual_slots: list  # per sample: per image, LongTensor of the sequence indices of its visual tokens
    visual_positions: list  # per sample: per image, [K, 3] or [K, m, 3] TRUE grid positions of those tokens
    multi_position_ids: Optional[torch.Tensor] = None  # [B, L', m] or [3, B, L', m] under the multi policy


def image_spans(input_ids: torch.Tensor, image_token_id, counts: list) -> list:
    """Per image (in batch order): (sample index, LongTensor of its placeholder positions). `image_token_id`: one id,
    or several when images and videos (or audio) fill placeholders in the order the items come."""
    ids = torch.as_tensor(sorted(image_token_id) if isinstance(image_token_id, (set, frozenset)) else [image_token_id],
                          device=input_ids.device)
    spans, image = [], 0
    for sample, row in enumerate(input_ids):
        positions = torch.nonzero(torch.isin(row, ids)).squeeze(1)
        start = 0
        while start < len(positions):
            if image >= len(counts):
                raise InputError(f"sample {sample} has more image placeholders than its images fill")
            spans.append((sample, positions[start : start + counts[image]]))
            start += counts[image]
            image += 1
    if image != len(counts):
        raise InputError(f"the prompts hold placeholders for {image} images but {len(counts)} images were given")
    return spans


def _span_offsets(encoded, tokens, policy: PositionPolicy, m: int) -> torch.Tensor:
    positions = tokens.positions
    if positions.dim() == 3 and policy is not PositionPolicy.MULTI:
        raise InputError(f"a stage gave tokens {positions.shape[1]} positions each, which needs position_policy='multi'")
    offsets = encoded.offsets(positions)
    if policy is PositionPolicy.MULTI:
        if offsets.dim() == 1:
            offsets = offsets[:, None]
        if offsets.shape[1] > m:
            raise InputError(f"a stage gave tokens {offsets.shape[1]} positions each, more than the plan's {m}")
        offsets = offsets[:, torch.arange(m, device=offsets.device) % offsets.shape[1]]  # fewer members repeat in turn
    return offsets


def assemble(adapter, batch, encoded: list, final_tokens: list, policy: PositionPolicy, m: int = 1) -> LLMInputs:
    """`encoded`: EncodedImage per image; `final_tokens`: its ImageTokens after the post-projector site (LLM-dim)."""
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    reference = adapter.reference_positions(batch)
    embeds = adapter.embed(input_ids)
    token_ids = {adapter.image_token_id} | {token for image in encoded for token in image.token_ids}
    spans = image_spans(input_ids, token_ids if len(token_ids) > 1 else adapter.image_token_id,
                        [image.num_placeholders for image in encoded])
    by_sample = {}
    for image, tokens, (sample, span) in zip(encoded, final_tokens, spans):
        by_sample.setdefault(sample, []).append((image, tokens, span))
    rows, sources, slots, visual_positions = [], [], [], []
    for sample in range(input_ids.shape[0]):
        valid = torch.nonzero(mask[sample]).squeeze(1)
        pieces, source, sample_slots, sample_positions = [], [], [], []
        cursor, length = int(valid[0]) if len(valid) else input_ids.shape[1], 0
        for image, tokens, span in by_sample.get(sample, []):
            start = int(span[0])
            pieces.append(embeds[sample, cursor:start])
            text = torch.arange(cursor, start, device=input_ids.device)
            source.append(text[:, None].expand(-1, m) if policy is PositionPolicy.MULTI else text)
            length += start - cursor
            offsets = _span_offsets(image, tokens, policy, m)
            features, offsets, visual = image.layout(tokens.features, offsets)
            pieces.append(features.to(embeds.dtype))
            source.append(span.to(offsets.device)[offsets].to(input_ids.device))
            sample_slots.append(visual.to(input_ids.device) + length)
            sample_positions.append(tokens.positions)
            length += len(features)
            cursor = int(span[-1]) + 1
        pieces.append(embeds[sample, cursor:])
        tail = torch.arange(cursor, input_ids.shape[1], device=input_ids.device)
        source.append(tail[:, None].expand(-1, m) if policy is PositionPolicy.MULTI else tail)
        rows.append(torch.cat(pieces))
        sources.append(torch.cat(source))
        slots.append(sample_slots)
        visual_positions.append(sample_positions)

    longest = max(len(row) for row in rows)
    batch_size, hidden = len(rows), embeds.shape[-1]
    new_embeds = embeds.new_zeros(batch_size, longest, hidden)
    new_mask = mask.new_zeros(batch_size, longest)
    axes = (reference.shape[0],) if reference.dim() == 3 else ()
    new_positions = reference.new_zeros(*axes, batch_size, longest)
    multi = reference.new_zeros(*axes, batch_size, longest, m) if policy is PositionPolicy.MULTI else None
    for sample, (row, source) in enumerate(zip(rows, sources)):
        pad = longest - len(row)
        new_embeds[sample, pad:] = row
        new_mask[sample, pad:] = 1
        if policy is PositionPolicy.CONTIGUOUS:
            new_positions[..., sample, pad:] = torch.arange(len(row), device=reference.device)
        else:
            gathered = reference[..., sample, :][..., source]  # [..., L_s] or [..., L_s, m]
            if multi is not None:
                multi[..., sample, pad:, :] = gathered
                gathered = gathered[..., 0]
            new_positions[..., sample, pad:] = gathered
        slots[sample] = [slot + pad for slot in slots[sample]]
    return LLMInputs(new_embeds, new_mask, new_positions, slots, visual_positions, multi)
