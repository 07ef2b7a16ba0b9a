"""int8 quantization of activations in one pass over X: dynamic per token (``quantize_per_token``)
and static per tensor (``quantize_per_tensor``).

Per row: optional SmoothQuant division by ``smooth[K]``, absolute maximum, fp32 scale
``amax / 127`` (1.0 for an all-zero row), round half to even, clamp to [-127, 127], int8 out.
Bit-exact with ``sparseq.reference.quantize_per_token``: the divisions are correctly rounded
(``div_rn``, never the approximate fp32 ``/``) and rounding is exact integer arithmetic.
Short rows are processed several per program. Rows up to ``MAX_SINGLE_PASS_K`` stay in
registers (X is read once); longer rows are read twice, the second time mostly from L2.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparseq._checks import FLOAT_DTYPES, check_scale_vector, check_tensor

from ._common import check_triton_device, device_guard, register_backend, to_int8

MAX_SINGLE_PASS_K = 16384
"""Rows up to this many features are loaded once and kept in registers."""


@triton.jit
def _smoothed_tile(x_ptr, smooth_ptr, rows, stride_xm, offs_k, mask_m, K, HAS_SMOOTH: tl.constexpr):
    """fp32 ``x[rows, offs_k] / smooth[offs_k]`` (correctly rounded), 0 outside the tensor."""
    mask_k = offs_k < K
    mask = mask_m[:, None] & mask_k[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        f = tl.load(smooth_ptr + offs_k, mask=mask_k, other=1.0)
        x = tl.math.div_rn(x, f[None, :])
    return x


@triton.jit
def _quantize_tile(xs, scale):
    return to_int8(xs, scale[:, None])


@triton.jit
def _nan_aware_max(a):
    """Row max of ``a`` that is NaN where a row holds NaN (``tl.max`` follows IEEE maxNum and
    drops NaN on the GPU), so a NaN row gets a NaN scale, as in the reference."""
    amax = tl.max(a, axis=1)
    has_nan = tl.max((a != a).to(tl.int32), axis=1)
    return tl.where(has_nan > 0, amax * float("nan"), amax)


@triton.jit
def _quantize_per_token_kernel(x_ptr, smooth_ptr, q_ptr, scale_ptr, M, K, stride_xm, stride_qm,
                               HAS_SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                               SINGLE_PASS: tl.constexpr):
    """BLOCK_M rows per program: absmax of x/smooth per row, scale, quantize."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    if SINGLE_PASS:
        mask = mask_m[:, None] & (offs < K)[None, :]
        xs = _smoothed_tile(x_ptr, smooth_ptr, rows, stride_xm, offs, mask_m, K, HAS_SMOOTH)
        amax = _nan_aware_max(tl.abs(xs))
        scale = tl.where(amax == 0, 1.0, tl.math.div_rn(amax, 127.0))  # NaN stays NaN
        tl.store(q_ptr + rows[:, None] * stride_qm + offs[None, :], _quantize_tile(xs, scale), mask=mask)
    else:
        amax_tile = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = mask_m[:, None] & (k0 + offs < K)[None, :]
            xs = _smoothed_tile(x_ptr, smooth_ptr, rows, stride_xm, k0 + offs, mask_m, K, HAS_SMOOTH)
            amax_tile = tl.maximum(amax_tile, tl.abs(xs), propagate_nan=tl.PropagateNan.ALL)
        amax = _nan_aware_max(amax_tile)
        scale = tl.where(amax == 0, 1.0, tl.math.div_rn(amax, 127.0))  # NaN stays NaN
        for k0 in range(0, K, BLOCK_K):
            mask = mask_m[:, None] & (k0 + offs < K)[None, :]
            xs = _smoothed_tile(x_ptr, smooth_ptr, rows, stride_xm, k0 + offs, mask_m, K, HAS_SMOOTH)
            tl.store(q_ptr + rows[:, None] * stride_qm + (k0 + offs)[None, :], _quantize_tile(xs, scale), mask=mask)
    tl.store(scale_ptr + offs_m, scale, mask=mask_m)


def _check(x: Tensor, smooth: Optional[Tensor]) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2)
    if smooth is not None:
        check_scale_vector("smooth", smooth, x.shape[1], x)
        if not smooth.is_contiguous():
            raise ValueError("smooth must be contiguous")
    check_triton_device(x=x, smooth=smooth)
    if x.shape[1] == 0:
        raise ValueError("x must have K >= 1 features")


def quantize_per_token(x: Tensor, smooth: Optional[Tensor] = None,
                       block_k: Optional[int] = None, check: bool = True) -> Tuple[Tensor, Tensor]:
    """Triton ``quantize_per_token``: ``x[M, K]`` (bf16/fp16/fp32, optionally divided by the
    SmoothQuant ``smooth[K]``) -> ``(q int8[M, K], scale fp32[M])``, bit-exact with the reference.

    Checks dtypes, shapes and devices before the launch; it does not scan the values (no
    NaN/Inf or ``smooth > 0`` check: that would cost a pass and a sync on the hot path).
    ``block_k`` (a power of two) forces the K chunk, e.g. to test the two-pass path.
    ``check=False`` skips the argument checks: for callers that checked them once (layers).
    """
    if check:
        _check(x, smooth)
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    if block_k is None:
        block_k = triton.next_power_of_2(k) if k <= MAX_SINGLE_PASS_K else 4096
    single = block_k >= k
    # Small rows: several per program (about 4096 elements per tile); long rows: one.
    block_m = max(1, min(16, 4096 // block_k))
    num_warps = 4 if block_m * block_k <= 4096 else (8 if block_k <= 8192 else 16)
    with device_guard(x):
        _quantize_per_token_kernel[(triton.cdiv(m, block_m),)](
            x, smooth if smooth is not None else x, q, scale, m, k, x.stride(0), q.stride(0),
            HAS_SMOOTH=smooth is not None, BLOCK_M=block_m, BLOCK_K=block_k, SINGLE_PASS=single,
            num_warps=num_warps)
    return q, scale


@triton.jit
def _quantize_per_tensor_kernel(x_ptr, smooth_ptr, scale_ptr, q_ptr, M, K, stride_xm, stride_qm,
                                HAS_SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BLOCK_M, BLOCK_K] tile quantized with the static per-tensor scale."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    xs = _smoothed_tile(x_ptr, smooth_ptr, rows, stride_xm, offs_k, mask_m, K, HAS_SMOOTH)
    scale = tl.load(scale_ptr + tl.zeros((BLOCK_M,), dtype=tl.int32))
    mask = mask_m[:, None] & (offs_k < K)[None, :]
    tl.store(q_ptr + rows[:, None] * stride_qm + offs_k[None, :], _quantize_tile(xs, scale), mask=mask)


def quantize_per_tensor(x: Tensor, scale: Tensor, smooth: Optional[Tensor] = None, check: bool = True) -> Tensor:
    """Triton ``quantize_per_tensor``: static int8 of ``x[M, K]`` with a calibrated fp32 ``scale``
    of shape (1,) (optionally after dividing by ``smooth[K]``); bit-exact with the reference.
    The scale is trusted to be finite and > 0 (not scanned).
    ``check=False`` skips the argument checks: for callers that checked them once (layers).
    """
    if check:
        _check(x, smooth)
        check_scale_vector("scale", scale, 1, x)
        check_triton_device(scale=scale)
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    if m == 0:
        return q
    block_k = min(1024, triton.next_power_of_2(k))
    block_m = max(1, min(16, 4096 // block_k))
    with device_guard(x):
        _quantize_per_tensor_kernel[(triton.cdiv(m, block_m), triton.cdiv(k, block_k))](
            x, smooth if smooth is not None else x, scale, q, m, k, x.stride(0), q.stride(0),
            HAS_SMOOTH=smooth is not None, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4)
    return q


quantize_per_token_triton = register_backend("quantize_per_token", quantize_per_token)
quantize_per_tensor_triton = register_backend("quantize_per_tensor", quantize_per_tensor)
