"""Shared tensor primitives that reducers and adapters reuse (one copy each): attention rows from q/k, rotary,
greedy max-min diversity, normalised entropy, attention received inside windows."""
from tokenomy.ops.attention import apply_rotary, attention_row, rotate_half
from tokenomy.ops.diversity import cosine_distance, max_min_diversity
from tokenomy.ops.entropy import normalized_entropy
from tokenomy.ops.window_attention import window_attention_received

__all__ = ["apply_rotary", "attention_row", "cosine_distance", "max_min_diversity", "normalized_entropy", "rotate_half",
           "window_attention_received"]
