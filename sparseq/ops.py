"""``torch.library`` custom ops ``sparseq::*`` whose implementation is the reference.

Each op has a schema (from the type hints), the pure-PyTorch reference as its implementation
on every device, and a fake (meta) implementation for torch.compile that runs the same
reference checks on meta tensors, so shape errors read the same at trace time. GPU kernels
register as separate ops per backend (``sparseq::int8_mm_triton``, ...) with the same schema.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from . import reference as ref

LIB = "sparseq"


def _to_meta(a):
    return torch.empty(a.shape, dtype=a.dtype, device="meta") if isinstance(a, Tensor) else a


def _like(out, device: torch.device):
    if isinstance(out, tuple):
        return tuple(_like(o, device) for o in out)
    return torch.empty(out.shape, dtype=out.dtype, device=device)


def fake_from_reference(fn: Callable) -> Callable:
    """A fake impl that runs ``fn`` on meta copies of the inputs (shape checks included)."""

    def fake(*args):
        device = next(a.device for a in args if isinstance(a, Tensor))
        return _like(fn(*(_to_meta(a) for a in args)), device)

    return fake


def _op(name: str, fn: Callable) -> Callable:
    """Wrap ``fn`` (typed signature) as ``sparseq::name`` with its reference fake."""
    op = torch.library.custom_op(f"{LIB}::{name}", mutates_args=())(fn)
    op.register_fake(fake_from_reference(fn))
    return op


def _prune_24(w: Tensor, score: Optional[Tensor] = None) -> Tensor:
    return ref.prune_24(w, score)


def _compress_24(w: Tensor) -> Tuple[Tensor, Tensor]:
    return ref.compress_24(w)


def _decompress_24(values: Tensor, meta: Tensor) -> Tensor:
    return ref.decompress_24(values, meta)


def _prune_and_compress_24(w: Tensor, score: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    return ref.prune_and_compress_24(w, score, quantize=False)


def _prune_and_compress_24_int8(w: Tensor, score: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    return ref.prune_and_compress_24(w, score, quantize=True)


def _quantize_per_channel(w: Tensor) -> Tuple[Tensor, Tensor]:
    return ref.quantize_per_channel(w)


def _quantize_per_token(x: Tensor, smooth: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    return ref.quantize_per_token(x, smooth)


def _quantize_per_tensor(x: Tensor, scale: Tensor, smooth: Optional[Tensor] = None) -> Tensor:
    return ref.quantize_per_tensor(x, scale, smooth)


def _int8_mm(
    xq: Tensor,
    wq: Tensor,
    x_scale: Tensor,
    w_scale: Tensor,
    bias: Optional[Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    return ref.int8_mm(xq, wq, x_scale, w_scale, bias, out_dtype)


def _int8_weight_only_mm(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return ref.int8_weight_only_mm(x, wq, w_scale, bias)


def _sparse24_mm(x: Tensor, values: Tensor, meta: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return ref.sparse24_mm(x, values, meta, bias)


def _sparse24_int8_mm(
    x: Tensor,
    values: Tensor,
    meta: Tensor,
    w_scale: Tensor,
    x_scale: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    return ref.sparse24_int8_mm(x, values, meta, w_scale, x_scale, bias, out_dtype)


prune_24 = _op("prune_24", _prune_24)
compress_24 = _op("compress_24", _compress_24)
decompress_24 = _op("decompress_24", _decompress_24)
prune_and_compress_24 = _op("prune_and_compress_24", _prune_and_compress_24)
prune_and_compress_24_int8 = _op("prune_and_compress_24_int8", _prune_and_compress_24_int8)
quantize_per_channel = _op("quantize_per_channel", _quantize_per_channel)
quantize_per_token = _op("quantize_per_token", _quantize_per_token)
quantize_per_tensor = _op("quantize_per_tensor", _quantize_per_tensor)
int8_mm = _op("int8_mm", _int8_mm)
int8_weight_only_mm = _op("int8_weight_only_mm", _int8_weight_only_mm)
sparse24_mm = _op("sparse24_mm", _sparse24_mm)
sparse24_int8_mm = _op("sparse24_int8_mm", _sparse24_int8_mm)

REFERENCE_OPS = {
    "prune_24": prune_24,
    "compress_24": compress_24,
    "decompress_24": decompress_24,
    "prune_and_compress_24": prune_and_compress_24,
    "prune_and_compress_24_int8": prune_and_compress_24_int8,
    "quantize_per_channel": quantize_per_channel,
    "quantize_per_token": quantize_per_token,
    "quantize_per_tensor": quantize_per_tensor,
    "int8_mm": int8_mm,
    "int8_weight_only_mm": int8_weight_only_mm,
    "sparse24_mm": sparse24_mm,
    "sparse24_int8_mm": sparse24_int8_mm,
}
"""Every reference op by name: backends register ``<name>_<backend>`` with the same schema."""
