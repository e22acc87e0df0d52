"""Pick the Triton or the PyTorch implementation of the token-merging functions, per call.

Order of precedence: the ``backend=`` argument, then the ``TOKENOMY_MERGE_BACKEND`` environment variable
(``triton`` or ``torch``), then the device: Triton for CUDA tensors when triton is installed, the reference
for everything else.
Forcing ``triton`` on CPU tensors works only under ``TRITON_INTERPRET=1`` (set before merge_triton is imported),
otherwise it raises ShapeError. The Triton kernels are inference-only: merge, unmerge and attention calls
whose inputs require gradients (with autograd on) always take the reference, which autograd can follow.
The functions keep the signatures documented in :mod:`tokenomy.kernels.merge`.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional, Sequence

import torch

from tokenomy.errors import UnknownNameError
from tokenomy.kernels import merge as reference
from tokenomy.kernels.merge import MergePlan, log_size_bias, partition

BACKENDS = ("torch", "triton")
_HAS_TRITON = importlib.util.find_spec("triton") is not None  # triton is a Linux-only dependency
ENV_VAR = "TOKENOMY_MERGE_BACKEND"


def resolve_backend(tensor: torch.Tensor, backend: Optional[str] = None) -> str:
    """The backend a call on ``tensor`` uses: argument, then environment, then device."""
    chosen = backend or os.environ.get(ENV_VAR) or ("triton" if tensor.is_cuda and _HAS_TRITON else "torch")
    if chosen not in BACKENDS:
        raise UnknownNameError("merge backend", chosen, BACKENDS)
    return chosen


def _impl(tensor: torch.Tensor, backend: Optional[str], *differentiable: Optional[torch.Tensor]):
    if resolve_backend(tensor, backend) == "torch":
        return reference
    # the Triton kernels have no backward: a call that needs gradients must not silently cut them
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (tensor, *differentiable)):
        return reference
    from tokenomy.kernels import merge_triton  # triton is imported only when a call needs it

    return merge_triton


def match(metric: torch.Tensor, r: int, protected: Optional[Sequence[int]] = (), mode: str = "alternate", hw=None,
          stride=(2, 2), k: int = 2, generator: Optional[torch.Generator] = None,
          backend: Optional[str] = None) -> MergePlan:
    """Bipartite soft matching: which r tokens merge into which (see tokenomy.kernels.merge)."""
    return _impl(metric, backend).match(metric, r, protected, mode, hw, stride, k, generator)


def merge(x: torch.Tensor, plan: MergePlan, size: Optional[torch.Tensor] = None, backend: Optional[str] = None):
    """Size-weighted merge: (y [B, N-r, D], size_y [B, N-r] float32)."""
    return _impl(x, backend, size).merge(x, plan, size)


def unmerge(y: torch.Tensor, plan: MergePlan, backend: Optional[str] = None) -> torch.Tensor:
    """Every original position gets the merged row it went into: [B, N-r, D] -> [B, N, D]."""
    return _impl(y, backend).unmerge(y, plan)


def unmerge_add(y: torch.Tensor, plan: MergePlan, residual: torch.Tensor, backend: Optional[str] = None):
    """residual + unmerge(y), rounded once to residual's dtype."""
    return _impl(y, backend, residual).unmerge_add(y, plan, residual)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_log_size: Optional[torch.Tensor] = None,
              causal: bool = False, dropout_p: float = 0.0, backend: Optional[str] = None) -> torch.Tensor:
    """Attention with an optional per-key log-size bias; calls the Triton kernel does not cover use the reference."""
    impl = _impl(q, backend, k, v, key_log_size)
    if impl is not reference and not impl.attention_supported(q, causal, dropout_p):
        impl = reference
    return impl.attention(q, k, v, key_log_size, causal, dropout_p)


def dpc_knn(x: torch.Tensor, clusters: int, k: int = 5, backend: Optional[str] = None):
    """DPC-KNN clustering + mean merge of every sample of x [B, N, C] (see tokenomy.kernels.dpc_knn); inference only."""
    if resolve_backend(x, backend) == "torch":
        from tokenomy.kernels import dpc_knn as dpc_reference

        return dpc_reference.dpc_knn(x, clusters, k)
    from tokenomy.kernels import dpc_knn_triton  # triton is imported only when a call needs it

    return dpc_knn_triton.dpc_knn(x, clusters, k)


__all__ = ["BACKENDS", "ENV_VAR", "MergePlan", "attention", "dpc_knn", "log_size_bias", "match", "merge", "partition",
           "resolve_backend", "unmerge", "unmerge_add"]
