"""Dense weight -> 2:4 prune -> canonical compressed form (optionally int8), in one kernel.

``prune_and_compress_24(w, score=None, quantize=False)`` returns what
``sparseq.reference.prune_and_compress_24`` returns, bit for bit: per group of 4 along K the
two largest ``|w|`` (or ``score``) are kept, ties to the lower index; the kept non-zeros,
topped up with the lowest-index zero positions, give ``values[N, K/2]`` (``-0.0`` stored as
``+0.0``) and the 4-bit codes ``i0 | i1 << 2`` packed low nibble first into ``meta[N, K/8]``.
With ``quantize=True`` the kept values are quantized per channel (``scale = max|v| / 127``,
round half to even) and ``(qvalues int8, meta, scale fp32[N])`` is returned.

One program owns ``BLOCK_N`` rows and walks K; everything is register arithmetic on the 4
positions of each group (no sorts, no gathers), so it runs at memory speed on the GPU.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparseq._checks import FLOAT_DTYPES, check_finite, check_multiple, check_same_device, check_shape, check_tensor

from ._common import check_triton_device, device_guard, register_backend, to_int8


@triton.jit
def _four(t, BLOCK_N: tl.constexpr, G: tl.constexpr):
    """Split a [BLOCK_N, 4G] tile into its positions: ``t_p[:, g] = t[:, 4g + p]``."""
    even, odd = tl.split(tl.reshape(t, (BLOCK_N, G, 2, 2)))
    t0, t2 = tl.split(even)
    t1, t3 = tl.split(odd)
    return t0, t1, t2, t3


@triton.jit
def _compress_tile(w_ptr, s_ptr, rows, mask_n, k, K, stride_wn, stride_sn,
                   HAS_SCORE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Prune + compress the [BLOCK_N, BLOCK_K] tile at column ``k``: returns the kept values
    ``v0, v1`` ([BLOCK_N, G], w's dtype) and the codes ``i0 | i1 << 2`` ([BLOCK_N, G] int32)."""
    G: tl.constexpr = BLOCK_K // 4
    offs_k = k + tl.arange(0, BLOCK_K)
    mask = mask_n[:, None] & (offs_k < K)[None, :]
    w = tl.load(w_ptr + rows[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0.0)
    w0, w1, w2, w3 = _four(w, BLOCK_N, G)
    if HAS_SCORE:
        s = tl.load(s_ptr + rows[:, None] * stride_sn + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        s0, s1, s2, s3 = _four(s, BLOCK_N, G)
    else:
        s0 = tl.abs(w0.to(tl.float32))
        s1 = tl.abs(w1.to(tl.float32))
        s2 = tl.abs(w2.to(tl.float32))
        s3 = tl.abs(w3.to(tl.float32))
    # Stable descending rank: larger scores first, equal scores by lower index first; keep rank < 2.
    r0 = (s1 > s0).to(tl.int32) + (s2 > s0).to(tl.int32) + (s3 > s0).to(tl.int32)
    r1 = (s0 >= s1).to(tl.int32) + (s2 > s1).to(tl.int32) + (s3 > s1).to(tl.int32)
    r2 = (s0 >= s2).to(tl.int32) + (s1 >= s2).to(tl.int32) + (s3 > s2).to(tl.int32)
    r3 = (s0 >= s3).to(tl.int32) + (s1 >= s3).to(tl.int32) + (s2 >= s3).to(tl.int32)
    # Non-zeros of the pruned weight (-0.0 is a zero).
    nz0 = (r0 < 2) & (w0 != 0)
    nz1 = (r1 < 2) & (w1 != 0)
    nz2 = (r2 < 2) & (w2 != 0)
    nz3 = (r3 < 2) & (w3 != 0)
    # Positions: the non-zeros, then the lowest-index zero positions until there are two.
    fill = 2 - (nz0.to(tl.int32) + nz1.to(tl.int32) + nz2.to(tl.int32) + nz3.to(tl.int32))
    z0 = (~nz0).to(tl.int32)
    z1 = (~nz1).to(tl.int32)
    z2 = (~nz2).to(tl.int32)
    sel0 = nz0 | (0 < fill)
    sel1 = nz1 | (z0 < fill)
    sel2 = nz2 | (z0 + z1 < fill)
    sel3 = nz3 | (z0 + z1 + z2 < fill)
    i0 = tl.where(sel0, 0, tl.where(sel1, 1, 2))
    i1 = tl.where(sel3, 3, tl.where(sel2, 2, 1))
    zero = tl.zeros_like(w0)
    p0 = tl.where(nz0, w0, zero)
    p1 = tl.where(nz1, w1, zero)
    p2 = tl.where(nz2, w2, zero)
    p3 = tl.where(nz3, w3, zero)
    v0 = tl.where(i0 == 0, p0, tl.where(i0 == 1, p1, p2))
    v1 = tl.where(i1 == 3, p3, tl.where(i1 == 2, p2, p1))
    return v0, v1, i0 | (i1 << 2)


@triton.jit
def _prune_and_compress_24_kernel(w_ptr, s_ptr, v_ptr, meta_ptr, scale_ptr, N, K, stride_wn, stride_sn,
                                  HAS_SCORE: tl.constexpr, QUANTIZE: tl.constexpr,
                                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """BLOCK_N rows: prune, compress, store meta and values (quantized in a second pass over K)."""
    G: tl.constexpr = BLOCK_K // 4
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = offs_n.to(tl.int64)
    offs_v = tl.arange(0, 2 * G)
    offs_b = tl.arange(0, G // 2)
    amax = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        v0, v1, code = _compress_tile(w_ptr, s_ptr, rows, mask_n, k, K, stride_wn, stride_sn,
                                      HAS_SCORE, BLOCK_N, BLOCK_K)
        lo, hi = tl.split(tl.reshape(code, (BLOCK_N, G // 2, 2)))
        byte = (lo | (hi << 4)).to(tl.uint8)
        mask_b = mask_n[:, None] & (k // 8 + offs_b < K // 8)[None, :]
        tl.store(meta_ptr + rows[:, None] * (K // 8) + k // 8 + offs_b[None, :], byte, mask=mask_b)
        if QUANTIZE:
            amax = tl.maximum(amax, tl.max(tl.maximum(tl.abs(v0.to(tl.float32)), tl.abs(v1.to(tl.float32))), axis=1))
        else:
            v = tl.reshape(tl.join(v0, v1), (BLOCK_N, 2 * G))
            mask_v = mask_n[:, None] & (k // 2 + offs_v < K // 2)[None, :]
            tl.store(v_ptr + rows[:, None] * (K // 2) + k // 2 + offs_v[None, :], v, mask=mask_v)
    if QUANTIZE:
        scale = tl.where(amax > 0, tl.math.div_rn(amax, 127.0), 1.0)
        tl.store(scale_ptr + offs_n, scale, mask=mask_n)
        for k in range(0, K, BLOCK_K):
            v0, v1, code = _compress_tile(w_ptr, s_ptr, rows, mask_n, k, K, stride_wn, stride_sn,
                                          HAS_SCORE, BLOCK_N, BLOCK_K)
            v = tl.reshape(tl.join(v0, v1), (BLOCK_N, 2 * G)).to(tl.float32)
            q = to_int8(v, scale[:, None])
            mask_v = mask_n[:, None] & (k // 2 + offs_v < K // 2)[None, :]
            tl.store(v_ptr + rows[:, None] * (K // 2) + k // 2 + offs_v[None, :], q, mask=mask_v)


def prune_and_compress_24(w: Tensor, score: Optional[Tensor] = None, quantize: bool = False,
                          block_n: int = 16, block_k: Optional[int] = None) -> Tuple[Tensor, ...]:
    """Triton ``prune_and_compress_24``: dense ``w[N, K]`` (bf16/fp16/fp32, K % 8 == 0), optional
    ``score`` (same shape, a float dtype) -> ``(values, meta)``, or with ``quantize=True``
    ``(qvalues int8, meta, scale fp32[N])``; bit-exact with the reference.

    A one-time (load-time) op, so it also scans the values like the reference (NaN/Inf raise).
    """
    check_tensor("w", w, dtypes=FLOAT_DTYPES, ndim=2)
    check_multiple("w", w.shape[1], 8, "K (dim 1)")
    if score is not None:
        check_tensor("score", score, dtypes=FLOAT_DTYPES, ndim=2)
        check_shape("score", score, tuple(w.shape))
        check_same_device(w=w, score=score)
    check_triton_device(w=w, score=score)
    check_finite("w", w)
    if score is not None:
        check_finite("score", score)
    if w.stride(1) != 1:
        w = w.contiguous()
    if score is not None and score.stride(1) != 1:
        score = score.contiguous()
    n, k = w.shape
    values = torch.empty((n, k // 2), dtype=torch.int8 if quantize else w.dtype, device=w.device)
    meta = torch.empty((n, k // 8), dtype=torch.uint8, device=w.device)
    scale = torch.empty((n,), dtype=torch.float32, device=w.device)
    if n > 0:
        block_k = block_k or min(256, max(16, triton.next_power_of_2(k)))
        if block_k < 16 or block_k & (block_k - 1):
            raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
        with device_guard(w):
            _prune_and_compress_24_kernel[(triton.cdiv(n, block_n),)](
                w, score if score is not None else w, values, meta, scale, n, k, w.stride(0),
                score.stride(0) if score is not None else 0, HAS_SCORE=score is not None, QUANTIZE=quantize,
                BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return (values, meta, scale) if quantize else (values, meta)


def _prune_and_compress_24_int8(w: Tensor, score: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    return prune_and_compress_24(w, score, quantize=True)


prune_and_compress_24_triton = register_backend("prune_and_compress_24", prune_and_compress_24)
prune_and_compress_24_int8_triton = register_backend("prune_and_compress_24_int8", _prune_and_compress_24_int8)
