"""The C++ CPU ops of ``sparseq._C_cpu`` around PyTorch's int8 GEMMs (schemas here, kernels in
``csrc/cpu/``): the W8A8 activation quantization and epilogue in one pass each.

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
_lib.define("quantize_int8_cpu(Tensor x, Tensor? smooth, Tensor? x_scale) -> (Tensor, Tensor)")
_lib.define("w8a8_epilogue_cpu(Tensor acc, Tensor x_scale, Tensor w_scale, Tensor? bias) -> Tensor")

QUANTIZE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Activation dtypes the C++ quantization reads."""


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
def _ops() -> Tuple[object, object]:
    return torch.ops.sparseq.quantize_int8_cpu.default, torch.ops.sparseq.w8a8_epilogue_cpu.default


def quantize_int8(x: Tensor, smooth: Optional[Tensor], x_scale: Optional[Tensor]) -> Optional[Tuple[Tensor, Tensor]]:
    """``(xq int8 [M, K], scale fp32 [M])`` as ``reference.activation_grid`` computes them, in one
    C++ pass; None where the extension or these inputs are not supported (the caller then runs
    torch ops). ``smooth`` and ``x_scale`` must be contiguous fp32 (layers keep them so)."""
    if (not available() or x.dtype not in QUANTIZE_DTYPES or not x.is_contiguous()
            or (smooth is not None and (smooth.dtype != torch.float32 or not smooth.is_contiguous()))
            or (x_scale is not None and (x_scale.dtype != torch.float32 or x_scale.shape != (1,)))):
        return None
    return _ops()[0](x, smooth, x_scale)


def epilogue(acc: Tensor, x_scale: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
    """``fp32(acc) * x_scale[:, None] * w_scale[None, :] + bias`` (fp32, the reference's order) in
    one C++ pass, overwriting an fp32 ``acc``; None where not supported (the caller then runs
    torch ops). ``w_scale`` and ``bias`` must be contiguous fp32."""
    if (not available() or acc.dtype not in (torch.float32, torch.int32) or not acc.is_contiguous()
            or w_scale.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32)):
        return None
    return _ops()[1](acc, x_scale, w_scale, bias)
