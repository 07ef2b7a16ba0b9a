"""The C++ CPU ops of ``sparseq._C_cpu`` (schemas here, kernels in ``csrc/cpu/``): the W8A8
activation quantization and epilogue around PyTorch's int8 GEMMs, one pass each, and the int8
weight-only GEMM (``int8_weight_only_cpu``, for which PyTorch has no fast CPU kernel).

On a 2-core Xeon at M <= 64 the torch ops that quantize a batch per token (``x / smooth``,
``abs``, ``amax``, the scale, ``x / scale``, ``round``, ``clamp``, the int8 cast) and scale the
int32 product (two ``mul``, one ``add``) cost more than the oneDNN GEMM between them: each op's
fixed cost, and passes over the activations. Both C++ ops equal the reference arithmetic bit
for bit (tested against :mod:`sparseq.reference`); where the extension is not built
(``SPARSEQ_SKIP_CPU_BUILD=1``, no compiler) :mod:`sparseq.cpu_ops` runs the same arithmetic in
torch ops, and :func:`unavailable_reason` says why.
"""
from __future__ import annotations

import functools
import importlib
from typing import Optional, Tuple

import torch
from torch import Tensor

_lib = torch.library.Library("sparseq", "FRAGMENT")
_lib.define("quantize_int8_cpu(Tensor x, Tensor? smooth, Tensor? x_scale, bool offset=False) -> (Tensor, Tensor)")
_lib.define("quantize_grid_cpu(Tensor x, Tensor? smooth, Tensor? x_scale) -> (Tensor, Tensor)")
_lib.define("w8a8_epilogue_cpu(Tensor acc, Tensor x_scale, Tensor w_scale, Tensor? bias) -> Tensor")
_lib.define("int8_weight_only_cpu(Tensor x, Tensor wq, Tensor w_scale, Tensor? bias) -> Tensor")
_lib.define("normalize_rows_cpu(Tensor x, Tensor? smooth) -> (Tensor, Tensor)")


@torch.library.register_fake("sparseq::int8_weight_only_cpu", lib=_lib)
def _int8_weight_only_fake(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    return x.new_empty((x.shape[0], wq.shape[0]))  # torch.compile traces the op through this

QUANTIZE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Activation dtypes the C++ quantization and the weight-only GEMM read."""

WEIGHT_ONLY_CAPABILITIES = ("AVX512",)
"""``torch.backends.cpu.get_cpu_capability()`` values where ``int8_weight_only_cpu`` runs its
AVX-512 kernel; other CPUs get a plain loop (right, not fast), so the dispatch does not offer it."""


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str:
    """"" where ``sparseq._C_cpu`` is loaded, else why not (checked once)."""
    try:
        importlib.import_module("sparseq._C_cpu")
    except ImportError as e:
        return f"sparseq._C_cpu is not built ({e}); the CPU int8 path runs in torch ops"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("sparseq::quantize_int8_cpu", "CPU"):
        return "sparseq._C_cpu loaded but registered no CPU kernel"
    return ""


def available() -> bool:
    return not unavailable_reason()


@functools.lru_cache(maxsize=None)
def weight_only_unavailable_reason() -> str:
    """"" where ``int8_weight_only_cpu`` runs its AVX-512 kernel here, else why not."""
    if not available():
        return unavailable_reason()
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in WEIGHT_ONLY_CAPABILITIES:
        return f"the int8 weight-only CPU kernel needs AVX-512 (torch reports {capability})"
    return ""


@functools.lru_cache(maxsize=None)
def _ops() -> Tuple[object, ...]:
    ops = torch.ops.sparseq
    return (ops.quantize_int8_cpu.default, ops.w8a8_epilogue_cpu.default, ops.int8_weight_only_cpu.default,
            ops.normalize_rows_cpu.default, ops.quantize_grid_cpu.default)


def quantize_int8(x: Tensor, smooth: Optional[Tensor], x_scale: Optional[Tensor],
                  offset: bool = False) -> Optional[Tuple[Tensor, Tensor]]:
    """``(xq int8 [M, K], scale fp32 [M])`` as ``reference.activation_grid`` computes them, in one
    C++ pass (``offset``: ``xq + 128`` as uint8, oneDNN's activations where it lacks AMX); None
    where the extension or these inputs are not supported (the caller then runs torch ops).
    ``smooth`` and ``x_scale`` must be contiguous fp32 (layers keep them so)."""
    if (not available() or x.dtype not in QUANTIZE_DTYPES or not x.is_contiguous()
            or (smooth is not None and (smooth.dtype != torch.float32 or not smooth.is_contiguous()))
            or (x_scale is not None and (x_scale.dtype != torch.float32 or x_scale.shape != (1,)))):
        return None
    return _ops()[0](x, smooth, x_scale, offset)


def quantize_grid(x: Tensor, smooth: Optional[Tensor], x_scale: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``(grid fp32 [M, K + 2], scale fp32 [M])``: ``reference.activation_grid``'s integers as fp32
    (NaN -> 0, as the int8 cast), each row followed by two range columns holding -128 and 127, so
    that fbgemm's per-tensor uint8 quantizer takes scale 1 and zero point 128 and keeps every
    integer exactly (``sparseq.cpu_fbgemm``). One C++ pass; needs the extension and a contiguous
    fp32/bf16/fp16 ``x``, ``smooth`` and ``x_scale`` contiguous fp32."""
    if not available():
        raise RuntimeError(unavailable_reason())
    return _ops()[4](x, smooth, x_scale)


def quantize_grid_op():
    """The ``quantize_grid_cpu`` op itself, for a caller that checked :func:`available` and
    passes what :func:`quantize_grid` takes (no per-call checks)."""
    if not available():
        raise RuntimeError(unavailable_reason())
    return _ops()[4]


def epilogue_op():
    """The ``w8a8_epilogue_cpu`` op itself (fp32 ``acc`` overwritten), for a caller that checked
    :func:`available` and passes contiguous fp32 tensors (no per-call checks)."""
    if not available():
        raise RuntimeError(unavailable_reason())
    return _ops()[1]


def epilogue(acc: Tensor, x_scale: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
    """``fp32(acc) * x_scale[:, None] * w_scale[None, :] + bias`` (fp32, the reference's order) in
    one C++ pass, overwriting an fp32 ``acc``; None where not supported (the caller then runs
    torch ops). ``w_scale`` and ``bias`` must be contiguous fp32."""
    if (not available() or acc.dtype not in (torch.float32, torch.int32) or not acc.is_contiguous()
            or w_scale.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32)):
        return None
    return _ops()[1](acc, x_scale, w_scale, bias)


def int8_weight_only(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
    """``(fp32(x @ wq^T) * w_scale + bias)`` in ``x.dtype`` (``reference.int8_weight_only_mm``,
    within its tolerance: the sums run in another order), from the int8 weight as stored; None
    where the AVX-512 kernel does not run here or these inputs are not supported. ``wq``,
    ``w_scale`` and ``bias`` must be contiguous, the scales and bias fp32 (layers keep them so)."""
    if (weight_only_unavailable_reason() or x.dtype not in QUANTIZE_DTYPES or x.dim() != 2
            or wq.dtype != torch.int8 or not wq.is_contiguous() or w_scale.dtype != torch.float32
            or (bias is not None and bias.dtype != torch.float32)):
        return None
    return _ops()[2](x.contiguous(), wq, w_scale, bias)


def normalize_rows(x: Tensor, smooth: Optional[Tensor]) -> Optional[Tuple[Tensor, Tensor]]:
    """``(u fp32 [M, K], amax fp32 [M])``: ``amax`` = each row's max ``|x / smooth|`` (NaN where
    the row holds one), ``u = (x / smooth) * (1 / amax)`` with NaN and +-Inf zeroed, in one C++ pass
    (``sparseq.cpu_fbgemm``'s input to fbgemm, the same fp32 operations as its torch ops); None
    where the extension or these inputs are not supported."""
    if (not available() or x.dtype not in QUANTIZE_DTYPES or not x.is_contiguous() or x.dim() != 2
            or (smooth is not None and (smooth.dtype != torch.float32 or not smooth.is_contiguous()))):
        return None
    return _ops()[3](x, smooth)
