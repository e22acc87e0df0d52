"""Efficiency accounting: visual tokens in / kept / per layer, theoretical prefill FLOPs, timing, peak memory.

FLOPs follow FastV's convention (the one pruning papers report): a decoder layer reading n tokens with hidden
size d and FFN width m costs 4·n·d² (Q, K, V, O projections) + 2·n²·d (scores and weighted sum) + 2·n·d·m (FFN
counted as two matrices). Prefill FLOPs = Σ over layers l of f(n_l), where n_l = text tokens + the visual tokens
layer l sees, so in-LLM pruning (FastV) is credited only from its pruning layer on.
"""
from __future__ import annotations

import resource
import sys
import time

import torch

FLOPS_FORMULA = ("prefill FLOPs = sum over LLM layers l of 4*n_l*d^2 + 2*n_l^2*d + 2*n_l*d*m "
                 "(FastV convention; n_l = text tokens + visual tokens seen by layer l, d = hidden size, "
                 "m = FFN intermediate size)")


def layer_flops(n: int, hidden: int, ffn: int) -> float:
    return 4.0 * n * hidden * hidden + 2.0 * n * n * hidden + 2.0 * n * hidden * ffn


def prefill_flops(prefill_tokens: int, visual_per_layer: list[int], hidden: int, ffn: int) -> float:
    """`prefill_tokens` is the sequence entering the LLM, whose visual part is what layer 0 sees."""
    text_tokens = prefill_tokens - visual_per_layer[0]
    return sum(layer_flops(text_tokens + v, hidden, ffn) for v in visual_per_layer)


def sample_efficiency(stats: dict, text_config) -> dict:
    """The per-sample efficiency fields stored in every sample record, from `Generation.stats`."""
    kept = int(stats["visual_tokens_kept"])
    per_layer = list(stats.get("visual_tokens_per_layer") or [kept] * text_config.num_hidden_layers)
    return {
        "visual_tokens_in": int(stats["visual_tokens_in"]),
        "visual_tokens_kept": kept,
        "visual_tokens_layer_mean": sum(per_layer) / len(per_layer),
        "prefill_tokens": int(stats["prefill_tokens"]),
        "prefill_flops": prefill_flops(int(stats["prefill_tokens"]), per_layer, text_config.hidden_size,
                                       text_config.intermediate_size),
        "new_tokens": int(stats.get("new_tokens", 0)),
    }


def aggregate_efficiency(records: list[dict]) -> dict:
    """The efficiency block of one task x reducer x keep run, computed from its sample records.

    Times are per batch (a record stores its batch's times and size, so Σ 1/batch_size counts batches).
    `prefill_ms` is the pipeline's: image processing, vision encoder, pre-LLM reduction and the LLM prefill
    forward; decode ms per token divides all decode time by all decode steps; `e2e_ms` is the whole call.
    """
    if not records:
        return {}
    n = len(records)
    batches = sum(1.0 / r["batch_size"] for r in records)
    decode_steps = sum(r["batch_decode_steps"] / r["batch_size"] for r in records)
    decode_ms = sum(r["batch_decode_ms"] / r["batch_size"] for r in records)
    tokens_in = sum(r["visual_tokens_in"] for r in records)
    return {
        "visual_tokens_in": sum(r["visual_tokens_in"] for r in records) / n,
        "visual_tokens_kept": sum(r["visual_tokens_kept"] for r in records) / n,
        "equivalent_visual_tokens": sum(r["visual_tokens_layer_mean"] for r in records) / n,
        "retention_layer_avg": sum(r["visual_tokens_layer_mean"] for r in records) / tokens_in if tokens_in else None,
        "prefill_tokens": sum(r["prefill_tokens"] for r in records) / n,
        "prefill_tflops": sum(r["prefill_flops"] for r in records) / n / 1e12,
        "flops_formula": FLOPS_FORMULA,
        "prefill_ms": sum(r["batch_prefill_ms"] / r["batch_size"] for r in records) / batches,
        "decode_ms_per_token": decode_ms / decode_steps if decode_steps else None,
        "e2e_ms": sum(r["batch_e2e_ms"] / r["batch_size"] for r in records) / batches,
        "time_unit": "per batch (warm-up excluded)",
        "batches": round(batches),
        "peak_memory_mb": max(r["peak_memory_mb"] for r in records),
        "peak_memory_kind": records[0]["peak_memory_kind"],
    }


class Timer:
    """Wall time of a block: CUDA events on a CUDA device (GPU work is asynchronous), perf_counter elsewhere."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.ms = 0.0

    def __enter__(self):
        if self.cuda:
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.ms = self._start.elapsed_time(self._end)
        else:
            self.ms = (time.perf_counter() - self._t0) * 1000.0
        return False


def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> tuple[float, str]:
    """(MB, what was measured): CUDA max allocated since the last reset, or the process's peak RSS on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss / 2**20 if sys.platform == "darwin" else rss / 1024), "process_peak_rss"
