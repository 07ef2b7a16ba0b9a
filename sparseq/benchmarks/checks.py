"""Output checks: every benchmarked output is compared with the reference math of its format
(elementwise, within the bounds of ``sparseq.testing``; integer outputs must be equal) before
it is timed, and a sparseq layer with the dense layer it replaces.

A wrong output becomes an error row, never a time.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from .. import reference as ref
from .. import testing
from ..testing import check_matmul_close

if TYPE_CHECKING:
    from .contenders import Contender


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Reference matmuls in full fp32 (no TF32), whatever the caller set."""
    mm = torch.backends.cuda.matmul
    old, mm.allow_tf32 = mm.allow_tf32, False
    try:
        yield
    finally:
        mm.allow_tf32 = old


def first_difference(out: Tensor, expected: Tensor) -> Optional[str]:
    """``testing.first_violation`` with a zero bound: integer outputs must equal the reference."""
    zero = torch.zeros(expected.shape, dtype=torch.float64, device=expected.device)
    return testing.first_violation(out, expected, zero)


def check_layer(layer: torch.nn.Module, x: Tensor, out: Tensor) -> Optional[str]:
    """``testing.check_layer_close`` of ``out``, a sparseq layer's output on ``x``, against the dense
    layer it replaces (``testing.layer_expected``); the dense bucket's wider bound when the layer
    ran its dense copy for this M (``layer.backends``)."""
    from .. import dispatch

    x2 = x.reshape(-1, x.shape[-1])
    key = (x2.device, dispatch.bucket_of(x2.shape[0]), x2.dtype)
    dense = getattr(layer, "backends", {}).get(key) == "dense"
    with ieee_fp32():
        return testing.check_layer_close(layer, x2, out, dense_fallback=dense)


def quant_w(w: Tensor) -> Tuple[Tensor, Tensor]:
    """The reference per-channel int8 weight ``(q, scale)`` every int8 contender gets."""
    return ref.quantize_per_channel(w)


def quant_x(x: Tensor) -> Tuple[Tensor, Tensor]:
    """The reference per-token int8 activations ``(q, scale)``."""
    return ref.quantize_per_token(x)


CHECK_KINDS = {
    "float": "x @ w^T in fp32, cast once (the float-matmul bound)",
    "int8_weight_only": "reference int8_weight_only_mm of the per-channel int8 weight",
    "w8a8": "reference int8_mm of per-token x and per-channel w (exact int32 accumulator)",
    "int32": "the exact int32 accumulator of per-token x and per-channel w (equal)",
    "int8_saturated": "that accumulator saturated to int8 (equal)",
    "fp8": "fp32 (x8 @ w8^T) * s_x * s_w of the per-tensor e4m3 operands",
    "layer": "the dense layer a sparseq.nn layer replaces (testing.layer_expected)",
}
"""Reference kinds a contender's output is checked against (``Contender.expect``)."""


def _reference(kind: str, x: Tensor, w: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Optional[Tuple]]:
    """``(expected output, bound operands (x, w, x_scale, w_scale))`` of a kind; operands None: exact."""
    with ieee_fp32():
        if kind == "float":
            return (x.float() @ w.float().T).to(dtype), (x, w, None, None)
        if kind == "fp8":
            (x8, s_x), (w8, s_w) = fp8_per_tensor(x), fp8_per_tensor(w)
            xf, wf = x8.float(), w8.float()
            return ((xf @ wf.T) * (s_x * s_w)).to(dtype), (xf, wf, s_x.reshape(1), s_w.reshape(1).expand(w.shape[0]))
        wq, sw = quant_w(w)
        if kind == "int8_weight_only":
            return ref.int8_weight_only_mm(x, wq, sw).to(dtype), (x, wq, None, sw)
        xq, sx = quant_x(x)
        if kind == "w8a8":
            return ref.int8_mm(xq, wq, sx, sw, None, dtype), (xq, wq, sx, sw)
        if kind == "int32":
            return ref.int8_matmul_int32(xq, wq), None
        if kind == "int8_saturated":
            return ref.int8_matmul_int32(xq, wq).clamp(-128, 127).to(torch.int8), None
    raise ValueError(f"unknown reference kind {kind!r}; choose from {sorted(CHECK_KINDS)}")


def reference_check(kind: str, x: Tensor, w: Tensor, dtype: torch.dtype) -> Callable[..., Optional[str]]:
    """``check(out, tol=None) -> None or what is wrong`` against the reference ``kind`` of ``x @ w^T``:
    elementwise within ``sparseq.testing.check_matmul_close`` (integer outputs: equal), or relative L2 ``<= tol``."""
    expected, operands = _reference(kind, x, w, dtype)

    def check(out: Tensor, tol: Optional[float] = None) -> Optional[str]:
        out = out[0] if isinstance(out, (tuple, list)) else out
        if tol is not None:
            err = rel_error(out, expected)
            return None if err <= tol else f"relative L2 error {err:.3g} > {tol:g}"
        if operands is None:
            return first_difference(out, expected)
        return check_matmul_close(out, expected, *operands)

    return check


def fp8_per_tensor(t: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-tensor e4m3 quantization: ``(t / s).to(fp8), s`` with ``s = max|t| / 448``."""
    s = (t.abs().max().float() / 448.0).clamp_min(1e-12)
    return (t.float() / s).to(torch.float8_e4m3fn), s

def rel_error(y: Tensor, expected: Tensor) -> float:
    """``||y - expected|| / ||expected||`` in fp32."""
    y = y[0] if isinstance(y, (tuple, list)) else y
    if tuple(y.shape) != tuple(expected.shape):
        raise ValueError(f"output shape {tuple(y.shape)} != expected {tuple(expected.shape)}")
    diff = (y.float() - expected.float()).norm()
    return float(diff / expected.float().norm().clamp_min(1e-12))


def check_output(c: Contender, state: Any, x: Tensor, y: Tensor, refs: Dict[Tuple[str, bool], Callable],
                 w: Tensor, dtype: torch.dtype) -> str:
    """Check ``y`` of contender ``c`` (``w``: the weight it was given); returns the row's ``checked``
    value, raises ``AssertionError("wrong result: ...")`` when the output is wrong."""
    if not c.expect:
        if not c.unchecked:
            raise ValueError("no reference to check the output against: give the contender an expect kind "
                             "or an unchecked reason")
        return "no: " + c.unchecked
    if c.expect == "layer":
        msg = check_layer(state[0], x, y[0] if isinstance(y, (tuple, list)) else y)
    else:
        key = (c.expect, c.sparse)
        if key not in refs:
            refs[key] = reference_check(c.expect, x, w, dtype)
        msg = refs[key](y, c.tol)
    if msg is not None:
        raise AssertionError(f"wrong result: {msg} (vs the {c.expect} reference)")
    return "yes" if c.tol is None else f"approx: relative L2 <= {c.tol:g} vs the {c.expect} reference"


