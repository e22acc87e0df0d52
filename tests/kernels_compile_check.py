"""Compile every merge kernel for an H100 (sm_90) without a GPU; print the local-memory spill of each as JSON.

Run by tests/test_kernels_compile.py in a fresh process: the kernels must be real JIT functions, so
TRITON_INTERPRET must be off before tokenomy.kernels.merge_triton is imported.
"""
import json
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import tokenomy.kernels.merge_triton as fused  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
# launches pass these as multiples of 16 in practice (channel counts, strides); pointers are 16-byte aligned
ALIGNED = {"c", "d", "sq_b", "sq_h", "sq_n", "sk_b", "sk_h", "sk_n", "sv_b", "sv_h", "sv_n"}


def spill_bytes(cubin: bytes) -> int:
    if not os.path.exists(CUOBJDUMP):
        return 0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", handle.name], capture_output=True, text=True,
                               check=True).stdout
    return sum(int(field.split(":")[1]) for field in usage.split() if field.startswith("STACK:"))


def compile_for_hopper(kernel, types, constants, num_warps=4):
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if signature[name].startswith("*") or name in ALIGNED}
    source = ASTSource(kernel, signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": 3})
    return spill_bytes(compiled.asm["cubin"])


def main():
    dtype = "bf16"
    index = {name: "*i64" for name in ("a_idx", "b_idx", "node_idx", "unm_idx", "src_idx", "dst_start", "dst_count",
                                       "out_row")}
    ints = {name: "i32" for name in ("rows", "c", "d", "n", "n_a", "n_b", "n_q", "n_kv", "n_out", "n_protected", "r",
                                     "heads", "sq_b", "sq_h", "sq_n", "sk_b", "sk_h", "sk_n", "sv_b", "sv_h", "sv_n")}
    types = {**index, **ints, "metric": f"*{dtype}", "inv_norm": "*fp32", "node_max": "*fp32", "eps": "fp32",
             "scale": "fp32", "x": f"*{dtype}", "size": "*fp32", "y": f"*{dtype}", "size_y": "*fp32",
             "residual": f"*{dtype}", "out": f"*{dtype}", "q": f"*{dtype}", "k": f"*{dtype}", "v": f"*{dtype}",
             "bias": "*fp32"}
    spills = {"inv_norm": compile_for_hopper(fused._inv_norm_kernel, types, {"BLOCK_T": 32, "BLOCK_C": 256})}
    for batch, n_a in ((1, 288), (8, 8192)):
        block_m, block_n, block_c, warps = fused._match_config(batch, n_a)
        constants = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_C": block_c, "EVEN_C": True, "UPCAST": False,
                     "DOT_PRECISION": "tf32"}
        spills[f"match_{block_m}x{block_n}"] = compile_for_hopper(fused._match_kernel, types, constants, warps)
    spills["select_64"] = compile_for_hopper(fused._select_kernel, types, {"BLOCK_A": 64, "BLOCK_B": 64})
    spills["merge"] = compile_for_hopper(fused._merge_kernel, types, {"HAS_SIZE": True, "BLOCK_D": 1024})
    spills["unmerge_add"] = compile_for_hopper(fused._unmerge_kernel, types, {"HAS_RESIDUAL": True, "BLOCK_D": 1024})
    spills["attention"] = compile_for_hopper(fused._attention_kernel, types, {
        "HAS_BIAS": True, "UPCAST": False, "DOT_PRECISION": "tf32", "HEAD_DIM": 64, "BLOCK_M": 64, "BLOCK_N": 64})
    json.dump(spills, sys.stdout)


if __name__ == "__main__":
    main()
