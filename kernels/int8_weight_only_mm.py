"""Weight-only int8 GEMM: bf16/fp16/fp32 activations x int8 weights dequantized in registers.

``Y = fp32(X @ Wq^T) * w_scale[None, :] + bias`` in ``x.dtype`` (``sparseq.reference.
int8_weight_only_mm``). An int8 weight tile converts exactly to the activation dtype
(|q| <= 127), so the tensor cores see ordinary bf16/fp16 operands while HBM sees half the
weight bytes of a bf16 layer: the decode path (M up to ~64). The per-channel scale is applied
once, in the epilogue, to the fp32 accumulator (as the reference does).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparseq._checks import FLOAT_DTYPES, check_bias, check_scale_vector

from . import configs
from ._common import (check_int8_weight_operands, check_triton_device, device_guard, gemm_grid, k_range, launch_meta,
                      register_backend, scale_bias_store, splitk_epilogue, splitk_workspace, store_partial, tile_ids)


@triton.jit
def _int8_weight_only_mm_kernel(a_ptr, b_ptr, out_ptr, acc_ptr, w_scale_ptr, bias_ptr, M, N, K,
                                stride_am, stride_ak, stride_bn, stride_bk, stride_om, stride_on,
                                HAS_BIAS: tl.constexpr, IEEE_FP32: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] output tile; int8 weights converted to x's dtype after the load."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    _, k_start, k_end = k_range(K, BLOCK_K, SPLIT_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + (k_start + offs_k)[None, :] * stride_ak
    b_ptrs = b_ptr + cols[None, :] * stride_bn + (k_start + offs_k)[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs).to(a.dtype)
        else:
            mask_k = k + offs_k < k_end
            a = tl.load(a_ptrs, mask=mask_k[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_k[:, None], other=0).to(a.dtype)
        if IEEE_FP32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if SPLIT_K == 1:
        scale_bias_store(acc, offs_m, offs_n, M, N, out_ptr, stride_om, stride_on, w_scale_ptr, w_scale_ptr,
                         bias_ptr, False, False, True, HAS_BIAS)
    else:
        store_partial(acc, offs_m, offs_n, M, N, acc_ptr)


def int8_weight_only_mm(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None,
                        config: Optional[configs.MatmulConfig] = None, check: bool = True) -> Tensor:
    """Triton ``int8_weight_only_mm``: ``x[M, K]`` bf16/fp16/fp32, ``wq[N, K]`` int8, ``w_scale``
    fp32 ``[N]``, optional ``bias[N]`` -> ``[M, N]`` in ``x.dtype``. Any M, N, K.

    fp32 activations use IEEE fp32 dot products (no TF32). Split-K partials are summed in a
    fixed order by the epilogue kernel, so results are deterministic.
    ``check=False`` skips the argument checks: for callers that checked them once (layers).
    """
    if check:
        check_int8_weight_operands("x", x, FLOAT_DTYPES, wq)
        m, k = x.shape
        n = wq.shape[0]
        check_scale_vector("w_scale", w_scale, n, x)
        check_bias(bias, n, x)
        check_triton_device(x=x, wq=wq, w_scale=w_scale, bias=bias)
    m, k = x.shape
    n = wq.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_().add_(bias) if bias is not None else out.zero_()
    w_scale = w_scale.contiguous()
    bias = bias.contiguous() if bias is not None else None
    cfg = config or configs.pick("int8_weight_only", m, n, k, x.device)
    acc = splitk_workspace(cfg.SPLIT_K, m, n, torch.float32, x.device) if cfg.SPLIT_K > 1 else out
    with device_guard(x):
        _int8_weight_only_mm_kernel[gemm_grid(m, n, cfg)](
            x, wq, out, acc, w_scale, bias if bias is not None else w_scale, m, n, k,
            x.stride(0), x.stride(1), wq.stride(0), wq.stride(1), out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, IEEE_FP32=x.dtype == torch.float32, **launch_meta(cfg, k))
        if cfg.SPLIT_K > 1:
            splitk_epilogue(acc, out, None, w_scale, bias)
    return out


int8_weight_only_mm_triton = register_backend("int8_weight_only_mm", int8_weight_only_mm)
