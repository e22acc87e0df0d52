"""RandAR: any-order AR image generation with position-instruction tokens and parallel decoding.

Training layout for an order pi: [c, p_pi(0), x_pi(0), p_pi(1), x_pi(1), ...]; the output at p_pi(i) predicts
x_pi(i). p_j is one shared learned vector rotated by the RoPE of cell j (and, like the official model,
rotated again inside attention). Decoding several tokens per step appends several instruction queries; the
next step rewrites their provisional cache entries so the cache is back in the exact training layout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenomy.errors import InputError
from tokenomy.generation.base import ARGenerator, register
from tokenomy.generation.rope2d import apply_rope, grid_angles, rotations
from tokenomy.generation.sampling import apply_cfg, guidance_scale, sample_columns


def cosine_step_sizes(total: int, steps: int) -> list[int]:
    """Tokens per step under RandAR's cosine schedule; `steps` >= total (or <= 0) means one token per step."""
    if steps <= 0 or steps >= total:
        return [1] * total
    sizes, done, k, step = [], 0, 1, 0
    while done < total:
        sizes.append(k)
        done += k
        step += 1
        target = min(total, math.floor((1 - math.cos(math.pi / 2 * (step + 1) / steps)) * total) + 1)
        k = min(max(target - done, 1), total - done)
    return sizes


def make_order(kind, batch: int, total: int, generator=None, device=None) -> torch.Tensor:
    """'raster', 'random' (one uniform permutation per image, drawn image by image with randperm as RandAR does)
    or an explicit [N] / [B, N] order."""
    if isinstance(kind, torch.Tensor):
        order = kind.to(device).long()
        order = order.expand(batch, -1) if order.ndim == 1 else order
        if order.shape != (batch, total) or not torch.equal(order.sort(-1).values, torch.arange(total, device=order.device).expand(batch, -1)):
            raise InputError(f"order must be a permutation of range({total}) per image, got shape {tuple(order.shape)}")
        return order
    if kind == "raster":
        return torch.arange(total, device=device).expand(batch, -1)
    if kind == "random":
        return torch.stack([torch.randperm(total, generator=generator) for _ in range(batch)]).to(device)
    raise InputError(f"order must be 'raster', 'random' or a tensor, got {kind!r}")


@register("randar")
class RandAR(ARGenerator):
    def __init__(self, config):
        super().__init__(config)
        self.instruction = nn.Parameter(0.02 * torch.randn(config.width))

    def instruction_tokens(self, rope: torch.Tensor) -> torch.Tensor:
        """rope [B, L, Dh/2, 2] -> p tokens [B, L, width]: the shared vector, per head, rotated to each cell."""
        heads, head_dim = self.config.heads, self.trunk.head_dim
        base = self.instruction.view(1, heads, 1, head_dim).expand(rope.shape[0], -1, rope.shape[1], -1)
        return apply_rope(base, rope).transpose(1, 2).reshape(rope.shape[0], rope.shape[1], -1)

    def layout(self, labels, tokens, order_rope):
        """Training layout [c, p_0, x_0, ..., p_{q-1}] for q = order_rope.shape[1]; uses tokens[:, :q-1]."""
        batch, q = order_rope.shape[:2]
        p = self.instruction_tokens(order_rope)
        x = self.token_embed(tokens[:, : q - 1])
        pairs = torch.stack([p[:, : q - 1], x], dim=2).flatten(1, 2)
        inputs = torch.cat([self.class_embed(labels)[:, None], pairs, p[:, q - 1 :]], dim=1)
        pair_rope = order_rope[:, : q - 1].repeat_interleave(2, dim=1)
        rope = torch.cat([self.condition_rotation(batch), pair_rope, order_rope[:, q - 1 :]], dim=1)
        return inputs, rope

    def forward(self, labels: torch.Tensor, tokens: torch.Tensor, order: torch.Tensor, cell_rotations=None) -> torch.Tensor:
        """labels [B], tokens in decoding order [B, >= q-1], order [B, q] -> logits [B, q, V] (no cache)."""
        cell_rotations = self.cell_rotations if cell_rotations is None else cell_rotations
        inputs, rope = self.layout(labels, tokens, cell_rotations[order])
        self.forward_passes += 1
        return self.trunk(inputs, rope)[:, 1::2]

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, generator=None, order="random") -> torch.Tensor:
        order = make_order(order, tokens.shape[0], tokens.shape[1], generator, tokens.device)
        in_order = tokens.gather(1, order)
        logits = self.forward(self.drop_labels(labels, generator), in_order, order)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), in_order.reshape(-1))

    def sequence_log_prob(self, labels: torch.Tensor, tokens: torch.Tensor, order="raster", generator=None) -> torch.Tensor:
        order = make_order(order, tokens.shape[0], tokens.shape[1], generator, tokens.device)
        in_order = tokens.gather(1, order)
        logits = self.forward(labels, in_order, order).log_softmax(-1)
        return logits.gather(-1, in_order[..., None]).squeeze(-1).sum(-1)

    @torch.no_grad()
    def generate(self, labels, steps: int = 0, order="random", cfg: float = 1.0, cfg_schedule: str = "constant",
                 cfg_start: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 known: torch.Tensor | None = None, grid: tuple[int, int] | None = None, on_step=None):
        """Decode N tokens with the KV cache, several per step under the cosine schedule (`steps` < N).

        known [B, N] (-1 = unknown; the same positions known in every image) teacher-forces tokens first:
        inpainting and outpainting. `grid` larger than the trained grid decodes at a higher resolution with
        NTK-mixed RoPE. `cfg_start` is where the linear CFG ramp starts (official cfg_scales = (cfg_start, cfg)).
        Tokens are drawn one query column at a time, as the official loop. `on_step(info)` is called after each forward with the cache and the step's logits.
        Returns tokens [B, N] in grid (row-major) order.
        """
        labels = self.check_labels(labels).to(self.instruction.device)
        device, batch = labels.device, labels.shape[0]
        rows, cols = grid or (self.config.grid_rows, self.config.grid_cols)
        total = rows * cols
        cell_rotations = self.cell_rotations if grid is None else rotations(grid_angles(rows, cols, self.trunk.head_dim, train_grid=self.config.grid_rows)).to(device)
        num_known, order = self._order_with_known(order, known, batch, total, generator, device)
        guided = not (cfg_schedule == "constant" and cfg == 1.0)
        cond = self.cfg_labels(labels, guided)
        copies = 1 + guided
        order_rope = cell_rotations[order].repeat(copies, 1, 1, 1)
        in_order = torch.zeros(batch, total, dtype=torch.long, device=device)
        if num_known:
            in_order[:, :num_known] = known.gather(1, order[:, :num_known])
        sizes = cosine_step_sizes(total - num_known, steps)
        cache = self.trunk.new_cache(cond.shape[0], 8 * math.ceil((1 + 2 * total) / 8), device)
        decoded, k = num_known, sizes[0]
        # first forward: class token, teacher-forced known pairs, then the first k instruction queries
        inputs, rope = self.layout(cond, in_order.repeat(copies, 1), order_rope[:, : decoded + 1])
        if k > 1:
            inputs = torch.cat([inputs, self.instruction_tokens(order_rope[:, decoded + 1 : decoded + k])], 1)
            rope = torch.cat([rope, order_rope[:, decoded + 1 : decoded + k]], 1)
        positions = torch.arange(inputs.shape[1], device=device)
        for step, k in enumerate(sizes):
            self.forward_passes += 1
            logits = self.trunk(inputs, rope, positions, cache)[:, -k:]
            if guided:
                logits = apply_cfg(logits, guidance_scale(cfg_schedule, cfg, decoded, total, start=cfg_start))
            in_order[:, decoded : decoded + k] = sample_columns(logits, temperature, top_k, top_p, generator)
            if on_step is not None:
                on_step({"step": step, "decoded": decoded, "k": k, "logits": logits, "cache": cache, "labels": cond,
                         "tokens_in_order": in_order[:, : decoded + k].clone(), "order": order, "order_rope": order_rope})
            if step + 1 == len(sizes):
                break
            inputs, rope, positions = self._rewrite_input(in_order.repeat(copies, 1), order_rope, decoded, k, sizes[step + 1])
            decoded += k
        return in_order.new_zeros(batch, total).scatter(1, order, in_order)

    def _rewrite_input(self, in_order, order_rope, decoded: int, k: int, next_k: int):
        """[x_a, p_{a+1}, x_{a+1}, ..., p_{a+k-1}, x_{a+k-1}, p_{a+k}, ..., p_{a+k+next_k-1}] from buffer index 2+2a.

        The provisional entries of p_{a+1..a+k-1} written by the previous step are overwritten, now followed by
        their sampled tokens, so the cache again equals a fresh forward over the training layout.
        """
        a = decoded
        x = self.token_embed(in_order[:, a : a + k])
        p_rope = order_rope[:, a + 1 : a + k + next_k]
        p = self.instruction_tokens(p_rope)
        x_rope = order_rope[:, a : a + k]
        pairs = torch.stack([p[:, : k - 1], x[:, 1:]], dim=2).flatten(1, 2)
        pair_rope = torch.stack([p_rope[:, : k - 1], x_rope[:, 1:]], dim=2).flatten(1, 2)
        inputs = torch.cat([x[:, :1], pairs, p[:, k - 1 :]], dim=1)
        rope = torch.cat([x_rope[:, :1], pair_rope, p_rope[:, k - 1 :]], dim=1)
        positions = 2 + 2 * a + torch.arange(inputs.shape[1], device=inputs.device)
        return inputs, rope, positions

    def _order_with_known(self, order, known, batch, total, generator, device):
        if known is None:
            return 0, make_order(order, batch, total, generator, device)
        if known.shape != (batch, total):
            raise InputError(f"known must be [B, N] = [{batch}, {total}] with -1 for unknown cells, got {tuple(known.shape)}")
        known_mask = known >= 0
        if not torch.equal(known_mask, known_mask[:1].expand_as(known_mask)):
            raise InputError("known cells must be the same for every image in the batch")
        self.check_tokens(known[known_mask], "known tokens")
        num_known = int(known_mask[0].sum())
        if num_known == total:
            raise InputError("every cell is known: nothing to generate")
        base = make_order(order, batch, total, generator, device)
        # stable sort puts the known cells first while keeping the requested order inside each group
        rank = (~known_mask.gather(1, base)).long()
        return num_known, base.gather(1, rank.argsort(dim=1, stable=True))

    @torch.no_grad()
    def generate_sequential(self, labels, order="random", cfg: float = 1.0, cfg_schedule: str = "constant",
                            cfg_start: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                            generator: torch.Generator | None = None) -> torch.Tensor:
        """Reference decoder: one token per step, each step a fresh forward over the whole layout (no cache)."""
        labels = self.check_labels(labels).to(self.instruction.device)
        batch, total = labels.shape[0], self.num_tokens
        order = make_order(order, batch, total, generator, labels.device)
        guided = not (cfg_schedule == "constant" and cfg == 1.0)
        cond = self.cfg_labels(labels, guided)
        in_order = torch.zeros(batch, total, dtype=torch.long, device=labels.device)
        for j in range(total):
            logits = self.forward(cond, in_order[:, :j].repeat(1 + guided, 1), order[:, : j + 1].repeat(1 + guided, 1))[:, -1:]
            if guided:
                logits = apply_cfg(logits, guidance_scale(cfg_schedule, cfg, j, total, start=cfg_start))
            in_order[:, j : j + 1] = sample_columns(logits, temperature, top_k, top_p, generator)
        return in_order.new_zeros(batch, total).scatter(1, order, in_order)
