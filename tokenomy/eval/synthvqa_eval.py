"""Score a Pipeline on synthvqa: exact-match accuracy overall and per question type."""
from __future__ import annotations

from collections import defaultdict

from tqdm import tqdm

from tokenomy.eval.synthvqa import QUESTION_TYPES, is_correct

MAX_NEW_TOKENS = 4  # every synthvqa answer is one word: a few tokens, then the end-of-turn token


def evaluate(pipeline, items, batch_size: int = 16, desc: str = "synthvqa") -> dict:
    """{"overall": %, "per_type": {type: %}, "count": n, "visual_tokens_kept": mean} over `items` (dicts from
    `synthvqa.items`, or any vqa-jsonl dicts with a PIL image and a "type")."""
    items = list(items)
    correct, total, kept = defaultdict(int), defaultdict(int), []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, leave=False):
        chunk = items[start : start + batch_size]
        outputs = pipeline.generate([i["image"] for i in chunk], [i["question"] for i in chunk], max_new_tokens=MAX_NEW_TOKENS)
        for item, output in zip(chunk, outputs):
            kind = item.get("type", "all")
            total[kind] += 1
            correct[kind] += is_correct(output.text, item["answers"])
            kept.append(output.stats["visual_tokens_kept"])
    order = [t for t in QUESTION_TYPES if t in total] + sorted(set(total) - set(QUESTION_TYPES))
    return dict(
        overall=100.0 * sum(correct.values()) / max(1, sum(total.values())),
        per_type={kind: 100.0 * correct[kind] / total[kind] for kind in order},
        count=sum(total.values()),
        visual_tokens_kept=sum(kept) / max(1, len(kept)),
    )
