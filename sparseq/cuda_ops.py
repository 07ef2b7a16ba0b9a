"""Schemas, fakes and CPU reference impls of the ops that the compiled CUDA extensions implement.

The C++ side only adds ``TORCH_LIBRARY_IMPL(sparseq, CUDA, m)``; the schemas live here so
that torch.compile and meta tensors know them even where the extension is not built. The CPU
implementations are the pure-PyTorch references (``sparseq.cutlass_layout`` + ``sparseq.reference``),
so every op runs, and passes ``opcheck``, without a GPU.

CUTLASS 2:4 ops (the weight is the sparse operand: ``Y^T = W . X^T``)
    ``prepare_sparse24_cutlass(values, meta)`` converts the canonical ``(values, meta)`` of a
    weight to the metadata layout of this GPU's kernels (sm90a: wgmma.sp, sm80: mma.sp), once,
    at load time; ``values`` are used as they are. Then
    ``sparse24_mm_cutlass(x, values, prepared_meta, bias)`` computes ``x @ W^T + bias`` and
    ``sparse24_int8_mm_cutlass(xq, qvalues, prepared_meta, w_scale, x_scale, bias, out_dtype)``
    the W8A8 product with per-token x per-channel scales and bias fused in the epilogue.
    Shapes: ``N % 64 == 0``, ``K % 128 == 0``, any ``M >= 1``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import cutlass_layout as cl
from . import ops
from . import reference as ref
from ._checks import check_tensor

_lib = torch.library.Library("sparseq", "FRAGMENT")

# The GEMMs take the schemas of the public ops (written once, in sparseq.reference); their
# ``meta`` argument is the prepared (CUTLASS) layout instead of the canonical one.
_MM = ops.schema_of("sparse24_mm")
_INT8_MM = ops.schema_of("sparse24_int8_mm")
_TO = "(Tensor values, Tensor meta) -> Tensor"
_FROM = "(Tensor values, Tensor meta_cutlass) -> Tensor"

CUDA_OP_SCHEMAS: dict = {
    # registered by sparseq._C (routes to the sm90a kernels of sparseq._C_sm90a on Hopper)
    "sparse24_mm_cutlass": _MM,
    "sparse24_int8_mm_cutlass": _INT8_MM,
    "sparse24_meta_to_cutlass_sm80": _TO,
    "sparse24_meta_from_cutlass_sm80": _FROM,
    # registered by sparseq._C_sm90a
    "sparse24_meta_to_cutlass_sm90": _TO,
    "sparse24_meta_from_cutlass_sm90": _FROM,
    "_sparse24_mm_cutlass_sm90a": _MM,
    "_sparse24_int8_mm_cutlass_sm90a": _INT8_MM,
}
"""name -> schema string of every op the CUDA extensions register."""

CUDA_OP_EXTENSION = {
    "sparse24_mm_cutlass": "sparseq._C",
    "sparse24_int8_mm_cutlass": "sparseq._C",
    "sparse24_meta_to_cutlass_sm80": "sparseq._C",
    "sparse24_meta_from_cutlass_sm80": "sparseq._C",
    "sparse24_meta_to_cutlass_sm90": "sparseq._C_sm90a",
    "sparse24_meta_from_cutlass_sm90": "sparseq._C_sm90a",
    "_sparse24_mm_cutlass_sm90a": "sparseq._C_sm90a",
    "_sparse24_int8_mm_cutlass_sm90a": "sparseq._C_sm90a",
}
"""name -> the extension module whose import registers its CUDA kernel."""

for _name, _schema in CUDA_OP_SCHEMAS.items():
    _lib.define(_name + _schema)


# ------------------------------------------------------------------ reference impls


def _canonical_meta(values: Tensor, meta: Tensor) -> Tensor:
    _, _, arch = cl.check_prepared(values, meta)
    return cl.meta_from_cutlass(meta, cl.element_bits(values.dtype), arch)


def _check_x(x: Tensor, values: Tensor, dtypes) -> None:
    check_tensor("x", x, dtypes=dtypes, ndim=2)
    if x.shape[1] != 2 * values.shape[1]:
        raise ValueError(f"x has K={x.shape[1]} but values expects K={2 * values.shape[1]}")


def sparse24_mm_reference(x: Tensor, values: Tensor, meta: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``sparse24_mm_cutlass`` in pure PyTorch: prepared meta -> canonical -> reference."""
    check_tensor("values", values, dtypes=(torch.bfloat16, torch.float16), ndim=2)
    _check_x(x, values, (torch.bfloat16, torch.float16))
    return ref.sparse24_mm(x, values, _canonical_meta(values, meta), bias)


def sparse24_int8_mm_reference(
    x: Tensor,
    values: Tensor,
    meta: Tensor,
    w_scale: Tensor,
    x_scale: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """``sparse24_int8_mm_cutlass`` in pure PyTorch (W8A8 only, bf16/fp16 output)."""
    check_tensor("values", values, dtypes=(torch.int8,), ndim=2)
    if x.dtype != torch.int8:
        raise TypeError(f"sparse24_int8_mm_cutlass is W8A8 only: x must be int8 (quantize it first), got {x.dtype}")
    if x_scale is None:
        raise ValueError("x_scale is required (per token [M] or per tensor [1], fp32)")
    if out_dtype is not None and out_dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"out_dtype must be bfloat16 or float16 for the CUTLASS kernels, got {out_dtype}")
    _check_x(x, values, (torch.int8,))
    return ref.sparse24_int8_mm(x, values, _canonical_meta(values, meta), w_scale, x_scale, bias,
                                out_dtype or torch.bfloat16)


def _converter(arch: int, to_cutlass: bool):
    def to_fn(values: Tensor, meta: Tensor) -> Tensor:
        n, k = ref.check_compressed_24(values, meta)
        cl.check_cutlass_shape(n, k)
        return cl.meta_to_cutlass(meta, cl.element_bits(values.dtype), arch)

    def from_fn(values: Tensor, meta_cutlass: Tensor) -> Tensor:
        check_tensor("values", values, ndim=2, contiguous=True)
        n, k, got = cl.check_prepared(values, meta_cutlass)
        if got != arch:
            raise ValueError(f"meta_cutlass is in the sm{got} layout, expected sm{arch}")
        return cl.meta_from_cutlass(meta_cutlass, cl.element_bits(values.dtype), arch)

    return to_fn if to_cutlass else from_fn


_REFERENCE_IMPLS = {
    "sparse24_mm_cutlass": sparse24_mm_reference,
    "_sparse24_mm_cutlass_sm90a": sparse24_mm_reference,
    "sparse24_int8_mm_cutlass": sparse24_int8_mm_reference,
    "_sparse24_int8_mm_cutlass_sm90a": sparse24_int8_mm_reference,
    "sparse24_meta_to_cutlass_sm80": _converter(cl.SM80, True),
    "sparse24_meta_from_cutlass_sm80": _converter(cl.SM80, False),
    "sparse24_meta_to_cutlass_sm90": _converter(cl.SM90, True),
    "sparse24_meta_from_cutlass_sm90": _converter(cl.SM90, False),
}

# ---------------------------------------------------------------------------- fakes


def _fake_mm(x, values, meta, bias=None):
    cl.check_prepared(values, meta)
    if values.dtype != x.dtype:
        raise TypeError(f"values dtype {values.dtype} must match x dtype {x.dtype}")
    _check_x(x, values, (torch.bfloat16, torch.float16))
    return x.new_empty((x.shape[0], values.shape[0]))


def _fake_int8_mm(x, values, meta, w_scale, x_scale=None, bias=None, out_dtype=None):
    cl.check_prepared(values, meta)
    _check_x(x, values, (torch.int8,))
    return x.new_empty((x.shape[0], values.shape[0]), dtype=out_dtype or torch.bfloat16)


def _fake_to(arch):
    def fake(values, meta):
        n, k = ref.check_compressed_24(values, meta)
        shape, dtype = cl.cutlass_meta_shape(n, k, cl.element_bits(values.dtype), arch)
        return meta.new_empty(shape, dtype=dtype)

    return fake


def _fake_from(arch):
    def fake(values, meta_cutlass):
        n, k, _ = cl.check_prepared(values, meta_cutlass)
        return meta_cutlass.new_empty((n, k // 8), dtype=torch.uint8)

    return fake


_FAKES = {
    "sparse24_mm_cutlass": _fake_mm,
    "_sparse24_mm_cutlass_sm90a": _fake_mm,
    "sparse24_int8_mm_cutlass": _fake_int8_mm,
    "_sparse24_int8_mm_cutlass_sm90a": _fake_int8_mm,
    "sparse24_meta_to_cutlass_sm80": _fake_to(cl.SM80),
    "sparse24_meta_from_cutlass_sm80": _fake_from(cl.SM80),
    "sparse24_meta_to_cutlass_sm90": _fake_to(cl.SM90),
    "sparse24_meta_from_cutlass_sm90": _fake_from(cl.SM90),
}

for _name in CUDA_OP_SCHEMAS:
    _lib.impl(_name, _REFERENCE_IMPLS[_name], "CPU")
    torch.library.register_fake(f"sparseq::{_name}", _FAKES[_name], lib=_lib)


# ----------------------------------------------------------------------- Python API


def _op(name: str):
    return getattr(torch.ops.sparseq, name).default


def supported_arch(device: Optional[torch.device] = None) -> Optional[int]:
    """The CUTLASS layout family of a CUDA device: 90 (sm90a kernels), 80 (sm80 kernels), or
    None for a GPU the kernels do not support (e.g. sm100, sm120): callers fall through."""
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) == (9, 0):
        return cl.SM90
    if major == 8:
        return cl.SM80
    return None


def cutlass_arch(device: Optional[torch.device] = None) -> int:
    """:func:`supported_arch`, raising a clear error for an unsupported GPU."""
    arch = supported_arch(device)
    if arch is None:
        major, minor = torch.cuda.get_device_capability(device)
        raise RuntimeError(f"sparseq's CUTLASS 2:4 kernels run on sm80-sm89 and sm90 GPUs, not sm{major}{minor}")
    return arch


def prepare_sparse24_cutlass(values: Tensor, meta: Tensor, arch: Optional[int] = None) -> Tensor:
    """Canonical ``(values, meta)`` -> the metadata tensor the CUTLASS kernels take.

    On a CUDA tensor the conversion runs on the GPU for that GPU's kernels (``arch`` is
    inferred); on CPU pass ``arch`` (80 or 90). ``values`` need no conversion.
    Call it once when a layer is loaded, not per forward.
    """
    if arch is None:
        if values.device.type != "cuda":
            raise ValueError("pass arch=80 or arch=90 to prepare a CPU tensor")
        arch = cutlass_arch(values.device)
    if arch not in cl.ARCHS:
        raise ValueError(f"arch must be one of {cl.ARCHS}, got {arch}")
    return _op(f"sparse24_meta_to_cutlass_sm{arch}")(values, meta)


def unprepare_sparse24_cutlass(values: Tensor, meta_cutlass: Tensor) -> Tensor:
    """Inverse of ``prepare_sparse24_cutlass``: prepared metadata -> canonical ``meta[N, K/8]``."""
    arch = cl.cutlass_meta_arch(meta_cutlass)
    return _op(f"sparse24_meta_from_cutlass_sm{arch}")(values, meta_cutlass)


sparse24_mm_cutlass = _op("sparse24_mm_cutlass")
"""``sparse24_mm_cutlass(x, values, prepared_meta, bias=None)``: ``x[M, K] @ W^T + bias`` with W
as ``values`` + prepared ``meta``; output ``x.dtype`` (bf16/fp16)."""

sparse24_int8_mm_cutlass = _op("sparse24_int8_mm_cutlass")
"""``sparse24_int8_mm_cutlass(xq, values, prepared_meta, w_scale, x_scale, bias=None, out_dtype=None)``:
W8A8 ``fp32(xq @ Wq^T) * x_scale[:, None] * w_scale[None, :] + bias`` -> ``out_dtype`` (bf16 default)."""
