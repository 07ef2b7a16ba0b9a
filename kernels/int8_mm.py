"""W8A8 GEMM: int8 activations x int8 weights, int32 accumulation, fused scale/bias epilogue.

``Y = fp32(Xq @ Wq^T) * x_scale[:, None] * w_scale[None, :] + bias`` cast to ``out_dtype``
(``sparseq.reference.int8_mm``). Both operands are K-major (``xq[M, K]``, ``wq[N, K]``, as
``nn.Linear`` stores them), so they feed the int8 tensor cores without a transpose copy.
Configs are bucketed by M (:mod:`sparseq.kernels.configs`); for small M, split-K programs add
exact int32 partials atomically and a second small kernel applies the epilogue.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparseq import reference as ref
from sparseq._checks import check_bias, check_scale_vector

from . import configs
from ._common import (check_int8_weight_operands, check_triton_device, device_guard, gemm_grid, k_range, launch_meta,
                      register_backend, scale_bias_store, splitk_epilogue, splitk_workspace, store_partial, tile_ids)


@triton.jit
def _int8_mm_kernel(a_ptr, b_ptr, out_ptr, acc_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, M, N, K,
                    stride_am, stride_ak, stride_bn, stride_bk, stride_om, stride_on,
                    X_SCALE_PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] output tile (one K slice of it when SPLIT_K > 1)."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past M/N wrap around (valid addresses, results never stored): no M/N masks in the loop.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    _, k_start, k_end = k_range(K, BLOCK_K, SPLIT_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + (k_start + offs_k)[None, :] * stride_ak
    b_ptrs = b_ptr + cols[None, :] * stride_bn + (k_start + offs_k)[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            mask_k = k + offs_k < k_end
            a = tl.load(a_ptrs, mask=mask_k[None, :], other=0)
            b = tl.load(b_ptrs, mask=mask_k[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if SPLIT_K == 1:
        scale_bias_store(acc, offs_m, offs_n, M, N, out_ptr, stride_om, stride_on, x_scale_ptr, w_scale_ptr,
                         bias_ptr, True, X_SCALE_PER_TOKEN, True, HAS_BIAS)
    else:
        store_partial(acc, offs_m, offs_n, M, N, acc_ptr)


def check_w8a8_epilogue(m: int, n: int, x_scale: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                        out_dtype: torch.dtype, like: Tensor) -> None:
    """The scales, bias and output dtype of a W8A8 product (the reference's rules, no value scans)."""
    if out_dtype not in ref.INT8_OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of bfloat16, float16, float32, got {out_dtype}")
    check_scale_vector("x_scale", x_scale, m, like, allow_scalar=True)
    check_scale_vector("w_scale", w_scale, n, like)
    check_bias(bias, n, like)


def check_int32_k(k: int) -> None:
    if k * ref.INT8_MAX * 128 >= 2**31:
        raise ValueError(f"K={k} is too large for an int32 accumulator")


def int8_mm(xq: Tensor, wq: Tensor, x_scale: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None,
            out_dtype: torch.dtype = torch.bfloat16, config: Optional[configs.MatmulConfig] = None,
            check: bool = True) -> Tensor:
    """Triton W8A8 ``int8_mm``: ``xq[M, K]`` int8, ``wq[N, K]`` int8, ``x_scale`` fp32 ``[M]`` (per
    token) or ``[1]`` (per tensor), ``w_scale`` fp32 ``[N]``, optional ``bias[N]`` -> ``[M, N]``
    ``out_dtype``. Any M, N, K (ragged edges masked). The int32 accumulator is exact.

    Shapes, dtypes and devices are checked before the launch; values are not scanned (scales
    are trusted to be finite and > 0). ``config`` overrides the M-bucketed choice.
    ``check=False`` skips the argument checks: for callers that checked them once (layers).
    """
    if check:
        check_int8_weight_operands("xq", xq, (torch.int8,), wq)
        m, k = xq.shape
        n = wq.shape[0]
        check_int32_k(k)
        check_w8a8_epilogue(m, n, x_scale, w_scale, bias, out_dtype, xq)
        check_triton_device(xq=xq, wq=wq, x_scale=x_scale, w_scale=w_scale, bias=bias)
    m, k = xq.shape
    n = wq.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_().add_(bias) if bias is not None else out.zero_()
    x_scale, w_scale = x_scale.contiguous(), w_scale.contiguous()
    bias = bias.contiguous() if bias is not None else None
    cfg = config or configs.pick("int8", m, n, k, xq.device)
    acc = splitk_workspace(cfg.SPLIT_K, m, n, torch.int32, xq.device) if cfg.SPLIT_K > 1 else out
    with device_guard(xq):
        _int8_mm_kernel[gemm_grid(m, n, cfg)](
            xq, wq, out, acc, x_scale, w_scale, bias if bias is not None else w_scale, m, n, k,
            xq.stride(0), xq.stride(1), wq.stride(0), wq.stride(1), out.stride(0), out.stride(1),
            X_SCALE_PER_TOKEN=x_scale.shape[0] > 1, HAS_BIAS=bias is not None, **launch_meta(cfg, k))
        if cfg.SPLIT_K > 1:
            splitk_epilogue(acc, out, x_scale, w_scale, bias)
    return out


int8_mm_triton = register_backend("int8_mm", int8_mm)
