"""FLOPs formula, layer-averaged retention, per-batch time aggregation, CPU timer and peak memory."""
import time

import pytest

from tokenomy.eval.efficiency import Timer, aggregate_efficiency, layer_flops, peak_memory, prefill_flops


def test_layer_flops_fastv_convention():
    n, d, m = 10, 4, 8
    assert layer_flops(n, d, m) == 4 * 10 * 16 + 2 * 100 * 4 + 2 * 10 * 4 * 8


def test_prefill_flops_counts_text_plus_per_layer_visual_tokens():
    # 5 text tokens, FastV-like: two layers see 20 visual tokens, two see 6
    assert prefill_flops(25, [20, 20, 6, 6], 4, 8) == 2 * layer_flops(25, 4, 8) + 2 * layer_flops(11, 4, 8)
    assert prefill_flops(25, [20] * 4, 4, 8) == 4 * layer_flops(25, 4, 8)


def record(size, prefill, decode, steps, kept_mean, tokens_in=20):
    return {"batch_size": size, "batch_prefill_ms": prefill, "batch_decode_ms": decode, "batch_decode_steps": steps,
            "batch_e2e_ms": prefill + decode, "visual_tokens_in": tokens_in, "visual_tokens_kept": 6,
            "visual_tokens_layer_mean": kept_mean, "prefill_tokens": 30, "prefill_flops": 1e12,
            "peak_memory_mb": 10.0 * size, "peak_memory_kind": "process_peak_rss"}


def test_aggregation_is_per_batch_and_per_decode_step():
    # one batch of 2 samples (prefill 30 ms, 4 decode steps in 40 ms) and one batch of 1 (prefill 10 ms, 1 step in 20 ms)
    records = [record(2, 30.0, 40.0, 4, 13.0), record(2, 30.0, 40.0, 4, 13.0), record(1, 10.0, 20.0, 1, 6.0)]
    eff = aggregate_efficiency(records)
    assert eff["batches"] == 2
    assert eff["prefill_ms"] == pytest.approx(20.0)  # (30 + 10) / 2 batches
    assert eff["decode_ms_per_token"] == pytest.approx(60.0 / 5)  # all decode time over all decode steps
    assert eff["e2e_ms"] == pytest.approx((70.0 + 30.0) / 2)
    assert eff["equivalent_visual_tokens"] == pytest.approx(32.0 / 3)
    assert eff["retention_layer_avg"] == pytest.approx(32.0 / 60.0)
    assert eff["prefill_tflops"] == pytest.approx(1.0) and eff["peak_memory_mb"] == 20.0


def test_cpu_timer_and_peak_memory():
    with Timer("cpu") as timer:
        time.sleep(0.05)
    assert 45.0 <= timer.ms < 1000.0
    megabytes, kind = peak_memory("cpu")
    assert kind == "process_peak_rss" and megabytes > 10.0
