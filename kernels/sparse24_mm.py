"""2:4-sparse GEMMs for small M: the compressed weight tile is expanded in registers.

``sparse24_mm``: ``x[M, K] @ W^T + bias`` with ``W`` in canonical 2:4 form (``values[N, K/2]``
of x's dtype + ``meta[N, K/8]``). ``sparse24_int8_mm``: the same with int8 values and
per-channel ``w_scale``; activations either bf16/fp16/fp32 (weight-only) or int8 with
``x_scale`` (W8A8, exact int32 accumulation). Semantics: ``sparseq.reference``.

How a tile is expanded (no gathers: the interpreter has no indirect loads, and on the GPU a
register select beats a shared-memory gather): per group ``g`` of 4 input features the two
kept values ``v0, v1`` and the code ``i0 | i1 << 2`` are loaded (values as one contiguous
``[BLOCK_N, BLOCK_K/2]`` tile, wide loads), and for each position ``p`` of the group the dense
weight column is ``where(i0 == p, v0, where(i1 == p, v1, 0))``. The activation tile is split
the same way into its 4 stride-4 slices ``x_p`` (a register reshape of one contiguous load),
and ``Y += x_p @ w_p^T`` for p = 0..3 on the tensor cores. The weight bytes read are those of
the compressed form (values + 1/8 byte per 4-bit code): the win at small M, where the GEMM is
bound by weight bytes. At large M the CUTLASS sparse tensor-core kernels are the fast path.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparseq import reference as ref
from sparseq._checks import FLOAT_DTYPES, check_bias, check_scale_vector, check_tensor

from . import configs
from ._common import (check_triton_device, device_guard, gemm_grid, k_range, launch_meta, register_backend,
                      scale_bias_store, splitk_epilogue, store_partial, splitk_workspace, tile_ids)
from .int8_mm import check_int32_k, check_w8a8_epilogue


@triton.jit
def _dense_column(v0, v1, i0, i1, p: tl.constexpr):
    """Dense weights at position ``p`` of every group: the kept value stored for ``p``, or 0."""
    zero = tl.zeros_like(v0)
    return tl.where(i0 == p, v0, tl.where(i1 == p, v1, zero))


@triton.jit
def _dot(x, w, acc, INT_DOT: tl.constexpr, IEEE_FP32: tl.constexpr):
    """``acc += x @ w^T`` (w is [BLOCK_N, G]); int8 x int8 -> int32, else in x's dtype -> fp32.

    One branch per case and a single return: Triton 3.6 still traces the statements after a
    ``return`` in a constexpr ``if`` (into a dead block), and its ``tl.dot`` there, with the
    default fp32 ``out_dtype``, rejected the int32 accumulator of the int8 path."""
    if INT_DOT:
        acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
    elif IEEE_FP32:
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision="ieee")
    else:
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    return acc


@triton.jit
def _sparse24_mm_kernel(x_ptr, v_ptr, meta_ptr, out_ptr, acc_ptr, x_scale_ptr, w_scale_ptr, bias_ptr,
                        M, N, K, stride_xm, stride_xk, stride_vn, stride_mn, stride_om, stride_on,
                        INT_DOT: tl.constexpr, IEEE_FP32: tl.constexpr, HAS_X_SCALE: tl.constexpr,
                        X_SCALE_PER_TOKEN: tl.constexpr, HAS_W_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] output tile (one K slice of it when SPLIT_K > 1); BLOCK_K counts dense K."""
    G: tl.constexpr = BLOCK_K // 4  # groups of 4 per K tile
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, 2 * G)
    offs_b = tl.arange(0, G // 2)  # metadata bytes per K tile (two 4-bit codes each)
    tile0, k_start, k_end = k_range(K, BLOCK_K, SPLIT_K)  # multiples of 8 (K % 8 == 0)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + (k_start + offs_k)[None, :] * stride_xk
    v_ptrs = v_ptr + cols[:, None] * stride_vn + (tile0 * (BLOCK_K // 2) + offs_v)[None, :]
    m_ptrs = meta_ptr + cols[:, None] * stride_mn + (tile0 * (BLOCK_K // 8) + offs_b)[None, :]
    if INT_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        # Contiguous tiles (pipelined, vectorized loads); nibbles unpacked in registers, low = even group.
        if EVEN_K:
            x = tl.load(x_ptrs)
            v = tl.load(v_ptrs)
            byte = tl.load(m_ptrs)
        else:
            x = tl.load(x_ptrs, mask=(k + offs_k < k_end)[None, :], other=0)
            v = tl.load(v_ptrs, mask=(k // 2 + offs_v < k_end // 2)[None, :], other=0)
            byte = tl.load(m_ptrs, mask=(k // 8 + offs_b < k_end // 8)[None, :], other=0)
        code = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_N, G)).to(tl.int32)  # [BLOCK_N, G]
        i0 = code & 3
        i1 = code >> 2
        v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, G, 2)))
        # x[:, 4g + 2j + i] -> split i, then j: the four stride-4 slices x_p[:, g] = x[:, 4g + p].
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, G, 2, 2)))
        x0, x2 = tl.split(x_even)
        x1, x3 = tl.split(x_odd)
        acc = _dot(x0, _dense_column(v0, v1, i0, i1, 0), acc, INT_DOT, IEEE_FP32)
        acc = _dot(x1, _dense_column(v0, v1, i0, i1, 1), acc, INT_DOT, IEEE_FP32)
        acc = _dot(x2, _dense_column(v0, v1, i0, i1, 2), acc, INT_DOT, IEEE_FP32)
        acc = _dot(x3, _dense_column(v0, v1, i0, i1, 3), acc, INT_DOT, IEEE_FP32)
        x_ptrs += BLOCK_K * stride_xk
        v_ptrs += BLOCK_K // 2
        m_ptrs += BLOCK_K // 8
    if SPLIT_K == 1:
        scale_bias_store(acc, offs_m, offs_n, M, N, out_ptr, stride_om, stride_on, x_scale_ptr, w_scale_ptr,
                         bias_ptr, HAS_X_SCALE, X_SCALE_PER_TOKEN, HAS_W_SCALE, HAS_BIAS)
    else:
        store_partial(acc, offs_m, offs_n, M, N, acc_ptr)


def _launch(x: Tensor, values: Tensor, meta: Tensor, out: Tensor, x_scale: Optional[Tensor],
            w_scale: Optional[Tensor], bias: Optional[Tensor], family: str,
            config: Optional[configs.MatmulConfig]) -> Tensor:
    m, k = x.shape
    n = values.shape[0]
    if m == 0 or n == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    x_scale = x_scale.contiguous() if x_scale is not None else None
    w_scale = w_scale.contiguous() if w_scale is not None else None
    bias = bias.contiguous() if bias is not None else None
    cfg = config or configs.pick(family, m, n, k, x.device)
    # Unmasked K tiles vectorize the metadata loads on Hopper; on sm8x ptxas spills that variant
    # (``python -m sparseq.kernels.aot --arch 80``), so it keeps the masked loop there.
    even_k = configs.capability(x.device) >= 90
    int_dot = x.dtype == torch.int8
    min_block_k = 128 if int_dot else 64  # 4 dots of BLOCK_K/4: >= 16 (float) / >= 32 (int8) on tensor cores
    if cfg.BLOCK_K < min_block_k:
        raise ValueError(f"sparse24 kernels need BLOCK_K >= {min_block_k} for {x.dtype} activations, got {cfg.BLOCK_K}")
    acc = splitk_workspace(cfg.SPLIT_K, m, n, torch.int32 if int_dot else torch.float32, x.device) if cfg.SPLIT_K > 1 else out
    dummy = values
    with device_guard(x):
        _sparse24_mm_kernel[gemm_grid(m, n, cfg)](
            x, values, meta, out, acc, x_scale if x_scale is not None else dummy,
            w_scale if w_scale is not None else dummy, bias if bias is not None else dummy, m, n, k,
            x.stride(0), x.stride(1), values.stride(0), meta.stride(0), out.stride(0), out.stride(1),
            INT_DOT=int_dot, IEEE_FP32=x.dtype == torch.float32, HAS_X_SCALE=x_scale is not None,
            X_SCALE_PER_TOKEN=x_scale is not None and x_scale.shape[0] > 1, HAS_W_SCALE=w_scale is not None,
            HAS_BIAS=bias is not None, **launch_meta(cfg, k, even_k))
        if cfg.SPLIT_K > 1:
            splitk_epilogue(acc, out, x_scale, w_scale, bias)
    return out


def _check_x(x: Tensor, k: int, dtypes) -> None:
    check_tensor("x", x, dtypes=dtypes, ndim=2)
    if x.shape[1] != k:
        raise ValueError(f"x has K={x.shape[1]} but values expects K={k}")


def sparse24_mm(x: Tensor, values: Tensor, meta: Tensor, bias: Optional[Tensor] = None,
                config: Optional[configs.MatmulConfig] = None, check: bool = True) -> Tensor:
    """Triton ``sparse24_mm``: ``x[M, K]`` bf16/fp16/fp32 times the canonical 2:4 weight
    ``(values[N, K/2] of x.dtype, meta[N, K/8])`` transposed, plus ``bias[N]`` -> ``[M, N]`` x.dtype.

    Any M and N; K a multiple of 8 (the canonical form's rule). Shapes, dtypes and devices are
    checked before the launch; the metadata codes are trusted (not scanned for ``i0 >= i1``).
    ``check=False`` skips the argument checks: for callers that checked them once (layers).
    """
    if check:
        check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2)
        n, k = ref.check_compressed_24(values, meta)
        if values.dtype != x.dtype:
            raise TypeError(f"values dtype {values.dtype} must match x dtype {x.dtype}")
        _check_x(x, k, FLOAT_DTYPES)
        check_bias(bias, n, x)
        check_triton_device(x=x, values=values, meta=meta, bias=bias)
    out = torch.empty((x.shape[0], values.shape[0]), dtype=x.dtype, device=x.device)
    return _launch(x, values, meta, out, None, None, bias, "sparse24", config)


def sparse24_int8_mm(x: Tensor, values: Tensor, meta: Tensor, w_scale: Tensor, x_scale: Optional[Tensor] = None,
                     bias: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None,
                     config: Optional[configs.MatmulConfig] = None, check: bool = True) -> Tensor:
    """Triton ``sparse24_int8_mm``: canonical 2:4 weight with int8 ``values`` and fp32 ``w_scale[N]``.

    W8A8 when ``x`` is int8 (``x_scale`` fp32 ``[M]`` or ``[1]`` required; output ``out_dtype``,
    default bf16; int32 accumulation, exact); weight-only when ``x`` is bf16/fp16/fp32
    (``x_scale`` None; output ``x.dtype``). Any M and N; K a multiple of 8.
    ``check=False`` skips the argument checks: for callers that checked them once (layers).
    """
    if check:
        check_tensor("x", x, dtypes=FLOAT_DTYPES + (torch.int8,), ndim=2)
        n, k = ref.check_compressed_24(values, meta)
        check_tensor("values", values, dtypes=(torch.int8,))
        _check_x(x, k, FLOAT_DTYPES + (torch.int8,))
        if x.dtype == torch.int8:
            if x_scale is None:
                raise ValueError("x_scale is required when x is int8 (W8A8)")
            out_dtype = out_dtype or torch.bfloat16
            check_int32_k(k)
            check_w8a8_epilogue(x.shape[0], n, x_scale, w_scale, bias, out_dtype, x)
        else:
            if x_scale is not None:
                raise ValueError("x_scale must be None when x is a float tensor (weight-only)")
            if out_dtype is not None and out_dtype != x.dtype:
                raise TypeError(f"weight-only output dtype is x.dtype ({x.dtype}); got out_dtype={out_dtype}")
            out_dtype = x.dtype
            check_scale_vector("w_scale", w_scale, n, x)
            check_bias(bias, n, x)
        check_triton_device(x=x, values=values, meta=meta, w_scale=w_scale, x_scale=x_scale, bias=bias)
    if out_dtype is None:
        out_dtype = torch.bfloat16 if x.dtype == torch.int8 else x.dtype
    out = torch.empty((x.shape[0], values.shape[0]), dtype=out_dtype, device=x.device)
    return _launch(x, values, meta, out, x_scale, w_scale, bias, "sparse24_int8", config)


sparse24_mm_triton = register_backend("sparse24_mm", sparse24_mm)
sparse24_int8_mm_triton = register_backend("sparse24_int8_mm", sparse24_int8_mm)
