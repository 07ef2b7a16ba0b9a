"""CPU W8A8 through fbgemm's dynamic int8 linear (the ``fbgemm`` dispatch backend): the fast
CPU path at small M, under the default ``"fast"`` CPU numerics (``sparseq.cpu_numerics``).

``torch.ops.quantized.linear_dynamic`` quantizes the activations itself in one fused C++ pass
and multiplies them by a per-channel int8 weight prepacked once (what
``torch.ao.quantization.quantize_dynamic`` runs); on a 2-core Xeon it takes ~20 us where the
format's exact path (:mod:`sparseq.cpu_ops`: per-token quantization in torch ops + a oneDNN or
``_int_mm`` GEMM + epilogue) takes 40-100 us at M <= 16.

fbgemm quantizes per *tensor*, asymmetric uint8 over ``[min(x, 0), max(x, 0)]``; the format
quantizes per *token*, symmetric int8 (``amax / 127``). So each row is first divided by its own
``max |x|`` (NaN/Inf and the 0/0 of all-zero rows zeroed): every row then lies in ``[-1, 1]`` and
fbgemm's one step ``(hi - lo) / 255 <= 2 / 255`` is, in the row's own units, at most the format's
per-token step ``amax / 127``. The output rows are multiplied back by ``amax`` and the bias is
added last. A single finite row (decode) goes to fbgemm as it is: its tensor is its token
(saves five ops, ~5 us). Rounding differs from the reference (:func:`error_bound` states the bound, tested);
the reference stays the definition, and ``sparseq.cpu_numerics("exact")`` runs the bit-exact
path instead. Static activation scales are not run here (fbgemm would ignore their clamp).

A row holding NaN or Inf gives a non-finite output row, as in the reference (fbgemm itself
raises on NaN: they are zeroed before it and the row's NaN/Inf ``amax`` restores them).
"""
from __future__ import annotations

import functools
import math
import threading
import warnings
import weakref
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from . import cpu_kernels

_engine_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str:
    """"" where fbgemm's dynamic int8 linear runs on this machine, else why not (checked once)."""
    return _probe()


def _probe() -> str:
    engines = torch.backends.quantized.supported_engines
    if "fbgemm" not in engines and "x86" not in engines:
        return f"this torch has no fbgemm quantized engine (engines: {', '.join(engines)})"
    try:  # a tiny product, within the stated bound of the exact one
        wq = torch.tensor([[1, -2, 3, 4], [127, -127, 5, 0]], dtype=torch.int8)
        x = torch.tensor([[1.0, -1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.25, -2.0, 0.0]])
        y = run(x, prepack(wq, torch.ones(2)), None, None, torch.float32)
        want = x @ wq.float().t()
        if not ((y - want).abs() <= error_bound(x, wq, torch.ones(2), None, None)).all():
            return f"fbgemm int8 self-test gave {y.tolist()}, expected {want.tolist()} within its bound"
    except Exception as e:  # noqa: BLE001
        return f"fbgemm int8 self-test failed: {type(e).__name__}: {e}"
    return ""


def reduce_range() -> bool:
    """fbgemm's 7-bit activation range: needed where the CPU has no VNNI (``vpmaddubsw`` then
    saturates int16 pairs of 255 x 127 products); VNNI/AMX accumulate exactly in int32."""
    return not _cpu_has_vnni()


@functools.lru_cache(maxsize=None)
def _cpu_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_vnni", " avx_vnni", " amx_int8"))


def prepack(wq: Tensor, w_scale: Tensor) -> object:
    """fbgemm's packed form of an int8 weight ``[N, K]`` with per-channel scales (built once per
    layer; no bias: it is added after the rows are scaled back). Packed under the fbgemm engine
    whatever ``torch.backends.quantized.engine`` says (the user's setting is restored)."""
    n = wq.shape[0]
    with warnings.catch_warnings():  # quantized tensors are deprecated in torch 2.14: only the packer takes one
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(wq.contiguous(), w_scale.double(),
                                                      torch.zeros(n, dtype=torch.long), 0)
        with _engine_lock:
            before = torch.backends.quantized.engine
            engine = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "x86"
            torch.backends.quantized.engine = engine
            try:
                return torch.ops.quantized.linear_prepack(qw, None)
            finally:
                torch.backends.quantized.engine = before


def run(x: Tensor, packed: object, smooth: Optional[Tensor], bias: Optional[Tensor],
        out_dtype: torch.dtype, ones: Optional[Tensor] = None) -> Tensor:
    """``x[M, K] -> [M, N]`` in ``out_dtype``: per-row normalised activations through fbgemm.
    From two rows, with ``ones`` (fp32 ones ``[N]``, kept by the layer) and ``sparseq._C_cpu``,
    the normalisation and the scaling back are one C++ pass each (``cpu_kernels.normalize_rows``,
    ``cpu_kernels.epilogue``: ``y * amax * 1 + bias``) instead of five torch ops; measured
    (2-core Xeon, 1 thread, bench_cpu_kernels.py) 2048x2048 M = 2: 277 -> 233 us, equal on
    MiniLM's shapes. A single row skips the normalisation (below): that is faster still."""
    linear = _linear_dynamic()
    normalized = None if ones is None or x.shape[0] == 1 else cpu_kernels.normalize_rows(x, smooth)
    if normalized is not None:
        u, amax = normalized
        y = linear(u, packed, reduce_range())
        scaled = cpu_kernels.epilogue(y, amax, ones, bias)
        y = scaled if scaled is not None else _scale_back(y, amax[:, None], bias)
        return y if out_dtype == torch.float32 else y.to(out_dtype)
    xs = x.float() if smooth is None else x.float() / smooth
    if xs.shape[0] == 1 and math.isfinite(float(xs.sum())):  # one finite row: its tensor is its token
        y = linear(xs, packed, reduce_range())  # (a sum that overflows takes the path below: still right)
        y = y if bias is None else y.add_(bias)
        return y if out_dtype == torch.float32 else y.to(out_dtype)
    amax = xs.abs().amax(dim=1, keepdim=True) if xs.shape[1] else xs.new_zeros(xs.shape[0], 1)
    # 0/0 (all-zero rows) and x/inf, NaN rows -> 0 for fbgemm, which raises on NaN; the amax of
    # such rows (0, inf, NaN) then gives them the reference's outputs: the bias, or not finite
    u = torch.nan_to_num_(xs / amax, 0.0, 0.0, 0.0)
    y = _scale_back(linear(u, packed, reduce_range()), amax, bias)
    return y if out_dtype == torch.float32 else y.to(out_dtype)


def _scale_back(y: Tensor, amax: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``y * amax + bias`` in torch ops (``amax`` a column ``[M, 1]``; ``y`` overwritten without a bias)."""
    return y.mul_(amax) if bias is None else torch.addcmul(bias, y, amax)


@functools.lru_cache(maxsize=None)
def _linear_dynamic():
    """``torch.ops.quantized.linear_dynamic.default``: the overload itself skips the packet's
    per-call Python check for fake script objects (~2 us)."""
    return torch.ops.quantized.linear_dynamic.default


def error_bound(x: Tensor, wq: Tensor, w_scale: Tensor, smooth: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """Per element, how far :func:`run` may be from the reference W8A8 output ``[M, N]``.

    With ``a`` the row's ``max |x / smooth|`` and ``W = q * s`` the int8 weight in the smoothed
    space, each activation is rounded by at most ``a / 254`` in the reference (half its step
    ``a / 127``) and by at most one fbgemm step ``a * 2 / L`` here (``L`` = 255 levels, 127 with
    ``reduce_range``; a full step, not half, since fbgemm nudges its zero point): so
    ``|y - y_ref| <= a * (2 / L + 1 / 254) * sum_k |W[n, k]|``, plus float rounding of the two
    scalings (``1e-5`` of ``|x| @ |W|^T + |bias|``)."""
    xs = x.float() if smooth is None else x.float() / smooth
    a = xs.abs().amax(dim=1, keepdim=True)
    w = wq.float().abs() * w_scale.float()[:, None]
    levels = 127.0 if reduce_range() else 255.0
    bound = a * (2.0 / levels + 1.0 / 254.0) * w.sum(dim=1)[None, :]
    slack = xs.abs() @ w.t() + (0.0 if bias is None else bias.float().abs())
    return bound + 1e-5 * slack


_packs: Dict[int, object] = {}
"""Packed weights by the ``id`` of a token tensor, for the traced op (a custom op cannot take
fbgemm's script object); an entry is dropped when its token, held by the layer's impl, is freed."""


@torch.library.custom_op("sparseq::w8a8_fbgemm", mutates_args=())
def w8a8_fbgemm(x: Tensor, token: Tensor, n: int, smooth: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """:func:`run` as one opaque op for torch.compile, the packed weight found by ``token``."""
    return run(x, _packs[id(token)], smooth, bias, x.dtype)


@w8a8_fbgemm.register_fake
def _(x, token, n, smooth, bias):
    return x.new_empty((x.shape[0], n))


class PackedWeight:
    """An int8 weight ``[N, K]`` packed for fbgemm (built once per layer and device: a derived
    tensor of the layer, never saved), with the token the traced op finds it by."""

    def __init__(self, wq: Tensor, w_scale: Tensor) -> None:
        self.packed = prepack(wq, w_scale)
        self.n = wq.shape[0]
        self.token = torch.empty(0)
        _packs[id(self.token)] = self.packed
        weakref.finalize(self.token, _packs.pop, id(self.token), None)


def w8a8_impl(weight: PackedWeight, smooth: Optional[Tensor], bias: Optional[Tensor]) -> Callable[[Tensor], Tensor]:
    """``x -> y`` for a layer; eager calls run directly, traced ones through the opaque op."""
    packed, token, n = weight.packed, weight.token, weight.n
    bias32 = None if bias is None else bias.float().contiguous()
    ones = torch.ones(n)  # the C++ epilogue's per-channel scales (fbgemm applied the real ones)

    def call(x: Tensor) -> Tensor:
        if x.shape[0] == 0:
            return x.new_empty((0, n))
        if torch.compiler.is_compiling():
            return w8a8_fbgemm(x, token, n, smooth, bias32)
        return run(x, packed, smooth, bias32, x.dtype, ones)

    call.approximate = True  # type: ignore[attr-defined]  (rounds within error_bound, not bit-exact)
    return call
