"""Pieces shared by the Triton kernels: device checks, op registration, exact rounding, the
scale/bias epilogue and the split-K reduction kernel."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, ContextManager, Optional

import torch
import triton
import triton.language as tl

from sparseq import ops
from sparseq._checks import check_same_device, check_tensor

from .configs import MatmulConfig


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_triton_device(**tensors: Optional[torch.Tensor]) -> None:
    """Triton runs CUDA tensors, or CPU tensors under the interpreter (``TRITON_INTERPRET=1``)."""
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type == "cuda" or (interpreting() and t.device.type == "cpu"):
            continue
        raise ValueError(
            f"{name} is on {t.device}: the Triton kernels need CUDA tensors "
            "(or CPU tensors with TRITON_INTERPRET=1)"
        )


def check_int8_weight_operands(x_name: str, x: torch.Tensor, x_dtypes, wq: torch.Tensor) -> None:
    """``x[M, K]`` of ``x_dtypes`` and the int8 weight ``wq[N, K]``: 2-D, one device, same K."""
    check_tensor(x_name, x, dtypes=x_dtypes, ndim=2)
    check_tensor("wq", wq, dtypes=(torch.int8,), ndim=2)
    check_same_device(**{x_name: x, "wq": wq})
    if x.shape[1] != wq.shape[1]:
        raise ValueError(f"x has K={x.shape[1]} but wq expects K={wq.shape[1]}")


def device_guard(t: torch.Tensor) -> ContextManager:
    """Launch on ``t``'s GPU (Triton launches on the current device), a no-op on the CPU."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def register_backend(name: str, impl: Callable):
    """Register the kernel wrapper ``impl`` as ``sparseq::<name>_triton`` with the schema of the
    public op ``sparseq::<name>`` (signatures live in ``sparseq.reference`` only). A wrapper
    with a ``check`` keyword gives layers an unchecked launcher (``sparseq.ops.launcher``)."""
    return ops.register_backend(name, "triton", impl)


# ------------------------------------------------------------------------ device helpers


@triton.jit
def round_half_even(y):
    """Round fp32 ``y`` to the nearest integer, ties to even (``torch.round``), as int32.

    Exact integer arithmetic (truncate, compare the exact remainder): no libdevice call (the
    interpreter has none) and no magic-number addition a compiler could reassociate away.
    Valid for |y| < 2**31 (the callers clamp to int8 afterwards).
    """
    a = tl.abs(y)
    r = a.to(tl.int32)  # truncation == floor for a >= 0
    d = a - r.to(tl.float32)  # exact: r and a share the exponent range (Sterbenz) or r == 0
    up = (d > 0.5) | ((d == 0.5) & ((r & 1) == 1))
    r = r + up.to(tl.int32)
    return tl.where(y < 0, -r, r)


@triton.jit
def to_int8(x, scale):
    """``clamp(round(x / scale), -127, 127)`` as int8, bit-exact with the reference: correctly
    rounded division (never the approximate fp32 ``/``), ties to even. The quotient is clamped to
    +-128 before rounding so an overflowing one (a subnormal scale) saturates like torch's, and
    0/0 (a scale that underflowed to 0) gives 0 as torch's NaN -> int8 conversion does."""
    y = tl.math.div_rn(x, scale)
    y = tl.where(y == y, tl.minimum(tl.maximum(y, -128.0), 128.0), 0.0)
    q = round_half_even(y)
    return tl.minimum(tl.maximum(q, -127), 127).to(tl.int8)


@triton.jit
def scale_bias_store(acc, offs_m, offs_n, M, N, out_ptr, stride_om, stride_on,
                     x_scale_ptr, w_scale_ptr, bias_ptr,
                     HAS_X_SCALE: tl.constexpr, X_SCALE_PER_TOKEN: tl.constexpr,
                     HAS_W_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``out = fp32(acc) * x_scale[:, None] * w_scale[None, :] + bias`` cast to the output dtype,
    in the reference's order (left to right, fp32), ragged edges masked."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    y = acc.to(tl.float32)
    if HAS_X_SCALE:
        if X_SCALE_PER_TOKEN:
            xs = tl.load(x_scale_ptr + offs_m, mask=mask_m, other=0.0)  # 0: no overflow in dead lanes
            y = y * xs[:, None]
        else:
            y = y * tl.load(x_scale_ptr)
    if HAS_W_SCALE:
        ws = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
        y = y * ws[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        y = y + b[None, :]
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order (Triton tutorial 03): GROUP_M row tiles share each weight column tile in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % group_m)
    pid_n = (pid % in_group) // group_m
    return pid_m, pid_n


@triton.jit
def k_range(K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """The slice of K of split ``program_id(1)``: its first K tile and ``[k_start, k_end)``
    (whole BLOCK_K tiles; offsets derived from the tile index keep their alignment provable)."""
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    tile0 = tl.program_id(1) * per_split
    k_start = tile0 * BLOCK_K
    k_end = tl.minimum(k_start + per_split * BLOCK_K, K)
    return tile0, k_start, k_end


@triton.jit
def _splitk_epilogue_kernel(acc_ptr, out_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, M, N,
                            stride_om, stride_on,
                            HAS_X_SCALE: tl.constexpr, X_SCALE_PER_TOKEN: tl.constexpr,
                            HAS_W_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Second half of split-K: the SPLIT_K partials (int32 or fp32, [SPLIT_K, M, N] contiguous)
    summed in split order (deterministic: no atomics) and put through the epilogue."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = acc_ptr + offs_m[:, None] * N + offs_n[None, :]
    acc = tl.load(ptrs, mask=mask, other=0)
    for split in range(1, SPLIT_K):
        acc += tl.load(ptrs + split * M * N, mask=mask, other=0)
    scale_bias_store(acc, offs_m, offs_n, M, N, out_ptr, stride_om, stride_on, x_scale_ptr, w_scale_ptr, bias_ptr,
                     HAS_X_SCALE, X_SCALE_PER_TOKEN, HAS_W_SCALE, HAS_BIAS)


@triton.jit
def store_partial(acc, offs_m, offs_n, M, N, acc_ptr):
    """First half of split-K: split ``program_id(1)`` stores its partial tile into its own slice
    of the ``[SPLIT_K, M, N]`` workspace (every element is written once: no zeroing pass, no read-modify-write)."""
    rows = tl.program_id(1) * M + offs_m  # int32: split-K runs at M <= 64 only (split * M * N < 2**31)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    # A relaxed exchange writes each element once, like a store (the sum stays deterministic);
    # with a plain tl.store, ptxas spills a register in the sm90 int8 decode config (kernels.aot).
    # Exchanged as int32 bits (fp32 partials too: the interpreter's exchange takes integers only).
    bits = acc.to(tl.int32, bitcast=True)
    ptrs = acc_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * N + offs_n[None, :]
    tl.atomic_xchg(ptrs, bits, mask=mask, sem="relaxed")


def splitk_workspace(split: int, m: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ``[split, M, N]`` partial-sum buffer: uninitialized (each split writes its whole slice),
    so it costs the caching allocator a lookup and no memset launch."""
    return torch.empty((split, m, n), dtype=dtype, device=device)


def splitk_epilogue(acc: torch.Tensor, out: torch.Tensor, x_scale: Optional[torch.Tensor],
                    w_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> None:
    """Launch :func:`_splitk_epilogue_kernel` over ``out``."""
    split, m, n = acc.shape
    bm, bn = 32, 128
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    dummy = acc
    _splitk_epilogue_kernel[grid](
        acc, out, x_scale if x_scale is not None else dummy, w_scale if w_scale is not None else dummy,
        bias if bias is not None else dummy, m, n, out.stride(0), out.stride(1),
        HAS_X_SCALE=x_scale is not None, X_SCALE_PER_TOKEN=x_scale is not None and x_scale.shape[0] > 1,
        HAS_W_SCALE=w_scale is not None, HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)


def launch_meta(cfg: MatmulConfig, k: int, allow_even_k: bool = True) -> dict:
    """The constexpr/launch keyword arguments of a GEMM kernel for ``cfg`` and reduction length ``k``
    (``EVEN_K``: every K tile is full, so the main loop loads without masks and vectorizes fully)."""
    return dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, SPLIT_K=cfg.SPLIT_K,
                EVEN_K=allow_even_k and k % cfg.BLOCK_K == 0,
                GROUP_M=cfg.GROUP_M, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def gemm_grid(m: int, n: int, cfg: MatmulConfig) -> tuple:
    return (-(-m // cfg.BLOCK_M) * -(-n // cfg.BLOCK_N), cfg.SPLIT_K)  # plain ints: no call into triton
