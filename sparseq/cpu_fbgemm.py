"""CPU W8A8 through fbgemm's int8 GEMM (the ``fbgemm`` dispatch backend): the fast CPU path at
small M.

fbgemm quantizes the activations itself, per *tensor*, asymmetric uint8 over
``[min(x, 0), max(x, 0)]``; the format quantizes per *token*, symmetric int8 (``amax / 127``).
Two forms of the GEMM bridge that (:class:`PackedWeight` picks one per layer, see
:func:`default_form`):

- ``"packed_gemm"`` (exact, bit for bit the reference): the activations are quantized by the
  format itself (``sparseq._C_cpu``'s ``quantize_grid_cpu``: per token or the static scale,
  SmoothQuant divided out) and handed to fbgemm as the integers ``xq`` in fp32, each row followed
  by two range columns holding -128 and 127 (the weight's two matching columns are zero). fbgemm's
  quantizer then picks scale ``255 / 255 = 1`` and zero point 128 and writes ``xq + 128`` exactly;
  the int32 accumulation is exact (VNNI/AMX ``vpdpbusd``), and with weight scale 1 and a zero bias
  fbgemm returns ``fp32(acc)``. sparseq's C++ epilogue applies ``x_scale``, the per-channel
  weight scales and the bias in the reference's order. The GEMM is
  ``torch.fbgemm_linear_int8_weight_fp32_activation`` on an fbgemm ``PackBMatrix``, which skips
  the quantized-tensor machinery of ``linear_dynamic`` (measured on a 2-core Xeon, 1 thread, the
  GEMM alone 384x384 M = 1 / 4 / 14: 5.4 / 7.8 / 14.3 us vs ``linear_dynamic``'s 14.8 / 16.7 /
  23.7 us). It takes 8-bit activations only (no ``reduce_range``), so it runs where the CPU has
  VNNI or AMX, and it needs ``sparseq._C_cpu``. PyTorch marks these functions deprecated (a
  one-time warning, silenced here); where a release drops them, the second form runs.
- ``"linear_dynamic"``: ``torch.ops.quantized.linear_dynamic`` (what
  ``torch.ao.quantization.quantize_dynamic`` runs). Exact where the CPU has VNNI and
  ``sparseq._C_cpu`` is built (:func:`linear_dynamic_exact`): the same range columns and
  integers as above, the weight prepacked with two zero columns and scales 1 (PyTorch's quantizer
  picks scale 1 and zero point 128 the same way; measured equal to the packed form bit for bit,
  and its GEMM 1.1-2x slower: 384x1536 M = 16 65 vs 52 us, 1 thread). Otherwise approximate (the
  ``"fast"`` CPU numerics only): the per-channel scales prepacked, on rows first divided by their own ``max |x|`` (NaN/Inf
  and the 0/0 of all-zero rows zeroed): every row then lies in ``[-1, 1]`` and fbgemm's one step
  ``(hi - lo) / 255 <= 2 / 255`` is, in the row's own units, at most the format's per-token step.
  The rows are multiplied back by ``amax`` and the bias is added last; :func:`error_bound` states
  how far that may round from the reference (tested). A single finite row goes to fbgemm as it
  is (its tensor is its token). Dynamic scales only (fbgemm would ignore a static scale's clamp).

A row holding NaN or Inf gives a non-finite output row in every variant, as in the reference.
"""
from __future__ import annotations

import copy
import functools
import math
import threading
import warnings
import weakref
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from . import cpu_kernels

_engine_lock = threading.Lock()


FORMS = ("packed_gemm", "linear_dynamic")
"""The two forms of the fbgemm GEMM (module docstring), fastest first."""


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str:
    """"" where fbgemm's dynamic int8 linear runs on this machine, else why not (checked once)."""
    engines = torch.backends.quantized.supported_engines
    if "fbgemm" not in engines and "x86" not in engines:
        return f"this torch has no fbgemm quantized engine (engines: {', '.join(engines)})"
    return _self_test("linear_dynamic")


@functools.lru_cache(maxsize=None)
def packed_gemm_unavailable_reason() -> str:
    """"" where the ``"packed_gemm"`` form runs here, else why not (checked once)."""
    if unavailable_reason():
        return unavailable_reason()
    if not all(hasattr(torch, f) for f in ("fbgemm_linear_int8_weight_fp32_activation", "fbgemm_pack_quantized_matrix")):
        return "this torch has no torch.fbgemm_linear_int8_weight_fp32_activation (deprecated, since removed)"
    if reduce_range():
        return "no VNNI: the packed fbgemm GEMM takes 8-bit activations only (their int16 pair sums would saturate)"
    if not cpu_kernels.available():
        return cpu_kernels.unavailable_reason()
    return _self_test("packed_gemm")


def linear_dynamic_exact() -> bool:
    """Whether the ``linear_dynamic`` form runs exactly here: 8-bit activations (VNNI/AMX; with
    ``reduce_range`` fbgemm's 127 levels cannot hold the 255 integers) and ``sparseq._C_cpu``."""
    return not reduce_range() and cpu_kernels.available()


def exact_runs() -> bool:
    """Whether a layer's fbgemm weight (in :func:`default_form`) equals the reference bit for bit."""
    return not unavailable_reason() and (default_form() == "packed_gemm" or linear_dynamic_exact())


def default_form() -> str:
    """The form a layer's :class:`PackedWeight` takes: ``"packed_gemm"`` where it runs."""
    return "linear_dynamic" if packed_gemm_unavailable_reason() else "packed_gemm"


def _self_test(form: str) -> str:
    """A tiny product: equal to the reference (an exact weight) or within the stated bound of it
    (the approximate ``linear_dynamic`` variant). It runs before any layer packs a weight (:class:`PackedWeight` checks
    the form first), so PyTorch's one-time deprecation warnings of the packed GEMM are consumed
    here, silently, and never reach the user."""
    try:
        from . import reference

        wq = torch.tensor([[1, -2, 3, 4], [127, -127, 5, 0]], dtype=torch.int8)
        x = torch.tensor([[1.0, -1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.25, -2.0, 0.0]])
        scale = torch.tensor([1.0, 0.5])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            weight = PackedWeight(wq, scale, form=form, checked=False)
            for rows in (x, x[2:]):
                y = run(rows, weight, None, None, torch.float32)
                xq, xs = reference.quantize_per_token(rows)
                want = reference.int8_mm(xq, wq, xs, scale, None, torch.float32)
                ok = (torch.equal(y, want) if weight.exact
                      else bool(((y - want).abs() <= error_bound(rows, wq, scale, None, None)).all()))
                if not ok:
                    return f"fbgemm int8 ({form}) self-test gave {y.tolist()}, expected {want.tolist()}"
    except Exception as e:  # noqa: BLE001
        return f"fbgemm int8 ({form}) self-test failed: {type(e).__name__}: {e}"
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


RANGE_COLUMNS = 2
"""Columns after each row's K in an exact weight's input (-128 and 127; the weight's are zero)."""


def run(x: Tensor, weight: "PackedWeight", smooth: Optional[Tensor], bias: Optional[Tensor],
        out_dtype: torch.dtype, x_scale: Optional[Tensor] = None) -> Tensor:
    """``x[M, K] -> [M, N]`` in ``out_dtype`` through fbgemm in the weight's form (module
    docstring): exact where ``weight.exact`` (``x_scale``: a static scale ``[1]``), else within
    :func:`error_bound` (dynamic scales only). ``smooth``, ``x_scale`` and
    ``bias`` contiguous fp32."""
    if weight.exact:
        grid, scale = cpu_kernels.quantize_grid(x.contiguous(), smooth, x_scale)
        if weight.form == "packed_gemm":
            acc = _packed_gemm()(grid, weight.shape_only, weight.packed, weight.col_offsets, 1.0, 0, weight.zeros)
        else:
            acc = _linear_dynamic()(grid, weight.packed, False)
        y = cpu_kernels.epilogue(acc, scale, weight.w_scale, bias)
        return y if out_dtype == torch.float32 else y.to(out_dtype)
    if x_scale is not None:
        raise ValueError("fbgemm's linear_dynamic form takes dynamic activation scales only")
    linear, packed = _linear_dynamic(), weight.packed
    normalized = None if x.shape[0] == 1 else cpu_kernels.normalize_rows(x, smooth)
    if normalized is not None:  # the C++ passes (measured 2048x2048 M = 2: 277 -> 233 us vs torch ops)
        u, amax = normalized
        y = linear(u, packed, reduce_range())
        scaled = cpu_kernels.epilogue(y, amax, weight.ones, bias)
        y = scaled if scaled is not None else _scale_back(y, amax[:, None], bias)
        return y if out_dtype == torch.float32 else y.to(out_dtype)
    xs = x.float() if smooth is None else x.float() / smooth
    if xs.shape[0] == 1 and math.isfinite(float(xs.sum())):  # one finite row: its tensor is its token
        y = linear(xs, packed, reduce_range())  # (a sum that overflows takes the path below: still right)
        y = y if bias is None else y.add_(bias)
        return y if out_dtype == torch.float32 else y.to(out_dtype)
    u, amax = _normalized(x, smooth)
    y = _scale_back(linear(u, packed, reduce_range()), amax[:, None], bias)
    return y if out_dtype == torch.float32 else y.to(out_dtype)


def _normalized(x: Tensor, smooth: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``(u [M, K], amax [M])``: the rows of ``x / smooth`` times ``1 / max |x|`` (theirs), NaN and
    +-Inf zeroed (fbgemm cannot take them); the row's ``amax`` (0, Inf or NaN) then gives the
    reference's output for such rows: the bias, or not finite. One C++ pass where it runs."""
    done = cpu_kernels.normalize_rows(x.contiguous(), smooth)
    if done is not None:
        return done
    xs = x.float() if smooth is None else x.float() / smooth
    amax = xs.abs().amax(dim=1) if xs.shape[1] else xs.new_zeros(xs.shape[0])
    return torch.nan_to_num_(xs * (1.0 / amax)[:, None], 0.0, 0.0, 0.0), amax


def _scale_back(y: Tensor, amax: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``y * amax + bias`` in torch ops (``amax`` a column ``[M, 1]``; ``y`` overwritten without a bias)."""
    return y.mul_(amax) if bias is None else torch.addcmul(bias, y, amax)


@functools.lru_cache(maxsize=None)
def _linear_dynamic():
    """``torch.ops.quantized.linear_dynamic.default``: the overload itself skips the packet's
    per-call Python check for fake script objects (~2 us)."""
    return torch.ops.quantized.linear_dynamic.default


def _packed_gemm():
    return torch.fbgemm_linear_int8_weight_fp32_activation


def _pack_matrix(wq: Tensor) -> Tensor:
    """fbgemm's ``PackBMatrix`` of ``wq [N, K]`` with :data:`RANGE_COLUMNS` zero columns after
    its K (a tensor owning it; its deprecation warning silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.fbgemm_pack_quantized_matrix(torch.nn.functional.pad(wq, (0, RANGE_COLUMNS)).contiguous())


def error_bound(x: Tensor, wq: Tensor, w_scale: Tensor, smooth: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """Per element, how far :func:`run` with an approximate weight (``linear_dynamic`` without
    VNNI or ``sparseq._C_cpu``) may be from the reference W8A8 output ``[M, N]`` (exact weights
    equal it).

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


_packs: Dict[int, "PackedWeight"] = {}
"""Packed weights by the ``id`` of a token tensor, for the traced op (a custom op cannot take
fbgemm's script object); an entry is dropped when its token, held by the layer's impl, is freed."""


@torch.library.custom_op("sparseq::w8a8_fbgemm", mutates_args=())
def w8a8_fbgemm(x: Tensor, token: Tensor, n: int, smooth: Optional[Tensor], x_scale: Optional[Tensor],
                bias: Optional[Tensor]) -> Tensor:
    """:func:`run` as one opaque op for torch.compile, the packed weight found by ``token``."""
    return run(x, _packs[id(token)], smooth, bias, x.dtype, x_scale)


@w8a8_fbgemm.register_fake
def _(x, token, n, smooth, x_scale, bias):
    return x.new_empty((x.shape[0], n))


class PackedWeight:
    """An int8 weight ``[N, K]`` with per-channel scales, packed for fbgemm in one of
    :data:`FORMS` (built once per layer and device: a derived tensor of the layer, never saved),
    with the token the traced op finds it by. ``form`` defaults to :func:`default_form`;
    ``exact`` (default: where the form can be) whether it equals the reference bit for bit:
    ``packed_gemm`` always is; ``linear_dynamic`` where :func:`linear_dynamic_exact`, or
    ``exact=False`` for its approximate variant."""

    def __init__(self, wq: Tensor, w_scale: Tensor, form: Optional[str] = None, checked: bool = True,
                 exact: Optional[bool] = None) -> None:
        self.form = default_form() if form is None else form
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        why = "" if not checked else (packed_gemm_unavailable_reason() if self.form == "packed_gemm"
                                      else unavailable_reason())
        if why:
            raise RuntimeError(f"fbgemm int8 ({self.form}) does not run here: {why}")
        self.n, k = wq.shape
        can = self.form == "packed_gemm" or linear_dynamic_exact()
        if exact and not can:
            raise ValueError("fbgemm's linear_dynamic form runs exactly only with VNNI/AMX and sparseq._C_cpu")
        if exact is False and self.form == "packed_gemm":
            raise ValueError("fbgemm's packed_gemm form is always exact")
        self.exact = can if exact is None else exact
        if self.exact:
            self.w_scale = w_scale.float().contiguous()
        if self.form == "packed_gemm":
            self.packed = _pack_matrix(wq)
            self.col_offsets = wq.sum(dim=1, dtype=torch.int32)  # fbgemm's zero-point correction
            self.zeros = torch.zeros(self.n)  # the GEMM's own bias (the real one comes in the epilogue)
            # the GEMM reads only the weight's shape: a view of one element, not a second copy
            self.shape_only = torch.zeros((), dtype=torch.int8).expand(self.n, k + RANGE_COLUMNS)
        elif self.exact:  # the integers' range columns and scales 1: fbgemm returns fp32(acc)
            self.packed = prepack(torch.nn.functional.pad(wq, (0, RANGE_COLUMNS)), torch.ones(self.n))
        else:
            self.packed = prepack(wq, w_scale)
            self.ones = torch.ones(self.n)  # the C++ epilogue's scales (fbgemm applied the real ones)
        entry = copy.copy(self)  # the same tensors without the token: an entry holding it would never be freed
        self.token = torch.empty(0)
        _packs[id(self.token)] = entry
        weakref.finalize(self.token, _packs.pop, id(self.token), None)


def w8a8_impl(weight: PackedWeight, smooth: Optional[Tensor], bias: Optional[Tensor],
              x_scale: Optional[Tensor] = None) -> Callable[[Tensor], Tensor]:
    """``x -> y`` for a layer; eager calls run directly, traced ones through the opaque op.
    ``x_scale`` (a static scale) only with an exact weight."""
    if x_scale is not None and not weight.exact:
        raise ValueError("fbgemm's linear_dynamic form takes dynamic activation scales only")
    token, n = weight.token, weight.n
    smooth = None if smooth is None else smooth.float().contiguous()
    x_scale = None if x_scale is None else x_scale.float().contiguous()
    bias32 = None if bias is None else bias.float().contiguous()

    if weight.exact and weight.form == "packed_gemm":
        # run()'s packed path with its ops bound once (~1-2 us of a ~12 us M = 1 call)
        quantize, gemm, epilogue = cpu_kernels.quantize_grid_op(), _packed_gemm(), cpu_kernels.epilogue_op()
        shape, packed, offsets, zeros, w_scale = (weight.shape_only, weight.packed, weight.col_offsets,
                                                  weight.zeros, weight.w_scale)

        def call(x: Tensor) -> Tensor:
            if x.shape[0] == 0:
                return x.new_empty((0, n))
            if torch.compiler.is_compiling():
                return w8a8_fbgemm(x, token, n, smooth, x_scale, bias32)
            grid, scale = quantize(x.contiguous(), smooth, x_scale)
            y = epilogue(gemm(grid, shape, packed, offsets, 1.0, 0, zeros), scale, w_scale, bias32)
            return y if x.dtype == torch.float32 else y.to(x.dtype)
    else:
        def call(x: Tensor) -> Tensor:
            if x.shape[0] == 0:
                return x.new_empty((0, n))
            if torch.compiler.is_compiling():
                return w8a8_fbgemm(x, token, n, smooth, x_scale, bias32)
            return run(x, weight, smooth, bias32, x.dtype, x_scale)

    call.approximate = not weight.exact  # type: ignore[attr-defined]  (within error_bound)
    return call
