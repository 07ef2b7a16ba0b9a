"""Test helpers for the Triton kernels: the float tolerance derived from the reference.

The tolerance rule (used by tests/test_triton_*.py). The reference computes a float matmul
from the exact operands in fp32 and casts once; a kernel multiplies the same exact operands
(bf16/fp16 products and int8-to-float conversions are exact in fp32; fp32 inputs use IEEE fp32
dots), accumulates in fp32 in another order and casts once. So, elementwise:

    |kernel - reference| <= eps(out) * |reference|      (one rounding to the output dtype)
                          + 2 (K + 2) eps32 * magnitude   (fp32 summation order, both sides)
                          + tiny(out)                     (subnormal outputs)

where ``magnitude = |x| @ |W|^T * |x_scale| * |w_scale| + |bias|``. This is about one output
ulp: tighter than "2x the error of the same product done by torch in the low precision" and
it holds for bf16 on the GPU too.
"""
from __future__ import annotations

from typing import Optional

import torch

EPS32 = torch.finfo(torch.float32).eps


def magnitude(x: torch.Tensor, w: torch.Tensor, x_scale: Optional[torch.Tensor] = None,
              w_scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``|x| @ |w|^T`` scaled like the product (fp64, so the bound itself is exact enough)."""
    mag = x.double().abs() @ w.double().abs().T
    if x_scale is not None:
        mag = mag * x_scale.double().abs()[:, None] if x_scale.numel() > 1 else mag * x_scale.double().abs()
    if w_scale is not None:
        mag = mag * w_scale.double().abs()[None, :]
    if bias is not None:
        mag = mag + bias.double().abs()[None, :]
    return mag


def assert_matmul_close(out: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                        x_scale: Optional[torch.Tensor] = None, w_scale: Optional[torch.Tensor] = None,
                        bias: Optional[torch.Tensor] = None) -> None:
    """Assert ``out`` is within the bound above of the reference output ``expected``."""
    assert out.dtype == expected.dtype, (out.dtype, expected.dtype)
    assert out.shape == expected.shape, (out.shape, expected.shape)
    info = torch.finfo(out.dtype)
    k = x.shape[1]
    mag = magnitude(x.cpu(), w.cpu(), None if x_scale is None else x_scale.cpu(),
                    None if w_scale is None else w_scale.cpu(), None if bias is None else bias.cpu())
    exp = expected.cpu().double()
    bound = info.eps * exp.abs() + 2 * (k + 2) * EPS32 * mag + info.tiny
    err = (out.cpu().double() - exp).abs()
    bad = err > bound
    if bool(bad.any()):
        i, j = (int(v) for v in bad.nonzero()[0])
        raise AssertionError(
            f"{int(bad.sum())} of {bad.numel()} outputs out of tolerance; first [{i}, {j}]: got "
            f"{float(out[i, j])}, reference {float(expected[i, j])}, bound {float(bound[i, j]):.3g}")
