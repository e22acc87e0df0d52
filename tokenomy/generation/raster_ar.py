"""Raster-order class-conditional GPT (LlamaGen style): [class, x_0, ..., x_{N-2}] predicts x_0 ... x_{N-1}."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenomy.generation.base import ARGenerator, register
from tokenomy.generation.sampling import apply_cfg, guidance_scale, sample_logits


@register("raster")
class RasterAR(ARGenerator):
    def _rope(self, length: int, batch: int) -> torch.Tensor:
        # the class token takes the condition row (LlamaGen's is all zero); x_j the rotation of its own cell j
        cells = self.cell_rotations[: length - 1].expand(batch, -1, -1, -1)
        return torch.cat([self.condition_rotation(batch), cells], 1)

    def forward(self, labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """labels [B], tokens [B, t] (t < N) -> logits [B, t + 1, V] for x_0 ... x_t (no cache)."""
        x = torch.cat([self.class_embed(labels)[:, None], self.token_embed(tokens)], dim=1)
        self.forward_passes += 1
        return self.trunk(x, self._rope(x.shape[1], x.shape[0]))

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, generator=None) -> torch.Tensor:
        logits = self.forward(self.drop_labels(labels, generator), tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))

    @torch.no_grad()
    def generate(self, labels, cfg: float = 1.0, cfg_schedule: str = "constant", temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 use_cache: bool = True, prefix: torch.Tensor | None = None,
                 return_logits: bool = False):
        """Sample N tokens in raster order; `prefix` [B, m] teacher-forces the first m tokens.

        With `use_cache=False` every step re-runs the whole prefix (the reference the cache must match).
        """
        labels = self.check_labels(labels).to(self.cell_rotations.device)
        total = self.num_tokens
        guided = not (cfg_schedule == "constant" and cfg == 1.0)
        cond = self.cfg_labels(labels, guided)
        tokens = torch.zeros(labels.shape[0], total, dtype=torch.long, device=labels.device)
        start = 0
        if prefix is not None:
            self.check_tokens(prefix, "prefix")
            start = prefix.shape[1]
            tokens[:, :start] = prefix
        cache = self.trunk.new_cache(cond.shape[0], total, labels.device) if use_cache else None
        step_logits = []
        for j in range(start, total):
            if use_cache:
                if j == start:  # prefill: class token plus any teacher-forced prefix
                    inputs = torch.cat([self.class_embed(cond)[:, None], self.token_embed(tokens[:, :j].repeat(1 + guided, 1))], 1)
                    positions = torch.arange(j + 1, device=labels.device)
                else:
                    inputs = self.token_embed(tokens[:, j - 1 : j].repeat(1 + guided, 1))
                    positions = torch.tensor([j], device=labels.device)
                rope = self._rope(j + 1, cond.shape[0])[:, positions]
                self.forward_passes += 1
                logits = self.trunk(inputs, rope, positions, cache)[:, -1]
            else:
                logits = self.forward(cond, tokens[:, :j].repeat(1 + guided, 1))[:, -1]
            if guided:
                logits = apply_cfg(logits, guidance_scale(cfg_schedule, cfg, j, total))
            step_logits.append(logits)
            tokens[:, j] = sample_logits(logits, temperature, top_k, top_p, generator)
        return (tokens, torch.stack(step_logits, 1)) if return_logits else tokens

    def sequence_log_prob(self, labels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher-forced log-likelihood of whole sequences, [B] (nats)."""
        logits = self.forward(labels, tokens[:, :-1]).log_softmax(-1)
        return logits.gather(-1, tokens[..., None]).squeeze(-1).sum(-1)
