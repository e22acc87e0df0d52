"""Compile every DPC-KNN kernel for an H100 (sm_90) without a GPU; print the local-memory spill of each as JSON.

Run by tests/test_kernels_dpc_knn.py in a fresh process, for the reason given in tests/kernels_compile_check.py.
"""
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels_compile_check import compile_for_hopper  # noqa: E402

import tokenomy.kernels.dpc_knn_triton as fused  # noqa: E402


def main():
    types = {"x": "*bf16", "merged": "*bf16", "dist": "*fp32", "density": "*fp32", "dist_max": "*fp32", "delta": "*fp32",
             "score": "*fp32", "parent": "*i64", "centres": "*i64", "centre_slot": "*i64", "assign": "*i64",
             "members": "*i64", "start": "*i64", "count": "*i64", "n": "i32", "c": "i32", "k": "i32", "m": "i32",
             "scale": "fp32"}
    spills = {"distance": compile_for_hopper(fused._distance_kernel, types, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_C": 16})}
    for row in (1024, fused.MAX_TOKENS):  # the host launches one program per token with its whole distance row
        spills[f"density_{row}"] = compile_for_hopper(fused._density_kernel, types, {"BLOCK_N": row})
        spills[f"parent_{row}"] = compile_for_hopper(fused._parent_kernel, types, {"BLOCK_N": row})
    spills["assign"] = compile_for_hopper(fused._assign_kernel, types, {"BLOCK_N": 64})
    spills["merge"] = compile_for_hopper(fused._merge_kernel, types, {"BLOCK_C": 128})
    json.dump(spills, sys.stdout)


if __name__ == "__main__":
    main()
