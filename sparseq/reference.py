"""The single source of truth for every sparseq format and op, in pure PyTorch.

Every kernel (Triton, CUTLASS) is tested against these functions. They run on any device
(CPU included), check their inputs and never return a silently wrong answer.

Formats
-------
2:4 along K
    ``W[N, K]`` (out x in, as ``nn.Linear.weight``) is 2:4 sparse when each run of four
    consecutive input features of a row ``W[n, 4g:4g+4]`` holds at most two non-zeros.
    ``-0.0`` counts as zero.
Canonical compressed form (``FORMAT_VERSION``)
    ``values[N, K/2]`` (the weight dtype) and ``meta[N, K/8]`` uint8. Group ``g`` of row
    ``n`` keeps positions ``i0 < i1`` and stores ``values[n, 2g] = W[n, 4g+i0]``,
    ``values[n, 2g+1] = W[n, 4g+i1]`` and the 4-bit code ``i0 | i1 << 2`` in
    ``meta[n, g // 2]``, low nibble for even ``g``. A group with fewer than two non-zeros
    fills the remaining slots with its lowest-index zero positions, stored as ``+0.0``.
    ``K`` must be a multiple of 8. ``decompress_24(*compress_24(W))`` equals ``W`` bit for
    bit, except that zeros come back as ``+0.0`` (the sign of a zero is not kept).
int8 weights
    Symmetric per output channel: ``s[n] = max|W[n]| / 127`` (fp32; 1.0 for an all-zero
    row), ``q = clamp(round(W / s), -127, 127)`` with round-half-to-even. Every op takes any
    int8 weight (``-128`` included: checkpoints quantized on a 255-level grid, e.g.
    compressed-tensors', hold it); only this quantizer's output stays within ``[-127, 127]``.
int8 activations
    Dynamic per token ``s_x[m] = max|X[m] / f| / 127`` (1.0 for an all-zero row) or static
    per tensor (a given fp32 scale). ``f[K]`` are optional SmoothQuant factors: the
    activation is divided by ``f`` (and the weight multiplied by it) before quantizing.
W8A8 output
    ``Y = fp32(Xq @ Wq^T) * s_x[:, None] * s_w[None, :] + bias`` computed in fp32 (the
    int32 accumulator is exact) and cast to the requested dtype.
Float matmuls
    Computed in fp32 from the exact operands and cast to the activation dtype: the
    tolerance of a kernel is measured against this.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._checks import (
    FLOAT_DTYPES,
    WEIGHT_DTYPES,
    check_bias,
    check_finite,
    check_multiple,
    check_positive,
    check_same_device,
    check_scale_vector,
    check_shape,
    check_tensor,
)

FORMAT_VERSION = 1
"""Version of the canonical compressed 2:4 form and of the int8 scale layout."""

INT8_MAX = 127
INT8_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# --------------------------------------------------------------------------- 2:4 pruning


def _groups(name: str, w: torch.Tensor) -> torch.Tensor:
    """View a [N, K] weight as [N, K/4, 4] groups along K."""
    check_tensor(name, w, ndim=2)
    check_multiple(name, w.shape[1], 4, "K (dim 1)")
    return w.reshape(w.shape[0], w.shape[1] // 4, 4)


def prune_24(w: torch.Tensor, score: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean mask keeping the 2 largest entries of each group of 4 along K.

    Ranks by ``|w|`` or by ``score`` (same shape, e.g. Wanda's ``|W| * ||X_j||``); ties go
    to the lower index, so the mask is deterministic and every kernel can reproduce it.
    """
    check_tensor("w", w, dtypes=WEIGHT_DTYPES, ndim=2)
    _groups("w", w)
    if score is None:
        score = w.abs() if w.dtype != torch.int8 else w.to(torch.int16).abs()
    else:
        check_tensor("score", score, ndim=2)
        check_shape("score", score, tuple(w.shape))
        check_same_device(w=w, score=score)
    check_finite("w", w)
    check_finite("score", score)
    g = _groups("score", score)
    order = torch.argsort(g, dim=-1, descending=True, stable=True)[..., :2]
    mask = torch.zeros(g.shape, dtype=torch.bool, device=w.device)
    mask.scatter_(-1, order, True)
    return mask.reshape(w.shape)


def is_24_sparse(w: torch.Tensor) -> bool:
    """True when every group of 4 along K of the 2-D ``w`` has at most 2 non-zeros."""
    check_tensor("w", w, ndim=2)
    if w.shape[1] % 4 != 0:
        return False
    return bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())


def _first_dense_group(nonzeros: torch.Tensor) -> Tuple[int, int, int]:
    bad = (nonzeros > 2).nonzero()[0]
    row, group = int(bad[0]), int(bad[1])
    return row, group, int(nonzeros[row, group])


# ------------------------------------------------------------------ compressed 2:4 form


def check_compressed_24(values: torch.Tensor, meta: torch.Tensor) -> Tuple[int, int]:
    """Validate a canonical (values, meta) pair; returns the dense shape (N, K)."""
    check_tensor("values", values, dtypes=WEIGHT_DTYPES, ndim=2, contiguous=True)
    check_tensor("meta", meta, dtypes=(torch.uint8,), ndim=2, contiguous=True)
    check_same_device(values=values, meta=meta)
    n, half_k = values.shape
    check_multiple("values", half_k, 4, "K/2 (dim 1)")
    k = 2 * half_k
    check_shape("meta", meta, (n, k // 8))
    return n, k


def compress_24(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4-sparse ``w[N, K]`` into canonical ``(values[N, K/2], meta[N, K/8])``."""
    check_tensor("w", w, dtypes=WEIGHT_DTYPES, ndim=2)
    check_multiple("w", w.shape[1], 8, "K (dim 1)")
    check_finite("w", w)
    n, k = w.shape
    g = w.reshape(n, k // 4, 4)
    nz = g != 0
    nonzeros = nz.sum(-1)
    if w.device.type != "meta" and bool((nonzeros > 2).any()):
        row, group, count = _first_dense_group(nonzeros)
        raise ValueError(
            f"w is not 2:4 sparse: row {row}, group {group} (columns {4 * group}..{4 * group + 3}) "
            f"has {count} non-zeros; prune it first (sparseq.prune_24)"
        )
    # Non-zero positions first, then the lowest-index zero positions as fillers.
    pos = torch.arange(4, device=w.device)
    key = (~nz).to(torch.int64) * 4 + pos
    idx = torch.sort(torch.argsort(key, dim=-1)[..., :2], dim=-1).values
    vals = torch.gather(g, -1, idx)
    vals = torch.where(vals == 0, torch.zeros_like(vals), vals)  # -0.0 -> +0.0
    codes = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)  # [N, K/4]
    meta = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return vals.reshape(n, k // 2).contiguous(), meta.contiguous()


def unpack_meta_24(meta: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positions ``(i0, i1)`` of the kept values, each int64 [N, K/4]."""
    m = meta.to(torch.int64)
    codes = torch.stack((m & 0xF, m >> 4), dim=-1).reshape(meta.shape[0], -1)
    return codes & 3, codes >> 2


def check_meta_codes(meta: torch.Tensor, name: str = "meta") -> None:
    """Every 4-bit code of ``meta`` must keep two distinct positions ``i0 < i1`` (six of the
    sixteen codes). One vectorized pass; the error names the first bad row and group."""
    if meta.device.type == "meta" or meta.numel() == 0:
        return
    m = meta
    bad_byte = ((m & 3) >= ((m >> 2) & 3)) | (((m >> 4) & 3) >= (m >> 6))  # uint8 ops: no int64 copy
    if bool(bad_byte.any()):
        i0, i1 = unpack_meta_24(meta)
        bad = i0 >= i1
        row, group = (int(v) for v in bad.nonzero()[0])
        code = int(i0[row, group] | (i1[row, group] << 2))
        raise ValueError(f"{name} is corrupt: row {row}, group {group} (columns {4 * group}..{4 * group + 3}) has "
                         f"code {code:#x} (positions {code & 3}, {code >> 2}); a valid code keeps i0 < i1")


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Expand canonical ``(values, meta)`` back to the dense ``w[N, K]``."""
    n, k = check_compressed_24(values, meta)
    check_meta_codes(meta)
    i0, i1 = unpack_meta_24(meta)
    out = torch.zeros(n, k // 4, 4, dtype=values.dtype, device=values.device)
    v = values.reshape(n, k // 4, 2)
    out.scatter_(-1, torch.stack((i0, i1), dim=-1), v)
    return out.reshape(n, k)


# ------------------------------------------------------------------------ quantization


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    """``max |x[i, :]|`` per row; 0 for rows of length 0 (an empty row counts as all-zero)."""
    if x.shape[1] == 0:
        return x.new_zeros(x.shape[0])
    return x.abs().amax(dim=1)


def absmax_scale(amax: torch.Tensor) -> torch.Tensor:
    """The symmetric int8 scale for an absolute maximum: ``amax / 127`` (1.0 where it is 0; a
    NaN maximum stays NaN, so a row holding NaN never gets a finite scale)."""
    return torch.where(amax == 0, torch.ones_like(amax), amax / INT8_MAX)


def round_to_int8_grid(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``clamp(round(x / scale), -127, 127)`` (round half to even), still in ``x``'s dtype."""
    return torch.clamp(torch.round(x / scale), -INT8_MAX, INT8_MAX)


def _round_to_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return round_to_int8_grid(x, scale).to(torch.int8)


def quantize_per_channel(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns ``(q int8[N, K], scale fp32[N])``."""
    check_tensor("w", w, dtypes=FLOAT_DTYPES, ndim=2)
    check_finite("w", w)
    wf = w.float()
    scale = absmax_scale(row_absmax(wf))
    return _round_to_int8(wf, scale[:, None]), scale


def _smoothed(x: torch.Tensor, smooth: Optional[torch.Tensor]) -> torch.Tensor:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2)
    if smooth is not None:
        check_scale_vector("smooth", smooth, x.shape[1], x)
        check_positive("smooth", smooth)
    return x.float() if smooth is None else x.float() / smooth


def quantize_per_token(
    x: torch.Tensor, smooth: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token int8 of ``x[M, K]`` (optionally divided by SmoothQuant ``smooth[K]``).

    Returns ``(q int8[M, K], scale fp32[M])``.
    """
    xs = _smoothed(x, smooth)
    check_finite("x", xs)
    grid, scale = _on_grid(xs, None)
    return grid.to(torch.int8), scale


def quantize_per_tensor(
    x: torch.Tensor, scale: torch.Tensor, smooth: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Static per-tensor int8 of ``x[M, K]`` with a calibrated fp32 ``scale`` of shape (1,)."""
    xs = _smoothed(x, smooth)
    check_scale_vector("scale", scale, 1, x)
    check_positive("scale", scale)
    check_finite("x", xs)
    return _on_grid(xs, scale)[0].to(torch.int8)


def activation_grid(x: torch.Tensor, smooth: Optional[torch.Tensor] = None,
                    scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The arithmetic of :func:`quantize_per_token` (``scale`` None: per-token scales) and
    :func:`quantize_per_tensor` (the given static ``scale``), without their checks: the values
    on the int8 grid, still fp32, and the scale per row ``[M]``. No value check, so no host sync:
    for paths that checked their inputs once (layers). A row holding NaN or Inf gets a NaN or
    Inf scale (a static scale too), so its output is not finite, as ``nn.Linear``'s would be,
    instead of finite numbers from an undefined int8 cast."""
    xs = x.float() if smooth is None else x.float() / smooth
    grid, rows = _on_grid(xs, scale)
    if scale is not None:
        rows = scale.expand(xs.shape[0]) + row_absmax(xs) * 0  # + NaN where a row is not finite
    return grid, rows


def _on_grid(xs: torch.Tensor, scale: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Smoothed fp32 activations on the int8 grid, with per-token scales where ``scale`` is None."""
    if scale is None:
        scale = absmax_scale(row_absmax(xs))
        return round_to_int8_grid(xs, scale[:, None]), scale
    return round_to_int8_grid(xs, scale), scale


def per_tensor_scale(amax: float) -> torch.Tensor:
    """The static activation scale for a calibrated absolute maximum."""
    return absmax_scale(torch.tensor([float(amax)], dtype=torch.float32))


# ---------------------------------------------------------------------------- matmuls


def _check_x_w(x: torch.Tensor, w: torch.Tensor, w_name: str, k: int) -> None:
    check_same_device(x=x, **{w_name: w})
    if x.shape[1] != k:
        raise ValueError(f"x has K={x.shape[1]} but {w_name} expects K={k}")


def _check_out_dtype(out_dtype: torch.dtype) -> None:
    if out_dtype not in INT8_OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of bfloat16, float16, float32, got {out_dtype}")


def int8_matmul_int32(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``xq[M, K] @ wq[N, K]^T`` (through float64: every partial sum is exact)."""
    check_tensor("xq", xq, dtypes=(torch.int8,), ndim=2)
    check_tensor("wq", wq, dtypes=(torch.int8,), ndim=2)
    _check_x_w(xq, wq, "wq", wq.shape[1])
    if xq.shape[1] * INT8_MAX * 128 >= 2**31:
        raise ValueError(f"K={xq.shape[1]} is too large for an int32 accumulator")
    return (xq.double() @ wq.double().T).to(torch.int32)


def _epilogue(acc: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    y = acc * scale
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def int8_mm(
    xq: torch.Tensor,
    wq: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """W8A8: ``fp32(xq @ wq^T) * x_scale[:, None] * w_scale[None, :] + bias`` -> ``out_dtype``.

    ``x_scale`` is per token ``[M]`` (dynamic) or ``[1]`` (static per tensor).
    """
    _check_out_dtype(out_dtype)
    acc = int8_matmul_int32(xq, wq)
    m, n = acc.shape
    check_scale_vector("x_scale", x_scale, m, xq, allow_scalar=True)
    check_scale_vector("w_scale", w_scale, n, xq)
    check_positive("x_scale", x_scale)
    check_positive("w_scale", w_scale)
    check_bias(bias, n, xq)
    return _epilogue(acc.float() * x_scale[:, None], w_scale[None, :], bias, out_dtype)


def int8_weight_only_mm(
    x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Float activations x int8 weights: ``(fp32(x @ wq^T) * w_scale + bias)`` in ``x.dtype``."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2)
    check_tensor("wq", wq, dtypes=(torch.int8,), ndim=2)
    _check_x_w(x, wq, "wq", wq.shape[1])
    n = wq.shape[0]
    check_scale_vector("w_scale", w_scale, n, x)
    check_positive("w_scale", w_scale)
    check_bias(bias, n, x)
    acc = x.float() @ wq.float().T
    return _epilogue(acc, w_scale[None, :], bias, x.dtype)


def sparse24_mm(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``x[M, K] @ W^T + bias`` with ``W`` given in canonical 2:4 form of ``x.dtype`` values."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2)
    n, k = check_compressed_24(values, meta)
    if values.dtype != x.dtype:
        raise TypeError(f"values dtype {values.dtype} must match x dtype {x.dtype}")
    _check_x_w(x, values, "values", k)
    check_bias(bias, n, x)
    w = decompress_24(values, meta)
    y = x.float() @ w.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def sparse24_int8_mm(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    w_scale: torch.Tensor,
    x_scale: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """2:4 weight with int8 values and per-channel ``w_scale``.

    W8A8 when ``x`` is int8 (``x_scale`` required, output ``out_dtype``, default bf16);
    weight-only when ``x`` is bf16/fp16/fp32 (no ``x_scale``, output ``x.dtype``).
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES + (torch.int8,), ndim=2)
    check_compressed_24(values, meta)
    check_tensor("values", values, dtypes=(torch.int8,))
    wq = decompress_24(values, meta)
    if x.dtype == torch.int8:
        if x_scale is None:
            raise ValueError("x_scale is required when x is int8 (W8A8)")
        return int8_mm(x, wq, x_scale, w_scale, bias, out_dtype or torch.bfloat16)
    if x_scale is not None:
        raise ValueError("x_scale must be None when x is a float tensor (weight-only)")
    if out_dtype is not None and out_dtype != x.dtype:
        raise TypeError(f"weight-only output dtype is x.dtype ({x.dtype}); got out_dtype={out_dtype}")
    return int8_weight_only_mm(x, wq, w_scale, bias)


def prune_and_compress_24(
    w: torch.Tensor, score: Optional[torch.Tensor] = None, quantize: bool = False
) -> Tuple[torch.Tensor, ...]:
    """Dense ``w`` -> 2:4 prune (``prune_24``) -> canonical ``(values, meta)``.

    With ``quantize=True`` the kept values are quantized per channel as well and
    ``(qvalues int8, meta, scale fp32[N])`` is returned (the scale of the pruned weight).
    """
    check_tensor("w", w, dtypes=FLOAT_DTYPES, ndim=2)
    check_multiple("w", w.shape[1], 8, "K (dim 1)")
    pruned = torch.where(prune_24(w, score), w, torch.zeros_like(w))
    values, meta = compress_24(pruned)
    if not quantize:
        return values, meta
    qvalues, scale = quantize_per_channel(values)
    return qvalues, meta, scale
