"""Sequence assembly after a reduction: inputs_embeds, attention_mask and position_ids for the LLM.

Image spans are found from the input ids (runs of the image token, split by each image's placeholder count), never
from fixed offsets. Every sample is rebuilt on its own, then the batch is left-padded again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenomy.errors import InputError
from tokenomy.reducers.base import PositionPolicy


@dataclass
class LLMInputs:
    inputs_embeds: torch.Tensor  # [B, L', d]
    attention_mask: torch.Tensor  # [B, L'] (1 = token, 0 = left padding)
    position_ids: torch.Tensor  # [B, L'] or [3, B, L'] before the adapter's final form
    visual_slots: list  # per sample: list of LongTensor, the sequence indices of each image's visual tokens
    visual_offsets: list  # per sample: list of LongTensor, each visual token's placeholder offset in its image


def image_spans(input_ids: torch.Tensor, image_token_id: int, counts: list) -> list:
    """Per image (in batch order): (sample index, LongTensor of its placeholder positions)."""
    spans, image = [], 0
    for sample, row in enumerate(input_ids):
        positions = torch.nonzero(row == image_token_id).squeeze(1)
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


def assemble(adapter, batch, encoded, selections, policy: PositionPolicy) -> LLMInputs:
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    reference = adapter.reference_positions(batch)
    embeds = adapter.embed(input_ids)
    spans = image_spans(input_ids, adapter.image_token_id, [image.num_placeholders for image in encoded])
    rows, sources, slots, offsets = [], [], [], []
    by_sample = {}
    for image, selection, (sample, span) in zip(encoded, selections, spans):
        by_sample.setdefault(sample, []).append((image, selection, span))
    for sample in range(input_ids.shape[0]):
        valid = torch.nonzero(mask[sample]).squeeze(1)
        pieces, source, sample_slots, sample_offsets = [], [], [], []
        cursor, length = int(valid[0]) if len(valid) else input_ids.shape[1], 0
        for image, selection, span in by_sample.get(sample, []):
            start = int(span[0])
            pieces.append(embeds[sample, cursor:start])
            source.append(torch.arange(cursor, start))
            length += start - cursor
            features, offset = image.to_llm(selection)
            pieces.append(features.to(embeds.dtype))
            source.append(span[offset])
            sample_slots.append(torch.arange(length, length + len(features)))
            sample_offsets.append(offset)
            length += len(features)
            cursor = int(span[-1]) + 1
        pieces.append(embeds[sample, cursor:])
        source.append(torch.arange(cursor, input_ids.shape[1]))
        rows.append(torch.cat(pieces))
        sources.append(torch.cat(source).to(input_ids.device))
        slots.append(sample_slots)
        offsets.append(sample_offsets)

    longest = max(len(row) for row in rows)
    batch_size, hidden = len(rows), embeds.shape[-1]
    new_embeds = embeds.new_zeros(batch_size, longest, hidden)
    new_mask = mask.new_zeros(batch_size, longest)
    multi_row = reference.dim() == 3
    new_positions = reference.new_zeros((reference.shape[0], batch_size, longest) if multi_row else (batch_size, longest))
    for sample, (row, source) in enumerate(zip(rows, sources)):
        pad = longest - len(row)
        new_embeds[sample, pad:] = row
        new_mask[sample, pad:] = 1
        if policy is PositionPolicy.KEEP:
            if multi_row:
                new_positions[:, sample, pad:] = reference[:, sample, source]
            else:
                new_positions[sample, pad:] = reference[sample, source]
        else:  # contiguous; adapters refuse the policies they cannot assemble (multi until PPE, contiguous M-RoPE)
            new_positions[sample, pad:] = torch.arange(len(row))
        slots[sample] = [slot + pad for slot in slots[sample]]
    return LLMInputs(new_embeds, new_mask, new_positions, slots, offsets)
