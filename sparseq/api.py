"""The public functional API: ``sparseq.<name>`` calls the device-dispatched op ``sparseq::<name>``.

Each function has the signature and docstring of its reference function (the one place they
are written, ``sparseq.reference``); the wrapper adds clear TypeErrors for non-tensor
arguments before they reach the op's schema parser. On CUDA tensors the op runs sparseq's
kernels (Triton where it has one), elsewhere the reference.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional, Tuple

from torch import Tensor

from . import ops, reference
from ._checks import check_tensor


def _public(name: str) -> Callable:
    """``sparseq.<name>``: the op ``sparseq::<name>`` behind the reference's signature and doc."""
    op = ops.PUBLIC_OPS[name]
    fn = ops.REFERENCE_FUNCTIONS[name]
    signature = inspect.signature(fn)
    tensors = [p for p, param in signature.parameters.items() if "Tensor" in str(param.annotation)]

    @functools.wraps(fn)
    def call(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        for p in tensors:
            if bound.arguments[p] is not None:
                check_tensor(p, bound.arguments[p])
        return op(*bound.args)

    call.__module__ = __name__
    return call


prune_24 = _public("prune_24")
compress_24 = _public("compress_24")
decompress_24 = _public("decompress_24")
quantize_per_channel = _public("quantize_per_channel")
quantize_per_token = _public("quantize_per_token")
quantize_per_tensor = _public("quantize_per_tensor")
int8_mm = _public("int8_mm")
int8_weight_only_mm = _public("int8_weight_only_mm")
sparse24_mm = _public("sparse24_mm")
sparse24_int8_mm = _public("sparse24_int8_mm")
_prune_and_compress = _public("prune_and_compress_24")
_prune_and_compress_int8 = _public("prune_and_compress_24_int8")


def is_24_sparse(w: Tensor) -> bool:
    """True when every group of 4 along K of ``w[N, K]`` holds at most 2 non-zeros."""
    return reference.is_24_sparse(w)


def prune_and_compress_24(w: Tensor, score: Optional[Tensor] = None, quantize: bool = False) -> Tuple[Tensor, ...]:
    """Prune to 2:4 and compress; with ``quantize`` also int8 per channel: ``(q, meta, scale)``."""
    return (_prune_and_compress_int8 if quantize else _prune_and_compress)(w, score)
