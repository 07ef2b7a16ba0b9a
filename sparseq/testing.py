"""The tolerances of sparseq's formats, stated once: every test, benchmark check and
``sparseq tune`` candidate check compares against these elementwise bounds.

Kernel vs reference (same format, same operands). The reference computes a float matmul
from the exact operands in fp32 and casts once; a kernel multiplies the same exact operands
(bf16/fp16 products and int8-to-float conversions are exact in fp32; fp32 inputs use IEEE fp32
dots), accumulates in fp32 in another order and casts once. So, elementwise:

    |kernel - reference| <= eps(out) * |reference|      (one rounding to the output dtype)
                          + 2 (K + 2) eps32 * magnitude   (fp32 summation order, both sides)
                          + tiny(out)                     (subnormal outputs)

where ``magnitude = |x| @ |W|^T * |x_scale| * |w_scale| + |bias|``. int8 x int8 products
accumulate exactly in int32, so for W8A8 (``exact_accumulator=True``) only the epilogue's
few fp32 roundings and the one output rounding remain:

    |kernel - reference| <= eps(out) * |reference| + 4 eps32 * magnitude + tiny(out)

Layer vs the dense layer it replaces: ``F.linear(x, W, bias)`` with the layer's weight in
fp32 (``q * s`` for int8 weights, never rounded to the layer dtype), within the float bound
above. For W8A8 layers ``x`` is quantized and dequantized by the reference quantizer first:
the format defines that rounding, and the kernel must match it bit for bit. Exception: a CPU
path under the ``"fast"`` numerics that rounds activations otherwise (``impl.approximate``:
fbgemm's ``linear_dynamic`` form, or the dense bucket without activation quantization) is held
to that bound plus ``sparseq.cpu_fbgemm.error_bound``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

EPS32 = torch.finfo(torch.float32).eps


def magnitude(x: Tensor, w: Tensor, x_scale: Optional[Tensor] = None,
              w_scale: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
    """``|x| @ |w|^T`` scaled like the product, in fp64 on ``x``'s device (the bound itself is
    exact enough; a GPU computes it for large benchmark shapes in milliseconds)."""
    dev = x.device
    mag = x.detach().double().abs() @ w.detach().to(dev).double().abs().T
    if x_scale is not None:
        xs = x_scale.detach().to(dev).double().abs()
        mag = mag * (xs if xs.numel() == 1 else xs[:, None])  # per tensor, else per row (M = 0 too)
    if w_scale is not None:
        mag = mag * w_scale.detach().to(dev).double().abs()[None, :]
    if bias is not None:
        mag = mag + bias.detach().to(dev).double().abs()[None, :]
    return mag


def matmul_bound(expected: Tensor, k: int, mag: Tensor, exact_accumulator: bool = False) -> Tensor:
    """The elementwise fp64 bound on ``|out - expected|`` for an output of ``expected.dtype``
    (see the module docstring); ``mag`` from :func:`magnitude`."""
    info = torch.finfo(expected.dtype)
    terms = 4 if exact_accumulator else 2 * (k + 2)
    return info.eps * expected.detach().to(mag.device).double().abs() + terms * EPS32 * mag + info.tiny


def first_violation(out: Tensor, expected: Tensor, bound: Tensor) -> Optional[str]:
    """None when ``|out - expected| <= bound`` everywhere (NaN counts as a violation, as does a
    dtype or shape mismatch), else a message naming how many and the first offending element."""
    if out.dtype != expected.dtype:
        return f"dtype {out.dtype}, expected {expected.dtype}"
    if tuple(out.shape) != tuple(expected.shape):
        return f"shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
    exp = expected.detach().to(bound.device).double()
    err = (out.detach().to(bound.device).double() - exp).abs()
    bad = ~(err <= bound)  # NaN compares False: counted as bad
    if not bool(bad.any()):
        return None
    idx = tuple(int(v) for v in bad.nonzero()[0])
    return (f"{int(bad.sum())} of {bad.numel()} outputs out of tolerance; first {list(idx)}: got "
            f"{float(out[idx])}, reference {float(expected[idx])}, bound {float(bound[idx]):.3g}")


def check_matmul_close(out: Tensor, expected: Tensor, x: Tensor, w: Tensor,
                       x_scale: Optional[Tensor] = None, w_scale: Optional[Tensor] = None,
                       bias: Optional[Tensor] = None, exact_accumulator: Optional[bool] = None,
                       dense_fallback: bool = False, extra_bound: Optional[Tensor] = None) -> Optional[str]:
    """:func:`first_violation` of a kernel output against the reference output ``expected`` of
    ``x @ w^T`` (scaled, biased); ``exact_accumulator`` defaults to ``x`` and ``w`` both int8;
    ``dense_fallback`` adds the dense bucket's ``eps(dtype) * magnitude`` (see
    :func:`check_layer_close`); ``extra_bound`` (``[M, N]``) is added to the bound. Computed on the tensors' device in blocks of rows, so a large
    benchmark shape (16384 x 28672) needs no whole ``[M, N]`` fp64 temporaries; the message is
    :func:`first_violation`'s, row index counted from the top."""
    if out.dtype != expected.dtype or out.shape != expected.shape:
        return first_violation(out, expected, torch.zeros(()))
    if exact_accumulator is None:
        exact_accumulator = x.dtype == torch.int8 and w.dtype == torch.int8
    per_row = x_scale is not None and x_scale.numel() != 1
    step = max(1, (1 << 26) // max(1, w.shape[0]))
    n_bad, first = 0, None
    for r0 in range(0, max(out.shape[0], 1), step):
        rows = slice(r0, r0 + step)
        mag = magnitude(x[rows], w, x_scale[rows] if per_row else x_scale, w_scale, bias)
        bound = matmul_bound(expected[rows], x.shape[-1], mag, exact_accumulator)
        if dense_fallback:
            bound = bound + torch.finfo(out.dtype).eps * mag
        if extra_bound is not None:
            bound = bound + extra_bound[rows].detach().to(mag.device).double()
        exp = expected[rows].detach().to(mag.device).double()
        got = out[rows].detach().to(mag.device).double()
        bad = ~(((got - exp).abs() <= bound) | (got == exp))  # equal infinities agree; NaN is bad
        count = int(bad.sum())
        if count and first is None:
            i, j = (int(v) for v in bad.nonzero()[0])
            first = (r0 + i, j, float(bound[i, j]))
        n_bad += count
    if first is None:
        return None
    i, j, b = first
    return (f"{n_bad} of {out.numel()} outputs out of tolerance; first {[i, j]}: got {float(out[i, j])}, "
            f"reference {float(expected[i, j])}, bound {b:.3g}")


def assert_matmul_close(out: Tensor, expected: Tensor, x: Tensor, w: Tensor,
                        x_scale: Optional[Tensor] = None, w_scale: Optional[Tensor] = None,
                        bias: Optional[Tensor] = None, exact_accumulator: Optional[bool] = None) -> None:
    """Assert :func:`check_matmul_close` finds nothing."""
    msg = check_matmul_close(out, expected, x, w, x_scale, w_scale, bias, exact_accumulator)
    if msg is not None:
        raise AssertionError(msg)


def _stored_weight(layer) -> Tensor:
    """The layer's stored weight as dense ``[N, K]``: ``weight_q``, or the 2:4 ``values``
    decompressed (int8 for the int8 formats, float for 2:4), unscaled."""
    from . import reference

    if "weight_q" in layer._buffers:
        return layer.weight_q
    return reference.decompress_24(layer.values, layer.meta)


def _fp32_weight(layer) -> Tensor:
    """The layer's weight in fp32 without rounding to the layer dtype (int8 formats: ``q * s``
    in the smoothed space; the SmoothQuant factors are applied to the activations instead)."""
    w = _stored_weight(layer).float()
    if "w_scale" in layer._buffers:
        w = w * layer.w_scale.float()[:, None]
    return w


def layer_expected(layer, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(expected, x_used, w_used)``: the dense layer's output ``F.linear(x, W, bias)`` in fp32
    math, cast to ``x.dtype``. For W8A8 layers ``x`` is first quantized as the format defines
    (the reference quantizer, smoothing included) and dequantized, so the comparison states
    what the kernel must compute, not how far int8 activations are from float ones."""
    from . import reference

    x2 = x.detach().reshape(-1, x.shape[-1])
    w = _fp32_weight(layer).to(x2.device)
    if layer.FORMAT in ("w8a8", "2:4+w8a8"):
        if layer.x_scale is not None:
            xq = reference.quantize_per_tensor(x2, layer.x_scale, layer.smooth)
            xf = xq.float() * layer.x_scale.float()
        else:
            xq, xs = reference.quantize_per_token(x2, layer.smooth)
            xf = xq.float() * xs[:, None]
    else:
        if layer.FORMAT != "2:4" and getattr(layer, "smooth", None) is not None:
            xf = x2.float() / layer.smooth.float()
        else:
            xf = x2.float()
    bias = layer.bias
    expected = torch.nn.functional.linear(xf, w, None if bias is None else bias.float())
    return expected.to(x.dtype), xf, w


def check_layer_close(layer, x: Tensor, out: Optional[Tensor] = None, dense_fallback: bool = False,
                      approximate: Optional[bool] = None) -> Optional[str]:
    """:func:`check_matmul_close` of ``layer(x)`` (or a given ``out``) against the dense layer it
    replaces (:func:`layer_expected`), within the float-matmul bound of the module docstring.

    ``dense_fallback``: the output came from the layer's dense bucket (``F.linear`` on a dense
    copy in the compute dtype), whose operands are rounded once to that dtype (int8 ``q * s``
    weights, dequantized W8A8 activations): the bound grows by ``eps(dtype) * magnitude``.
    ``approximate``: the output came from a CPU path that rounds activations otherwise (see the
    module docstring); None: as the layer's resolved implementation for ``x`` says."""
    x2 = x.reshape(-1, x.shape[-1])
    if out is None:
        with torch.no_grad():
            out = layer(x2)
    out = out.reshape(-1, out.shape[-1])
    if approximate is None:
        approximate = is_approximate(layer, x2)
    dense_fallback = dense_fallback or runs_dense_bucket(layer, x2)
    expected, xf, w = layer_expected(layer, x2)
    extra = None
    if approximate:
        from .cpu_fbgemm import error_bound

        extra = error_bound(x2, _stored_weight(layer), layer.w_scale, layer.smooth, None)
        extra = extra + torch.finfo(out.dtype).eps * expected.double().abs()  # y rounded from another value
        dense_fallback = True  # the float-activation dense bucket rounds its weight copy to the dtype
    return check_matmul_close(out, expected, xf, w, bias=layer.bias, exact_accumulator=False,
                              dense_fallback=dense_fallback, extra_bound=extra)


def _impl_running(layer, x: Tensor):
    """The resolved implementation ``layer`` runs ``x`` (2-D) through, past per-call switches."""
    from . import dispatch

    key = (x.device, dispatch.bucket_of(x.shape[0]), x.dtype)
    impl = getattr(layer, "_impls", {}).get(key)
    while hasattr(impl, "chosen_for"):  # a per-call switch (thread count, M): the impl that runs x
        impl = impl.chosen_for(x)
    return impl


def is_approximate(layer, x: Tensor) -> bool:
    """Whether ``layer`` runs ``x`` (2-D) through an implementation marked ``approximate``."""
    return bool(getattr(_impl_running(layer, x), "approximate", False))


def runs_dense_bucket(layer, x: Tensor) -> bool:
    """Whether ``layer`` runs ``x`` (2-D) through its dense bucket (``nn.base.dense_bucket``)."""
    return bool(getattr(_impl_running(layer, x), "dense_bucket", False))


def assert_layer_close(layer, x: Tensor, out: Optional[Tensor] = None, dense_fallback: bool = False) -> None:
    """Assert :func:`check_layer_close` finds nothing."""
    msg = check_layer_close(layer, x, out, dense_fallback)
    if msg is not None:
        raise AssertionError(f"{type(layer).__name__} ({getattr(layer, 'FORMAT', '')}): {msg}")
