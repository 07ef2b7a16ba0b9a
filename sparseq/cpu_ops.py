"""CPU int8 GEMMs through PyTorch's own oneDNN kernels (the ``onednn`` dispatch backend).

x86 has fast int8 dot products (VNNI / AMX) that oneDNN drives; PyTorch exposes them as
``torch.ops.onednn.qlinear_prepack`` + ``qlinear_pointwise`` (what inductor's x86 int8 path
calls). They take one activation scale per tensor, so the W8A8 format's per-token scales are
applied outside: the activations are quantized by the reference arithmetic (per token, or with
the static scale; SmoothQuant division included; :func:`quantize_int8`), handed to oneDNN as int8
with zero point 0 and scale 1, then multiplied by ``x_scale``, the per-channel weight scales
and the bias here. The int32 accumulator is exact (VNNI ``vpdpbusd`` has no intermediate
saturation); oneDNN is given weight scales of 1, so it returns ``fp32(acc)``, and the scales and
bias are applied here in the reference's order: the result equals the reference bit for bit
(tested). Small layers (``N * K <= INT_MM_MAX_NK``) multiply with ``torch._int_mm`` instead
(exact int32 too), where oneDNN's fixed cost per call dominates.

The packed weight is built once per layer (a derived tensor, never saved).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from . import cpu_kernels, reference

@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str:
    """"" where the oneDNN int8 kernels run on this machine, else why not (checked once)."""
    return _probe()


def _probe() -> str:
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN (mkldnn)"
    ops = getattr(torch.ops, "onednn", None)
    if ops is None or not hasattr(ops, "qlinear_pointwise") or not hasattr(ops, "qlinear_prepack"):
        return "this torch has no torch.ops.onednn.qlinear_pointwise"
    try:  # a tiny exact product: some CPUs/builds accept the op but cannot run it
        wq = torch.tensor([[1, -2, 3, 4], [127, -127, 5, 0]], dtype=torch.int8)
        x = torch.tensor([[2.0, 1.0, -1.0, 0.5], [-3.0, 3.0, 0.25, 1.0]])
        xq, xs = reference.quantize_per_token(x)
        want = reference.int8_mm(xq, wq, xs, torch.ones(2), None, torch.float32)
        for name, packed in (("oneDNN", onednn_prepack(wq)), ("torch._int_mm", wq)):
            y = run_w8a8(x, packed, torch.ones(2), None, None, None, torch.float32)
            if not torch.equal(y, want):
                return f"{name} int8 self-test gave {y.tolist()}, expected {want.tolist()}"
    except Exception as e:  # noqa: BLE001
        return f"oneDNN int8 self-test failed: {type(e).__name__}: {e}"
    return ""


INT_MM_MAX_NK = 1 << 18
"""Layers with ``N * K`` up to this run ``torch._int_mm`` (int8 x int8 -> exact int32) instead of
oneDNN's qlinear, whose fixed cost per call dominates small layers. Measured on a 2-core Xeon
(AMX), torch 2.14.1, 1 thread (kernel alone): 384x384 10 vs 26 us at M <= 16, 16 vs 29 us at
M = 64; 1536x384 and 384x1536 about equal; 2048x2048 oneDNN 1.5x faster."""


def prepack(wq: Tensor) -> Tensor:
    """The form of an int8 weight ``[N, K]`` that :func:`run_w8a8` multiplies by (built once per
    layer): the oneDNN-packed weight, or for small layers the plain int8 weight ``torch._int_mm``
    reads (``K = 1`` excluded: torch 2.14's ``_int_mm`` returns garbage for a ``[1, N]`` view)."""
    n, k = wq.shape
    if 1 < k and n * k <= INT_MM_MAX_NK:
        return wq.contiguous()
    return onednn_prepack(wq)


def onednn_prepack(wq: Tensor) -> Tensor:
    """The oneDNN-packed form of an int8 weight ``[N, K]`` (an mkldnn tensor)."""
    return torch.ops.onednn.qlinear_prepack(wq.contiguous(), None)


@functools.lru_cache(maxsize=None)
def signed_activations() -> bool:
    """Whether oneDNN is handed the int8 activations as they are (``s8``), else offset by 128 as
    ``u8`` with zero point 128 (the same exact int32 product: oneDNN subtracts ``128 * sum(w)``,
    precomputed in the packed weight). oneDNN 3.12 multiplies ``s8`` activations natively only
    with AMX; on AVX-512 VNNI without it (AMD Zen 4, Intel before Sapphire Rapids) it runs them
    through its reference kernel: 1.45 s vs 0.34 ms for ``u8`` at 16 x 2048 x 2048 on a 2-core
    AMD EPYC (Zen 4), 1 thread (``ONEDNN_VERBOSE=1`` names ``ref_int8`` vs
    ``brg_matmul:avx512_core_vnni``). ``s8`` where AMX is usable (the Xeon's measured path)."""
    init_amx = getattr(torch.cpu, "_init_amx", None)
    try:
        return bool(init_amx()) if init_amx is not None else False
    except Exception:  # noqa: BLE001 - no AMX query in this torch: the offset form runs everywhere
        return False


def offset_activations(packed: Tensor) -> bool:
    """Whether the GEMM of ``packed`` (a :func:`prepack` form) takes the activations as
    ``xq + 128`` in uint8 (oneDNN without AMX, :func:`signed_activations`)."""
    return packed.is_mkldnn and not signed_activations()


def _accumulator(xq: Tensor, packed: Tensor, n: int) -> Tensor:
    """The exact accumulator: int32 from ``torch._int_mm``, ``fp32(acc)`` from oneDNN. ``xq`` in
    the form :func:`offset_activations` names (as :func:`quantize_int8` writes it): int8, or
    uint8 ``xq + 128`` with zero point 128 (the same int32 product)."""
    if not packed.is_mkldnn:
        return torch._int_mm(xq, packed.t())
    zero_point = 128 if xq.dtype == torch.uint8 else 0
    return torch.ops.onednn.qlinear_pointwise(xq, 1.0, zero_point, packed, _constant(n, 1.0, torch.float32),
                                              _constant(n, 0, torch.long), None, 1.0, 0, torch.float32, "none",
                                              [], "")


def run_w8a8(x: Tensor, packed: Tensor, w_scale: Tensor, smooth: Optional[Tensor], x_scale: Optional[Tensor],
             bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """W8A8 ``x[M, K] -> [M, N]`` in ``out_dtype``: the format's activation quantization (dynamic
    per token, or the static ``x_scale``; ``smooth`` divided out) and the int8 GEMM in oneDNN.
    The quantization and the epilogue run in ``sparseq._C_cpu`` where it is built (one pass
    each), else in torch ops; both equal the reference bit for bit."""
    n = w_scale.shape[0]
    if x.shape[0] == 0:
        return x.new_empty((0, n), dtype=out_dtype)
    xq, scale = quantize_int8(x, smooth, x_scale, offset_activations(packed))
    acc = _accumulator(xq, packed, n)
    y = cpu_kernels.epilogue(acc, scale, w_scale, bias)
    if y is None:
        # fp32(acc): the same int32 -> fp32 rounding as the reference; the epilogue then runs
        # here in the reference's order, so the result is bit-exact
        y = acc if acc.dtype == torch.float32 else acc.float()
        y = y.mul_(scale[:, None]).mul_(w_scale[None, :])  # per-row scales, static ones too
        if bias is not None:
            y = y.add_(bias.float())
    return y if out_dtype == torch.float32 else y.to(out_dtype)


def quantize_int8(x: Tensor, smooth: Optional[Tensor], x_scale: Optional[Tensor],
                  offset: bool = False) -> Tuple[Tensor, Tensor]:
    """``reference.activation_grid`` as int8, in fewer and cheaper ops (the reference is the
    definition; this equals it bit for bit, tested): ``(xq int8 [M, K], scale fp32 [M])``.

    Same arithmetic (``x / smooth``, ``max|x|`` per row, ``amax / 127`` or 1.0 where it is 0,
    ``x / scale``, round half to even, clamp to +-127), but rounded and clamped in place and
    cast to int8 directly: the reference's grid plus 128 cast to uint8 took three more passes,
    and float -> uint8 is the one cast torch does not vectorize on x86 (measured 26 us vs 4.7 us
    for int8 at 128 x 384). One C++ pass (``sparseq._C_cpu``) where it is built. ``offset``:
    ``xq + 128`` as uint8 instead (oneDNN's activations without AMX), written by that pass."""
    fused = cpu_kernels.quantize_int8(x, smooth, x_scale, offset)
    if fused is not None:
        return fused
    xs = x.float() if smooth is None else x.float() / smooth
    if x_scale is None:
        amax = reference.row_absmax(xs)
        scale = (amax / reference.INT8_MAX).masked_fill_(amax == 0, 1.0)
        q = xs / scale[:, None]
    else:
        q = xs / x_scale
        scale = x_scale.expand(xs.shape[0]) + reference.row_absmax(xs) * 0  # NaN where a row is not finite
    q = q.round_().clamp_(-reference.INT8_MAX, reference.INT8_MAX).to(torch.int8)
    return (q.view(torch.uint8).bitwise_xor(128) if offset else q), scale


_constants: dict = {}


def _constant(n: int, value: float, dtype: torch.dtype) -> Tensor:
    """A read-only ``[n]`` vector of ``value`` (oneDNN's weight scales of 1 and zero points of 0),
    built once per length instead of per call."""
    key = (n, value, dtype)
    t = _constants.get(key)
    if t is None:
        t = _constants.setdefault(key, torch.full((n,), value, dtype=dtype))
    return t


@torch.library.custom_op("sparseq::w8a8_onednn", mutates_args=())
def w8a8_onednn(x: Tensor, packed: Tensor, w_scale: Tensor, smooth: Optional[Tensor], x_scale: Optional[Tensor],
                bias: Optional[Tensor]) -> Tensor:
    """:func:`run_w8a8` as one opaque op, for torch.compile (inductor would otherwise lower the
    oneDNN call itself and insist that the packed weight be a graph constant)."""
    return run_w8a8(x, packed, w_scale, smooth, x_scale, bias, x.dtype)


@w8a8_onednn.register_fake
def _(x, packed, w_scale, smooth, x_scale, bias):
    return x.new_empty((x.shape[0], w_scale.shape[0]))


def w8a8_impl(packed: Tensor, w_scale: Tensor, smooth: Optional[Tensor], x_scale: Optional[Tensor],
              bias: Optional[Tensor]) -> Callable[[Tensor], Tensor]:
    """``x -> y`` for a layer, the prepacked weight and scales bound once; eager calls run
    directly, traced ones through the opaque op."""
    w_scale = w_scale.float().contiguous()
    # fp32 and contiguous once, as the C++ ops read them (the same values: x.float() / smooth
    # and + bias.float() promote them to fp32 exactly)
    smooth = None if smooth is None else smooth.float().contiguous()
    x_scale = None if x_scale is None else x_scale.float().contiguous()
    bias = None if bias is None else bias.float().contiguous()

    def call(x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return w8a8_onednn(x, packed, w_scale, smooth, x_scale, bias)
        return run_w8a8(x, packed, w_scale, smooth, x_scale, bias, x.dtype)

    return call


WEIGHT_ONLY_DTYPES = (torch.bfloat16,)
"""Activation dtypes the int8 weight-only CPU kernel runs (``int8pack`` dispatch backend).
``torch._weight_int8pack_mm`` reads the int8 weight directly (a quarter of fp32's bytes); measured
on a 2-core Xeon (AMX), torch 2.14.1, 1 thread: bf16 M = 1 2.4-3.6x the bf16 dense copy
(384x384 to 4096x4096), M = 16 0.3-0.6x, fp32 0.01-0.4x; so bf16 at M = 1 only."""


WEIGHT_ONLY_K_MULTIPLE = 16
"""torch 2.14's ``_weight_int8pack_mm`` returns wrong values for ``K`` not a multiple of 16 (and
crashed at K = 8, M = 2); measured right for K % 16 == 0 with odd and even N, M = 1-4."""


def weight_only_impl(wq: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                     dtype: torch.dtype) -> Optional[Callable[[Tensor], Tensor]]:
    """``x -> y`` of an int8 weight-only layer through ``torch._weight_int8pack_mm`` for ``dtype``
    activations, or None where it is not the faster path (:data:`WEIGHT_ONLY_DTYPES`) or not right
    (:data:`WEIGHT_ONLY_K_MULTIPLE`). The kernel takes its scales in the activation dtype, so it
    gets scales of 1 and returns the accumulator rounded once; the fp32 scales and bias are
    applied here and rounded once more. Layers with a bias decline: the kernel rounds the
    accumulator before the bias is added, and where the bias cancels it the error left the
    format's bound (3 ulps measured at a 17x48 layer)."""
    if dtype not in WEIGHT_ONLY_DTYPES or wq.shape[1] % WEIGHT_ONLY_K_MULTIPLE or bias is not None:
        return None
    wq = wq.contiguous()
    n = wq.shape[0]
    ones = torch.ones(n, dtype=dtype)  # the kernel's scales: exact, so it returns dtype(acc)
    scale = w_scale.float()

    def run(x: Tensor) -> Tensor:
        if x.shape[0] == 0:
            return x.new_empty((0, n))
        return torch._weight_int8pack_mm(x.contiguous(), wq, ones).float().mul_(scale).to(dtype)

    return run


def woq_runs(dtype: torch.dtype) -> bool:
    """Whether sparseq's int8 weight-only CPU kernel runs here for ``dtype`` activations."""
    return not cpu_kernels.weight_only_unavailable_reason() and dtype in cpu_kernels.QUANTIZE_DTYPES


def woq_impl(wq: Tensor, w_scale: Tensor, bias: Optional[Tensor],
             dtype: torch.dtype) -> Optional[Callable[[Tensor], Tensor]]:
    """``x -> y`` of an int8 weight-only layer through sparseq's own AVX-512 kernel
    (``cpu_woq`` dispatch backend: ``sparseq._C_cpu``'s ``int8_weight_only_cpu``, which reads the
    int8 weight as stored and widens it in registers), or None where that kernel does not run
    here (:func:`sparseq.cpu_kernels.weight_only_unavailable_reason`) or not for ``dtype``."""
    if not woq_runs(dtype):
        return None
    wq = wq.contiguous()
    scale = w_scale.float().contiguous()
    bias32 = None if bias is None else bias.float().contiguous()
    op = torch.ops.sparseq.int8_weight_only_cpu.default  # checked once here, not per call (~2 us)

    def run(x: Tensor) -> Tensor:
        if x.dim() == 2 and x.dtype == dtype:  # what layers pass
            return op(x.contiguous(), wq, scale, bias32)
        from . import ops

        return ops.int8_weight_only_mm(x, wq, scale, bias)

    return run


def weight_only_backend(backend: str, wq: Callable[[], Tensor], w_scale: Tensor, bias: Optional[Tensor],
                        dtype: torch.dtype) -> Optional[Callable[[Tensor], Tensor]]:
    """A CPU int8 weight-only layer's ``int8pack`` (:func:`weight_only_impl`) or ``cpu_woq``
    (:func:`woq_impl`) implementation, or None where it does not run for ``dtype`` here; ``wq``
    gives the int8 weight ``[N, K]``, asked for only where the backend runs (a 2:4 layer expands
    it then)."""
    if backend == "int8pack":
        return weight_only_impl(wq(), w_scale, bias, dtype) if dtype in WEIGHT_ONLY_DTYPES else None
    if backend == "cpu_woq":
        return woq_impl(wq(), w_scale, bias, dtype) if woq_runs(dtype) else None
    return None
