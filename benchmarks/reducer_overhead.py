"""What each registered reducer costs, and what FlowCut saves, in the prefill at K of 576 visual tokens.

For every registered reducer at keep=K (default 64) and each batch size (default 1 and 8), on random weights:
- its own time: the wall time of its `select` calls (the stage records), as a share of the pruned prefill;
- the end-to-end prefill: processing + vision encoder (with the signals the reducer asked for) + reducer + projector
  + assembly + the LLM prefill (`Pipeline.generate` with one new token: its prepare and first forward);
- against the truncation bound: the same model fed the first K visual tokens, no reducer (a stage that keeps
  tokens 0..K-1 before the projector, costing nothing), and against `none` (all 576).
Shapes: on the CPU a CLIP ViT-L/14-336 tower (LLaVA-1.5's, read at hidden_states[-2]) with a Qwen2-0.5B-shaped Llama,
fp32; on a GPU LLaVA-1.5-7B (CLIP ViT-L/14-336 + Llama-2-7B shapes), bf16. Speed does not depend on the weights.

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/reducer_overhead.py --out benchmarks/reducer_overhead.json
    PYTHONPATH=. python benchmarks/reducer_overhead.py --device cuda --batches 1,8   # LLaVA-1.5-7B shapes, bf16

It prints a table and writes JSON (machine, shapes, every timing). Times are medians over --repeats runs after
--warmup runs. Besides wall time it records the process CPU time of each run (prepare + prefill + one decode step),
which a machine shared with other jobs inflates much less; with OMP_NUM_THREADS=1 it is the work done.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone

import numpy as np
import torch
from PIL import Image

import tokenomy
from tokenomy.reducers import Reducer, Selection, Site, available
from tokenomy.vlm.pipeline import Pipeline

SHAPES = {
    "cpu": dict(llm="Qwen2-0.5B-shaped Llama", hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2,
                vocab=151936, rope_theta=1e6, dtype="float32"),
    "gpu": dict(llm="Llama-2-7B (LLaVA-1.5-7B)", hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32,
                vocab=32000, rope_theta=1e4, dtype="bfloat16"),
}
PROMPT = "Describe the picture in detail, please."


class FirstK(Reducer):
    """The truncation bound: tokens 0..K-1, chosen without looking at anything."""

    name = "truncation"
    site = Site.PRE_PROJECTOR

    def select(self, image):
        return Selection.from_indices(image, torch.arange(self.budget(image)))


def build_model(shapes: dict, device: str):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from tokenomy.vlm.tiny import LLAVA_CHAT_TEMPLATE, byte_tokenizer

    tokenizer = byte_tokenizer(LLAVA_CHAT_TEMPLATE)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = dict(model_type="llama", vocab_size=shapes["vocab"], hidden_size=shapes["hidden"],
                intermediate_size=shapes["intermediate"], num_hidden_layers=shapes["layers"],
                num_attention_heads=shapes["heads"], num_key_value_heads=shapes["kv_heads"], max_position_embeddings=4096,
                rope_theta=shapes["rope_theta"], **ids)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=576, vision_feature_layer=-2, vision_feature_select_strategy="default", **ids)
    torch.manual_seed(0)
    dtype = getattr(torch, shapes["dtype"])
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(dtype).eval()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


def images(count: int) -> list:
    rng = np.random.RandomState(0)
    return [Image.fromarray((rng.rand(336, 336, 3) * 255).astype("uint8")) for _ in range(count)]


def time_plan(pipeline: Pipeline, batch: int, warmup: int, repeats: int) -> dict:
    pictures, prompts = images(batch), [PROMPT] * batch
    for _ in range(warmup):
        pipeline.generate(pictures, prompts, max_new_tokens=1, eos_token_id=None)
    prefill, own, cpu, kept = [], [], [], None
    for _ in range(repeats):
        start = time.process_time()
        stats = pipeline.generate(pictures, prompts, max_new_tokens=1, eos_token_id=None)[0].stats
        cpu.append((time.process_time() - start) * 1e3)
        prefill.append(stats["prefill_ms"])
        own.append(sum(stage["ms"] for stage in stats["stages"]))
        kept = stats["visual_tokens_per_layer"]
    return dict(prefill_ms=statistics.median(prefill), own_ms=statistics.median(own), cpu_ms=statistics.median(cpu),
                visual_tokens_per_layer=kept, runs_prefill_ms=prefill, runs_own_ms=own, runs_cpu_ms=cpu)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--batches", default=None, help="comma list (default: 1,8 on a GPU; 1 on the CPU, where one "
                        "batch-1 prefill of these shapes already takes tens of seconds)")
    parser.add_argument("--reducers", default=None, help="comma list (default: every registered reducer)")
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/reducer_overhead.json")
    args = parser.parse_args()

    gpu = args.device.startswith("cuda")
    shapes = SHAPES["gpu" if gpu else "cpu"]
    batches = [int(b) for b in (args.batches or ("1,8" if gpu else "1")).split(",")]
    start = time.perf_counter()
    model, processor = build_model(shapes, args.device)
    build_s = time.perf_counter() - start
    reducers = args.reducers.split(",") if args.reducers else [name for name in available(images=True) if name != "none"]
    plans = [("none", "none", None), ("truncation", FirstK(keep=args.keep), None)] + [(name, name, args.keep) for name in reducers]
    rows = []
    for batch in batches:
        for label, reducer, keep in plans:
            pipeline = Pipeline(model, processor, tokenomy.reducers.build_plan(reducer, keep=keep) if keep else reducer)
            result = time_plan(pipeline, batch, args.warmup, args.repeats)
            rows.append(dict(reducer=label, batch=batch, keep=None if label == "none" else args.keep, **result))
            print(f"  {label:>14} batch {batch}: prefill {result['prefill_ms']:9.1f} ms, own {result['own_ms']:7.2f} ms", flush=True)
    bound = {row["batch"]: row["prefill_ms"] for row in rows if row["reducer"] == "truncation"}
    bound_cpu = {row["batch"]: row["cpu_ms"] for row in rows if row["reducer"] == "truncation"}
    for row in rows:
        row["own_share_of_prefill"] = row["own_ms"] / row["prefill_ms"]
        row["prefill_vs_truncation"] = row["prefill_ms"] / bound[row["batch"]]
        row["cpu_vs_truncation"] = row["cpu_ms"] / bound_cpu[row["batch"]]

    print(f"\nK = {args.keep} of 576, {shapes['dtype']}, CLIP ViT-L/14-336 + {shapes['llm']}, device {args.device}")
    print("| reducer | batch | LLM layers' visual tokens | prefill ms | own ms | own / prefill | prefill / truncation "
          "| CPU ms | CPU / truncation |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        per_layer = row["visual_tokens_per_layer"]
        tokens = f"{per_layer[0]}" if len(set(per_layer)) == 1 else f"{per_layer[0]}..{per_layer[-1]}"
        print(f"| {row['reducer']} | {row['batch']} | {tokens} | {row['prefill_ms']:.1f} | {row['own_ms']:.2f} | "
              f"{100 * row['own_share_of_prefill']:.2f}% | {row['prefill_vs_truncation']:.3f} | {row['cpu_ms']:.0f} | "
              f"{row['cpu_vs_truncation']:.3f} |")
    report = dict(
        machine=dict(platform=platform.platform(), processor=platform.processor(), torch=torch.__version__,
                     threads=torch.get_num_threads(), device=args.device,
                     gpu=torch.cuda.get_device_name() if gpu else None),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), shapes=shapes, keep=args.keep,
        warmup=args.warmup, repeats=args.repeats, model_build_s=build_s, rows=rows,
    )
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
