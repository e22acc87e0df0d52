"""Test-time search over ordered (coarse-to-fine) tokens: best-of-N, beam search and lookahead.

A prior proposes continuations of token prefixes (`generate_next_tokens`), the tokenizer decodes every
candidate prefix under one fixed noise per prompt (so candidates are compared fairly), and a verifier
scores the images. Counters record AR forward passes, decoded images and verifier calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import inspect

import torch

from tokenomy.errors import InputError
from tokenomy.generation.sampling import apply_cfg, filter_logits


@dataclass
class Compute:
    ar_forward_passes: int = 0
    decoded_images: int = 0
    verifier_images: int = 0


@dataclass
class SearchResult:
    tokens: torch.Tensor            # [num_results, L]
    scores: torch.Tensor            # [num_results]
    images: torch.Tensor
    compute: Compute = field(default_factory=Compute)
    history: list = field(default_factory=list)  # best score after each step


class UniformPrior:
    """No model: new tokens i.i.d. uniform over the vocabulary (AR-free search)."""

    def __init__(self, vocab_size: int, max_tokens: int):
        self.vocab_size, self.max_tokens = vocab_size, max_tokens

    def generate_next_tokens(self, prompt, prefixes: torch.Tensor, num_new: int, num_samples: int, sample: bool = True,
                             generator: torch.Generator | None = None, compute: Compute | None = None):
        batch = prefixes.shape[0]
        shared = torch.randint(self.vocab_size, (batch, num_new - 1), generator=generator)
        # without replacement, as the search configs draw the branching token
        last = torch.rand(batch, self.vocab_size, generator=generator).argsort(-1)[:, :num_samples]
        body = torch.cat([prefixes, shared], 1).repeat_interleave(num_samples, 0)
        tokens = torch.cat([body, last.reshape(-1, 1)], 1)
        log_prob = torch.full((tokens.shape[0],), -num_new * float(torch.log(torch.tensor(float(self.vocab_size)))))
        return tokens, log_prob


class ARPrior:
    """A class-conditional raster AR model over the 1 x K ordered token sequence.

    Each prefix is extended by num_new - 1 tokens (greedy when sample=False, sampled otherwise) and only the
    last token branches into num_samples candidates (top-m ids, or multinomial draws without replacement).
    """

    def __init__(self, model, cfg: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
        self.model, self.cfg, self.temperature, self.top_k, self.top_p = model.eval(), cfg, temperature, top_k, top_p
        self.max_tokens, self.vocab_size = model.num_tokens, model.config.vocab_size

    @torch.no_grad()
    def _next_log_probs(self, label, prefixes: torch.Tensor, compute: Compute | None) -> torch.Tensor:
        labels = torch.full((prefixes.shape[0],), int(label), dtype=torch.long)
        guided = self.cfg != 1.0
        cond = self.model.cfg_labels(labels, guided)
        logits = self.model(cond, prefixes.repeat(1 + guided, 1))[:, -1]
        if compute is not None:
            compute.ar_forward_passes += 1
        if guided:
            logits = apply_cfg(logits, self.cfg)
        return filter_logits(logits / max(self.temperature, 1e-6), self.top_k, self.top_p).log_softmax(-1)

    def generate_next_tokens(self, prompt, prefixes: torch.Tensor, num_new: int, num_samples: int, sample: bool = True,
                             generator: torch.Generator | None = None, compute: Compute | None = None):
        tokens, log_prob = prefixes, torch.zeros(prefixes.shape[0])
        for _ in range(num_new - 1):
            log_probs = self._next_log_probs(prompt, tokens, compute)
            nxt = torch.multinomial(log_probs.exp(), 1, generator=generator) if sample else log_probs.argmax(-1, keepdim=True)
            log_prob = log_prob + log_probs.gather(1, nxt).squeeze(1)
            tokens = torch.cat([tokens, nxt], 1)
        log_probs = self._next_log_probs(prompt, tokens, compute)
        if sample:
            last = torch.multinomial(log_probs.exp(), num_samples, replacement=False, generator=generator)
        else:
            last = log_probs.topk(num_samples, dim=-1).indices
        log_prob = (log_prob[:, None] + log_probs.gather(1, last)).reshape(-1)
        tokens = torch.cat([tokens.repeat_interleave(num_samples, 0), last.reshape(-1, 1)], 1)
        return tokens, log_prob


def geometric_schedule(max_tokens: int, base: int = 2) -> list[int]:
    lengths, length = [], 1
    while length < max_tokens:
        lengths.append(length)
        length *= base
    return lengths + [max_tokens]


class Searcher:
    """Holds the decoder with one fixed noise per prompt and the verifier, and counts compute."""

    def __init__(self, prior, tokenizer, verifier, decode_batch: int = 64, decode_kwargs: dict | None = None):
        self.prior, self.tokenizer, self.verifier = prior, tokenizer, verifier
        self.decode_batch, self.decode_kwargs = decode_batch, decode_kwargs or {}
        self._takes_noise = "noise" in inspect.signature(tokenizer.decode).parameters

    def _noise(self, generator):
        return torch.randn(1, *self.tokenizer.noise_shape, generator=generator) if self._takes_noise else None

    @torch.no_grad()
    def score(self, prompt, tokens: torch.Tensor, noise: torch.Tensor, compute: Compute):
        images = []
        for chunk in tokens.split(self.decode_batch):
            kwargs = dict(self.decode_kwargs)
            if self._takes_noise:
                kwargs["noise"] = noise.expand(chunk.shape[0], -1, -1, -1)
            images.append(self.tokenizer.decode(chunk, **kwargs))
        images = torch.cat(images)
        compute.decoded_images += images.shape[0]
        compute.verifier_images += images.shape[0]
        return self.verifier.score(images, prompt), images

    def best_of_n(self, prompt, n: int, num_results: int = 1, generator: torch.Generator | None = None) -> SearchResult:
        """n full sequences sampled from the prior, decoded, scored; the top `num_results` are kept."""
        compute, noise = Compute(), self._noise(generator)
        empty = torch.zeros(n, 0, dtype=torch.long)  # n independent sequences, no shared prefix
        tokens, _ = self.prior.generate_next_tokens(prompt, empty, self.prior.max_tokens, 1, sample=True, generator=generator, compute=compute)
        scores, images = self.score(prompt, tokens, noise, compute)
        top = scores.topk(min(num_results, n)).indices
        return SearchResult(tokens[top], scores[top], images[top], compute, [float(scores.max())])

    def beam_search(self, prompt, beams: int = 5, candidates: int = 10, schedule: list[int] | None = None,
                    lookahead: int = 0, sample: bool = False, num_results: int = 1,
                    generator: torch.Generator | None = None) -> SearchResult:
        """Grow prefixes along `schedule` (cumulative lengths, geometric 1,2,4,...,K by default), keeping the
        `beams` best of the beams x candidates extensions. With `lookahead` > 0 each candidate is extended
        greedily by that many tokens for scoring only; the beams keep the un-extended tokens."""
        schedule = schedule or geometric_schedule(self.prior.max_tokens)
        if any(b <= a for a, b in zip(schedule, schedule[1:])) or schedule[-1] > self.prior.max_tokens:
            raise InputError(f"schedule must increase and end at most at {self.prior.max_tokens}, got {schedule}")
        compute, noise = Compute(), self._noise(generator)
        current = torch.zeros(1, 0, dtype=torch.long)
        history = []
        for length in schedule:
            tokens, _ = self.prior.generate_next_tokens(prompt, current, length - current.shape[1], candidates, sample=sample,
                                                        generator=generator, compute=compute)
            scored = tokens
            if lookahead and length < self.prior.max_tokens:
                extra = min(lookahead, self.prior.max_tokens - length)
                # greedy roll-out on a private generator so the beam decisions do not shift the sampling stream
                scored, _ = self.prior.generate_next_tokens(prompt, tokens, extra, 1, sample=False,
                                                            generator=torch.Generator().manual_seed(0), compute=compute)
            scores, images = self.score(prompt, scored, noise, compute)
            keep = scores.topk(min(beams, scores.shape[0])).indices
            current = tokens[keep]
            history.append(float(scores.max()))
        top = keep[: min(num_results, keep.numel())]
        return SearchResult(tokens[top], scores[top], images[top], compute, history)
