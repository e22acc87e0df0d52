"""PPE on ref-qwen-e2e over synthvqa: the same DPC-KNN merge with three position schemes, per question type.

- ppe K=2: a merged token carries 2 member positions, one per half of every M-RoPE axis band (ref-qwen-e2e's sections
  [4, 6, 6] carry K in {1, 2}).
- one position (K=1): a merged token rotates by one member's TRUE (t, h, w) (its last member), like P-keep.
- renumbered: the Chat-UniVi baseline: after merging, the whole sequence gets sequential positions 0..L-1 on all
  three axes, and decoding continues from L.
Budgets: `keep` merged tokens of ref-qwen-e2e's 64 per image (default 16 / 7 / 4: about 25 / 11 / 6 %).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/ppe_positions.py --scenes 40 --out benchmarks/ppe_positions.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch

import tokenomy
from tokenomy.eval import synthvqa
from tokenomy.eval.synthvqa_eval import evaluate
from tokenomy.reducers.ppe import PPE, SubBandRotary, rotary_bands


class RenumberedRotary:
    """Sequential positions on all three axes for one request of batch 1: 0..L-1 in prefill, then L, L+1, ..."""

    def __init__(self, sections):
        self.rotary = SubBandRotary(sections, 1)
        self.next = 0

    def __call__(self, rotary_emb, hidden, position_ids):
        if position_ids.shape[-3] != 1:
            raise ValueError("the renumbered baseline runs one request at a time")
        length = position_ids.shape[-2]
        sequential = torch.arange(self.next, self.next + length, device=position_ids.device)
        self.next += length
        return self.rotary(rotary_emb, hidden, sequential.view(1, 1, length, 1).expand(3, -1, -1, -1))


class RenumberedPPE(PPE):
    def __init__(self, keep=None):
        super().__init__(keep=keep, ppe_k=1)

    def multi_rotary(self, text_config):
        return RenumberedRotary(rotary_bands(text_config))


def variants(keep):
    return {"ppe K=2": PPE(keep=keep, ppe_k=2), "one position (K=1)": PPE(keep=keep, ppe_k=1),
            "renumbered": RenumberedPPE(keep=keep)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ref-qwen-e2e")
    parser.add_argument("--keep", type=int, nargs="+", default=[16, 7, 4])
    parser.add_argument("--scenes", type=int, default=40, help="test scenes (7 questions each, one per type)")
    parser.add_argument("--out", default="benchmarks/ppe_positions.json")
    args = parser.parse_args()
    items = list(synthvqa.items("test", num_scenes=args.scenes))
    rows = []
    for keep in args.keep:
        for name, reducer in variants(keep).items():
            pipeline = tokenomy.load(args.model, reducer)
            result = evaluate(pipeline, items, batch_size=1, desc=f"{name} keep={keep}")
            rows.append(dict(variant=name, keep=keep, **result))
            print(f"keep {keep:>3} {name:<20} overall {result['overall']:5.1f} "
                  + " ".join(f"{kind} {value:5.1f}" for kind, value in result["per_type"].items()), flush=True)
    with open(args.out, "w") as handle:
        json.dump(dict(model=args.model, questions=len(items), machine=platform.processor() or platform.machine(),
                       date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), rows=rows),
                  handle, indent=2)


if __name__ == "__main__":
    main()
