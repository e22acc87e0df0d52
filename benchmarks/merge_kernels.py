"""Token-merging kernels: Triton vs the PyTorch reference, against a measured floor; ToMe ViT throughput.

GPU run (the numbers the issue asks for; bf16, N in {576, 2880, 16384}, D in {1024, 3584}, batch in {1, 8}):
    python benchmarks/merge_kernels.py --out benchmarks/merge_kernels.json
CPU smoke run (proves the script works; the timings mean nothing, Triton runs in its interpreter):
    TRITON_INTERPRET=1 python benchmarks/merge_kernels.py --quick --out /tmp/merge_kernels.json

Kernel rows time one merge step (match + merge, the metric is the hidden state itself as in ToMe-SD), one
unmerge_add, and one proportional attention (D/64 heads of 64 with a log-size bias; torch = SDPA with a float
mask; SDPA without any bias, i.e. FlashAttention, is recorded beside it as sdpa_without_bias_ms).
floor = max(bytes that must move / measured copy bandwidth, FLOPs / measured matmul rate); "% floor" = floor /
Triton time. Merge: the metric and x read once, y written once, 2·B·N_a·N_b·D similarity FLOPs. unmerge_add:
y and the residual read once, the output written once. Attention: q, k, v read and the output written once,
4·B·N²·D FLOPs.
DPC-KNN rows (PPE's merger, tokenomy.kernels.dpc_knn): one clustering + mean merge of every sample into
ceil(ratio·N) clusters, N up to --dpc-max-n (the reference holds several [B, N, N] float32 matrices). Floor: x read
and the merged tokens written once, and the 2·B·N²·D FLOPs of the distances at the matmul rate.
ViT rows: images/s of random-weight timm ViTs with and without the ToMe patch at several r.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import math

import torch
from tqdm import tqdm

from tokenomy.kernels import dispatch, tome

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--n", type=int, nargs="+", default=[576, 2880, 16384])
    parser.add_argument("--d", type=int, nargs="+", default=[1024, 3584])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--r-frac", type=float, default=0.25, help="tokens removed per merge, as a fraction of N")
    parser.add_argument("--vit", nargs="*",
                        default=["vit_base_patch16_224:8,13,16", "vit_large_patch14_clip_336:8,16,23"],
                        help="timm model[@image size]:r,r,... (random weights); give the flag alone to skip")
    parser.add_argument("--vit-batch", type=int, default=64)
    parser.add_argument("--vit-backends", nargs="+", choices=dispatch.BACKENDS,
                        help="merge backends for the patched ViTs (default: triton and torch on CUDA, torch elsewhere)")
    parser.add_argument("--dpc-ratio", type=float, default=0.45, help="DPC-KNN clusters per token (PPE's default)")
    parser.add_argument("--dpc-max-n", type=int, default=4096, help="largest N of the DPC-KNN rows")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(reference)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement off the GPU")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a tiny ViT: a CPU smoke run")
    parser.add_argument("--out", default="benchmarks/merge_kernels.json")
    args = parser.parse_args()
    if args.quick:
        args.n, args.d, args.batch, args.repeats, args.vit_batch = [64], [32], [1, 2], 3, 4
        args.vit = ["vit_tiny_patch16_224@64:2,4"] if args.vit else []
    return args


def timed_ms(fn, device, repeats):
    """Median milliseconds per call: triton's do_bench on CUDA (it flushes L2), wall clock elsewhere."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def copy_bandwidth(device, repeats):
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 22)
    src = torch.empty(numel, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * numel / (timed_ms(lambda: dst.copy_(src), device, repeats) * 1e-3)


def matmul_rate(device, dtype, repeats):
    """FLOP/s of a large batched matmul in the benchmark dtype (the best the similarity can hope for)."""
    batch, n, d = (8, 4096, 4096) if device.type == "cuda" else (1, 256, 256)
    a = torch.randn(batch, n, d, device=device, dtype=dtype)
    b = torch.randn(batch, d, n, device=device, dtype=dtype)
    return 2 * batch * n * n * d / (timed_ms(lambda: torch.bmm(a, b), device, repeats) * 1e-3)


def triton_available(device):
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def merge_step(backend):
    def step(x, r):
        plan = dispatch.match(x, r, backend=backend)
        return dispatch.merge(x, plan, backend=backend)

    return step


def kernel_rows(args, device, dtype, bandwidth, flop_rate):
    rows = []
    shapes = [(b, n, d) for b in args.batch for n in args.n for d in args.d]
    backends = ["torch"] + (["triton"] if triton_available(device) else [])
    compiled = torch.compile(merge_step("torch")) if args.compile else None
    element = torch.tensor([], dtype=dtype).element_size()
    for batch, n, d in tqdm(shapes, desc="merge kernels"):
        r = int(n * args.r_frac)
        x = torch.randn(batch, n, d, device=device, dtype=dtype)
        n_a, n_b = (n + 1) // 2, n // 2
        flops = 2 * batch * n_a * n_b * d
        merge_bytes = (2 * batch * n * d + batch * (n - r) * d) * element
        unmerge_bytes = (batch * (n - r) * d + 2 * batch * n * d) * element
        plan = dispatch.match(x, r, backend="torch")
        y, _ = dispatch.merge(x, plan, backend="torch")
        times = {}
        for backend in backends:
            times[("merge", backend)] = timed_ms(lambda: merge_step(backend)(x, r), device, args.repeats)
            times[("unmerge_add", backend)] = timed_ms(
                lambda: dispatch.unmerge_add(y, plan, x, backend=backend), device, args.repeats)
        if compiled is not None:
            times[("merge", "compiled")] = timed_ms(lambda: compiled(x, r), device, args.repeats)
        heads = max(1, d // 64)
        q, k, v = (torch.randn(batch, heads, n, d // heads, device=device, dtype=dtype) for _ in range(3))
        bias = torch.rand(batch, n, device=device).add(1).log()
        for backend in backends:
            times[("attention", backend)] = timed_ms(
                lambda: dispatch.attention(q, k, v, bias, backend=backend), device, args.repeats)
        no_bias_ms = timed_ms(lambda: dispatch.attention(q, k, v, backend="torch"), device, args.repeats)
        attention_bytes = 4 * batch * n * d * element
        attention_flops = 4 * batch * n * n * d
        for op, moved, op_flops in (("merge", merge_bytes, flops), ("unmerge_add", unmerge_bytes, 0),
                                    ("attention", attention_bytes, attention_flops)):
            floor_ms = max(moved / bandwidth, op_flops / flop_rate) * 1e3
            fused = times.get((op, "triton"))
            rows.append({
                "op": op, "batch": batch, "n": n, "d": d, "r": r, "dtype": args.dtype,
                "torch_ms": times[(op, "torch")], "compiled_ms": times.get((op, "compiled")), "triton_ms": fused,
                "speedup": times[(op, "torch")] / fused if fused else None,
                "floor_ms": floor_ms, "pct_of_floor": 100 * floor_ms / fused if fused else None,
                "triton_gbps": moved / (fused * 1e-3) / 1e9 if fused else None,
                "sdpa_without_bias_ms": no_bias_ms if op == "attention" else None,
            })
        if n <= args.dpc_max_n:
            rows.append(dpc_knn_row(args, x, backends, bandwidth, flop_rate, element))
    return rows


def dpc_knn_row(args, x, backends, bandwidth, flop_rate, element):
    batch, n, d = x.shape
    clusters = max(1, math.ceil(n * args.dpc_ratio))
    times = {backend: timed_ms(lambda: dispatch.dpc_knn(x, clusters, 5, backend=backend), x.device, args.repeats)
             for backend in backends}
    moved = (batch * n * d + batch * clusters * d) * element
    floor_ms = max(moved / bandwidth, 2 * batch * n * n * d / flop_rate) * 1e3
    fused = times.get("triton")
    return {
        "op": "dpc_knn", "batch": batch, "n": n, "d": d, "r": n - clusters, "dtype": args.dtype,
        "torch_ms": times["torch"], "compiled_ms": None, "triton_ms": fused,
        "speedup": times["torch"] / fused if fused else None,
        "floor_ms": floor_ms, "pct_of_floor": 100 * floor_ms / fused if fused else None,
        "triton_gbps": moved / (fused * 1e-3) / 1e9 if fused else None, "sdpa_without_bias_ms": None,
    }


def vit_rows(args, device, dtype):
    import timm

    rows = []
    for spec in args.vit:
        name, r_list = spec.split(":")
        name, _, img = name.partition("@")
        kwargs = {"img_size": int(img)} if img else {}
        if args.quick:
            kwargs.update(depth=4)
        model = timm.create_model(name, pretrained=False, **kwargs).to(device, dtype).eval()
        size = model.patch_embed.img_size
        images = torch.randn(args.vit_batch, 3, *size, device=device, dtype=dtype)
        backends = args.vit_backends or (["triton", "torch"] if device.type == "cuda" else ["torch"])
        settings = [(None, None)] + [(int(v), backend) for v in r_list.split(",") for backend in backends]
        for r, backend in tqdm(settings, desc=name):
            with torch.no_grad():
                if r is None:
                    ms = timed_ms(lambda: model(images), device, args.repeats)
                    tokens = None
                else:
                    with tome.patch(model, r=r, backend=backend) as handle:
                        ms = timed_ms(lambda: model(images), device, args.repeats)
                        merged = handle.state.size
                        tokens = handle.state.tokens[0] if merged is None else merged.shape[1]
            rows.append({"model": name, "batch": args.vit_batch, "r": r, "backend": backend, "final_tokens": tokens,
                         "images_per_s": args.vit_batch / (ms * 1e-3), "ms": ms})
    return rows


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_tables(kernels, vits, device_name):
    print(f"\nToken-merging kernels on {device_name}")
    header = f"{'op':<12}{'B':>3}{'N':>7}{'D':>6}{'r':>6}{'torch ms':>10}{'compiled':>10}{'triton ms':>10}" \
             f"{'speedup':>9}{'floor ms':>10}{'% floor':>9}{'GB/s':>8}"
    print(header)
    print("-" * len(header))
    for row in kernels:
        print(f"{row['op']:<12}{row['batch']:>3}{row['n']:>7}{row['d']:>6}{row['r']:>6}{row['torch_ms']:>10.3f}"
              f"{fmt(row['compiled_ms'], '.3f'):>10}{fmt(row['triton_ms'], '.3f'):>10}{fmt(row['speedup'], '.2f'):>9}"
              f"{row['floor_ms']:>10.3f}{fmt(row['pct_of_floor'], '.0f'):>9}{fmt(row['triton_gbps'], '.0f'):>8}")
    if vits:
        print(f"\nViT throughput with the ToMe patch (random weights) on {device_name}")
        print(f"{'model':<30}{'batch':>6}{'r':>5}{'backend':>9}{'final tokens':>14}{'images/s':>11}")
        for row in vits:
            print(f"{row['model']:<30}{row['batch']:>6}{fmt(row['r'], 'd'):>5}{row['backend'] or 'stock':>9}"
                  f"{fmt(row['final_tokens'], 'd'):>14}{row['images_per_s']:>11.1f}")


def main():
    args = parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()})"
    if device.type == "cpu" and triton_available(device):
        device_name += ", Triton in its interpreter"
    bandwidth, flop_rate = copy_bandwidth(device, args.repeats), matmul_rate(device, dtype, args.repeats)
    kernels = kernel_rows(args, device, dtype, bandwidth, flop_rate)
    vits = vit_rows(args, device, dtype) if args.vit else []
    print_tables(kernels, vits, device_name)
    print(f"\ncopy bandwidth {bandwidth / 1e9:.0f} GB/s, matmul rate {flop_rate / 1e12:.1f} TFLOP/s ({args.dtype})")
    result = {
        "device": device_name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "torch": torch.__version__,
        "triton": __import__("triton").__version__ if triton_available(device) else None,
        "copy_bandwidth_gbps": bandwidth / 1e9, "matmul_tflops": flop_rate / 1e12,
        "kernels": kernels, "vit": vits,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
