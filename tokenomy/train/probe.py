"""Dense auxiliary supervision of the visual tokens, used while training on synthvqa only.

Trained from scratch with answer loss alone, the small models first learn the answer priors and collapse the image
tokens to one constant vector (measured: the loss is then the same with shuffled images), and they stay on that
plateau for longer than a CPU run lasts. A linear probe on each visual token that enters the LLM, asked for the
colour, shape, size and word under that token's cell, whether an object's centre lies in it, and the cell's row
and column (all known from the scene description), keeps the tokens distinct and informative from the first step:
a question names objects by shape and colour, counts them (one centre per object) and compares their positions.
The probe is dropped at export: the shipped checkpoints are plain transformers models.
"""
from __future__ import annotations

import numpy as np
import torch

from tokenomy.eval import synthvqa

# Heads read from the scene, in the column order of `cell_labels`; 0 is "none" in each.
HEADS = {"color": 1 + len(synthvqa.COLORS), "shape": 1 + len(synthvqa.SHAPES), "size": 3, "word": 1 + len(synthvqa.WORDS),
         "centre": 2}


def cell_labels(scene, image, grid: int) -> torch.Tensor:
    """[grid*grid, len(HEADS)] (colour, shape, size, word, centre) class of each cell in row-major order; 0 means none.

    A cell takes the colour with most pixels in it, and the shape and size of the object of that colour nearest to
    the cell centre; it takes the word when any text pixel falls in it; centre is 1 in the cell holding an object's
    centre point.
    """
    pixels = np.asarray(image).astype(np.int16)
    cell = synthvqa.IMAGE_SIZE // grid
    colors = list(synthvqa.COLORS)
    matches = np.stack([(pixels == synthvqa.COLORS[c]).all(-1) for c in colors])  # [colours, H, W]
    per_cell = matches.reshape(len(colors), grid, cell, grid, cell).sum((2, 4))  # [colours, grid, grid]
    dark = (pixels.sum(-1) < 200).reshape(grid, cell, grid, cell).any((1, 3))
    labels = torch.zeros(grid * grid, len(HEADS), dtype=torch.long)
    for row in range(grid):
        for col in range(grid):
            index = row * grid + col
            if per_cell[:, row, col].max() > 0:
                color = colors[int(per_cell[:, row, col].argmax())]
                cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
                owner = min((o for o in scene.objects if o.color == color), key=lambda o: (o.x - cx) ** 2 + (o.y - cy) ** 2)
                labels[index, 0] = 1 + colors.index(color)
                labels[index, 1] = 1 + synthvqa.SHAPES.index(owner.shape)
                labels[index, 2] = 2 if owner.small else 1
            if dark[row, col]:
                labels[index, 3] = 1 + synthvqa.WORDS.index(scene.word)
    for o in scene.objects:
        labels[min(o.y // cell, grid - 1) * grid + min(o.x // cell, grid - 1), 4] = 1
    return labels


def probe_grid(model) -> int:
    """Side of the grid of visual tokens entering the LLM."""
    patches = synthvqa.IMAGE_SIZE // model.config.vision_config.patch_size
    merge = getattr(model.config.vision_config, "spatial_merge_size", 1)
    return patches // merge


def _mean_or_zero(values: torch.Tensor) -> torch.Tensor:
    return values.mean() if values.numel() else values.sum()


class VisualTokenProbe(torch.nn.Module):
    """Linear heads on the LLM-dim visual tokens, read through a forward hook on the projector (LLaVA) or the
    patch merger (Qwen2-VL), so the model's own forward pass is untouched."""

    def __init__(self, model):
        super().__init__()
        dim = model.config.get_text_config().hidden_size
        self.grid = probe_grid(model)
        self.sizes = list(HEADS.values()) + [self.grid, self.grid]  # scene heads, then row and column
        self.heads = torch.nn.Linear(dim, sum(self.sizes))
        projector = model.model.visual.merger if hasattr(model.model, "visual") else model.model.multi_modal_projector
        self.captured = None
        self._hook = projector.register_forward_hook(lambda module, args, output: setattr(self, "captured", output))

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the heads over the visual tokens of the last forward; labels [B, N, len(HEADS)]."""
        batch, cells = labels.shape[:2]
        tokens = self.captured.reshape(batch, cells, -1)
        logits = self.heads(tokens).split(self.sizes, dim=-1)
        losses = []
        for i, head in enumerate(logits[: len(HEADS)]):
            target = labels[..., i].flatten()
            per_cell = torch.nn.functional.cross_entropy(head.flatten(0, 1), target, reduction="none")
            # Most cells are background: averaged over all cells, the few object and text cells (what shape and
            # word recognition are learnt from) carry almost no gradient. Each group gets half the weight.
            labelled = target > 0
            losses.append(0.5 * _mean_or_zero(per_cell[labelled]) + 0.5 * _mean_or_zero(per_cell[~labelled]))
        cell = torch.arange(cells, device=labels.device).repeat(batch)
        for head, target in zip(logits[len(HEADS):], (cell // self.grid, cell % self.grid)):
            losses.append(torch.nn.functional.cross_entropy(head.flatten(0, 1), target))
        return sum(losses) / len(losses)

    def accuracy(self, labels: torch.Tensor) -> dict:
        """Per scene head, the fraction of labelled cells (label > 0) it classifies right in the last forward."""
        tokens = self.captured.reshape(labels.shape[0], labels.shape[1], -1)
        logits = self.heads(tokens).split(self.sizes, dim=-1)
        out = {}
        for i, (name, head) in enumerate(zip(HEADS, logits)):
            labelled = labels[..., i] > 0
            out[name] = (head.argmax(-1)[labelled] == labels[..., i][labelled]).float().mean().item()
        return out

    def remove(self):
        self._hook.remove()
