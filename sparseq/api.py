"""The public functional API: thin wrappers that go through the registered ``sparseq::*`` ops.

Going through the ops (rather than calling the reference directly) keeps these functions
visible to torch.compile as single ops and lets device backends take over later.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import ops, reference
from ._checks import check_tensor


def _tensors(**named: Optional[Tensor]) -> None:
    """Clear TypeErrors for non-tensor arguments before they reach the op's schema parser."""
    for name, t in named.items():
        if t is not None:
            check_tensor(name, t)


def prune_24(w: Tensor, score: Optional[Tensor] = None) -> Tensor:
    """Bool mask keeping the 2 largest of each group of 4 along K, by ``|w|`` or ``score``."""
    _tensors(w=w, score=score)
    return ops.prune_24(w, score)


def is_24_sparse(w: Tensor) -> bool:
    """True when every group of 4 along K of ``w[N, K]`` holds at most 2 non-zeros."""
    return reference.is_24_sparse(w)


def compress_24(w: Tensor) -> Tuple[Tensor, Tensor]:
    """2:4-sparse ``w[N, K]`` -> canonical ``(values[N, K/2], meta uint8[N, K/8])``."""
    _tensors(w=w)
    return ops.compress_24(w)


def decompress_24(values: Tensor, meta: Tensor) -> Tensor:
    """Canonical ``(values, meta)`` -> dense ``w[N, K]``."""
    _tensors(values=values, meta=meta)
    return ops.decompress_24(values, meta)


def prune_and_compress_24(w: Tensor, score: Optional[Tensor] = None, quantize: bool = False) -> Tuple[Tensor, ...]:
    """Prune to 2:4 and compress; with ``quantize`` also int8 per channel: ``(q, meta, scale)``."""
    _tensors(w=w, score=score)
    if quantize:
        return ops.prune_and_compress_24_int8(w, score)
    return ops.prune_and_compress_24(w, score)


def quantize_per_channel(w: Tensor) -> Tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: ``(q int8[N, K], scale fp32[N])``."""
    _tensors(w=w)
    return ops.quantize_per_channel(w)


def quantize_per_token(x: Tensor, smooth: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Dynamic per-token int8 of ``x[M, K] / smooth``: ``(q int8[M, K], scale fp32[M])``."""
    _tensors(x=x, smooth=smooth)
    return ops.quantize_per_token(x, smooth)


def quantize_per_tensor(x: Tensor, scale: Tensor, smooth: Optional[Tensor] = None) -> Tensor:
    """Static per-tensor int8 of ``x[M, K] / smooth`` with a calibrated ``scale`` fp32[1]."""
    _tensors(x=x, scale=scale, smooth=smooth)
    return ops.quantize_per_tensor(x, scale, smooth)


def int8_mm(
    xq: Tensor,
    wq: Tensor,
    x_scale: Tensor,
    w_scale: Tensor,
    bias: Optional[Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """W8A8 matmul with int32 accumulation and fused per-token x per-channel scales and bias."""
    _tensors(xq=xq, wq=wq, x_scale=x_scale, w_scale=w_scale, bias=bias)
    return ops.int8_mm(xq, wq, x_scale, w_scale, bias, out_dtype)


def int8_weight_only_mm(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Float ``x`` times int8 per-channel weights, output in ``x.dtype``."""
    _tensors(x=x, wq=wq, w_scale=w_scale, bias=bias)
    return ops.int8_weight_only_mm(x, wq, w_scale, bias)


def sparse24_mm(x: Tensor, values: Tensor, meta: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ W^T + bias`` with ``W`` in canonical compressed 2:4 form."""
    _tensors(x=x, values=values, meta=meta, bias=bias)
    return ops.sparse24_mm(x, values, meta, bias)


def sparse24_int8_mm(
    x: Tensor,
    values: Tensor,
    meta: Tensor,
    w_scale: Tensor,
    x_scale: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """2:4 int8 weight: W8A8 when ``x`` is int8 (with ``x_scale``), weight-only when float."""
    _tensors(x=x, values=values, meta=meta, w_scale=w_scale, x_scale=x_scale, bias=bias)
    return ops.sparse24_int8_mm(x, values, meta, w_scale, x_scale, bias, out_dtype)
