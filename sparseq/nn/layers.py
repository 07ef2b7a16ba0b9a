"""Drop-in ``nn.Linear`` replacements: 2:4 sparse, W8A8, int8 weight-only, and 2:4 + int8.

Each stores the canonical formats of ``sparseq.reference`` as buffers and runs the backend
``sparseq.dispatch`` picks (on CPU: a dense copy for 2:4 and weight-only, oneDNN int8 for W8A8;
the reference op with ``dense_fallback=False``). On a GPU each backend's callable
runs an unchecked kernel launch in eager mode (the buffers were checked when the layer was
built) and the backend's custom op under torch.compile (``kernel_call``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import dispatch, ops, reference
from .._checks import check_multiple
from .base import CompressedLinear, Impl, dense_bucket, kernel_call

PRUNE_METHODS = ("magnitude",)


def _weight_24(linear: nn.Linear, prune: Optional[str]) -> Tensor:
    """The 2:4 weight of ``linear``; prunes by magnitude only when asked to."""
    w = linear.weight.detach()
    check_multiple("weight", w.shape[1], 8, "in_features (K)")
    if reference.is_24_sparse(w):
        return w
    if prune is None:
        raise ValueError("weight is not 2:4 sparse; prune it first (sparseq.compress) or pass prune='magnitude'")
    if prune not in PRUNE_METHODS:
        raise ValueError(f"prune must be one of {PRUNE_METHODS} or None, got {prune!r}")
    return torch.where(reference.prune_24(w), w, torch.zeros_like(w))


def _smoothed_weight(w: Tensor, smooth: Optional[Tensor]) -> Tensor:
    if smooth is None:
        return w.float()
    if smooth.shape != (w.shape[1],):
        raise ValueError(f"smooth must have shape ({w.shape[1]},), got {tuple(smooth.shape)}")
    return w.float() * smooth.float().to(w.device)[None, :]


def _cutlass_shape_ok(n: int, k: int) -> bool:
    return n % 64 == 0 and k % 128 == 0


def _cutlass_meta(layer: CompressedLinear, device: torch.device) -> Tensor:
    """The layer's metadata in the CUTLASS layout of its GPU, converted once per device."""
    from ..cuda_ops import prepare_sparse24_cutlass

    return layer.derived("meta_cutlass", device, lambda: prepare_sparse24_cutlass(layer.values, layer.meta))


def _cutlass_ready(layer: CompressedLinear, op: str, dtype: torch.dtype, device: torch.device):
    """The ``sparseq::<op>_cutlass`` op where it can run this layer: bf16/fp16 compute, N % 64,
    K % 128, a GPU the kernels support (sm80-89, sm90; others fall through), the extension loaded."""
    if dtype not in (torch.bfloat16, torch.float16) or device.type != "cuda" \
            or not _cutlass_shape_ok(layer.out_features, layer.in_features):
        return None
    from ..cuda_ops import supported_arch

    if supported_arch(device) is None:
        return None
    return dispatch.cutlass_op(op)


def _triton(op: str):
    """``sparseq::<op>_triton`` and its unchecked launcher, or None."""
    handle = dispatch.triton_op(op)
    return None if handle is None else kernel_call(handle, dispatch.triton_launcher(op))


class Sparse24Linear(CompressedLinear):
    """2:4 sparse weight in bf16/fp16/fp32: buffers ``values[N, K/2]`` and ``meta[N, K/8]``."""

    FORMAT = "2:4"
    OP = "sparse24_mm"

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device=None, dense_fallback: bool = True) -> None:
        super().__init__(in_features, out_features, bias, dtype, device, dense_fallback)
        check_multiple(type(self).__name__, in_features, 8, "in_features")
        self.register_buffer("values", torch.empty(out_features, in_features // 2, dtype=dtype, device=device))
        self.register_buffer("meta", torch.empty(out_features, in_features // 8, dtype=torch.uint8, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, prune: Optional[str] = None, **kwargs) -> "Sparse24Linear":
        w = _weight_24(linear, prune)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device, **kwargs)
        values, meta = ops.compress_24(w)
        layer.values.copy_(values)
        layer.meta.copy_(meta)
        layer._copy_bias(linear)
        return layer

    def dense_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        return ops.decompress_24(self.values, self.meta).to(dtype or self.dtype)

    def check_input_dtype(self, dtype: torch.dtype, autocast: bool) -> None:
        super().check_input_dtype(dtype, autocast)
        if dtype != self.dtype and not autocast:
            raise TypeError(f"Sparse24Linear: input dtype {dtype} must match the layer dtype {self.dtype} "
                            "(cast the input or the layer, or run under torch.autocast)")

    def backend_impl(self, backend: str, m: int, dtype: torch.dtype, device: torch.device) -> Optional[Impl]:
        values = self.cast("values", dtype, device)
        if backend == "reference":
            bias = self.cast("bias", dtype, device)
            return lambda x: ops.sparse24_mm(x, values, self.meta, bias)
        if backend == "triton":
            op = _triton(self.OP)
            return None if op is None else (lambda x: op(x, values, self.meta, self.bias))
        if backend == "cutlass":
            op = _cutlass_ready(self, self.OP, dtype, device)
            if op is None:
                return None
            meta_c = _cutlass_meta(self, device)
            bias32 = self.cast("bias", torch.float32, device)  # the kernel's epilogue reads fp32
            return lambda x: op(x, values, meta_c, bias32)
        return None


class Int8WeightOnlyLinear(CompressedLinear):
    """int8 per-channel weight (``weight_q[N, K]``, ``w_scale[N]``), float activations."""

    FORMAT = "int8_weight_only"
    OP = "int8_weight_only_mm"

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device=None, dense_fallback: bool = True) -> None:
        super().__init__(in_features, out_features, bias, dtype, device, dense_fallback)
        self.register_buffer("weight_q", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("w_scale", torch.empty(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "Int8WeightOnlyLinear":
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device, **kwargs)
        q, s = ops.quantize_per_channel(w)
        layer.weight_q.copy_(q)
        layer.w_scale.copy_(s)
        layer._copy_bias(linear)
        return layer

    def dense_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        return (self.weight_q.float() * self.w_scale[:, None]).to(dtype or self.dtype)

    def backend_impl(self, backend: str, m: int, dtype: torch.dtype, device: torch.device) -> Optional[Impl]:
        if backend == "reference":
            return lambda x: ops.int8_weight_only_mm(x, self.weight_q, self.w_scale, self.bias)
        if backend in ("int8pack", "cpu_woq"):  # CPU: torch's int8 weight-only kernel / sparseq's (cpu_ops)
            from .. import cpu_ops

            if device.type != "cpu":
                return None
            return cpu_ops.weight_only_backend(backend, lambda: self.weight_q, self.w_scale, self.bias, dtype)
        if backend == "triton":
            op = _triton(self.OP)
            return None if op is None else (lambda x: op(x, self.weight_q, self.w_scale, self.bias))
        return None


class _W8A8Mixin:
    """Activation quantization shared by the W8A8 layers: dynamic per token or static."""

    def _init_activation(self, in_features: int, smooth: bool, static: bool, device) -> None:
        self.register_buffer("smooth", torch.empty(in_features, dtype=torch.float32, device=device) if smooth else None)
        self.register_buffer("x_scale", torch.empty(1, dtype=torch.float32, device=device) if static else None)

    def _set_activation(self, smooth: Optional[Tensor], act_amax: Optional[float]) -> None:
        if smooth is not None:
            self.smooth.copy_(smooth.float())
        if act_amax is not None:
            self.x_scale.copy_(reference.per_tensor_scale(act_amax))

    def _quantizer(self, backend: str):
        """``x -> (xq, x_scale)``: ``triton`` (the kernel), ``torch`` (the reference arithmetic
        without its value checks, in the fewest torch ops: ``cpu_ops.quantize_int8``, equal to
        ``reference.activation_grid`` bit for bit; no host sync, for CPUs and GPUs without
        Triton) or ``reference``."""
        smooth = self.smooth
        if backend == "torch":
            from ..cpu_ops import quantize_int8

            return lambda x: quantize_int8(x, smooth, self.x_scale)
        if self.x_scale is not None:
            op = _triton("quantize_per_tensor") if backend == "triton" else ops.quantize_per_tensor
            return None if op is None else (lambda x: (op(x, self.x_scale, smooth), self.x_scale))
        op = _triton("quantize_per_token") if backend == "triton" else ops.quantize_per_token
        return None if op is None else (lambda x: op(x, smooth))

    def _dense_impl(self, device: torch.device, dtype: torch.dtype) -> Impl:
        """The dense bucket of a W8A8 layer: activations quantized and dequantized exactly as
        the format defines (Triton quantizer on a GPU, else the reference arithmetic), then
        ``F.linear`` with ``q * s`` in the smoothed space, copied once in the compute dtype.
        Without the quantization the output would change with the M bucket. Exception: on a
        CPU under the ``"fast"`` numerics, a dynamic-scale layer multiplies the dequantized
        weight without quantizing activations (the table picks dense there because the
        quantization alone costs more than the GEMM; the output is then within half a step of
        the reference's activation rounding, inside ``cpu_fbgemm.error_bound``); a static
        scale keeps its quantization (its clamp is part of the format)."""
        if device.type == "cpu" and self.x_scale is None and dispatch.get_cpu_numerics() == "fast":
            impl = CompressedLinear._dense_impl(self, device, dtype)
            impl.approximate = True  # type: ignore[attr-defined]  (see sparseq.testing)
            return impl
        quant = (self._quantizer("triton") if device.type == "cuda" else None) or self._quantizer("torch")
        w = self.derived(f"dense_smoothed:{dtype}", device,
                         lambda: self._int8_dense().to(device, dtype).contiguous())
        bias = self.cast("bias", dtype, device)

        def run(x: Tensor) -> Tensor:
            xq, xs = quant(x)  # xs per row [M], or the static scale [1] from the Triton quantizer
            xd = (xq.float() * xs.reshape(-1, 1)).to(x.dtype)
            return F.linear(xd, w, bias)

        return dense_bucket(run)

    def _onednn_impl(self, device: torch.device) -> Optional[Impl]:
        """The CPU int8 GEMM of oneDNN (``sparseq.cpu_ops``) on the int8 weight, packed once."""
        if device.type != "cpu":
            return None
        from .. import cpu_ops

        why = cpu_ops.unavailable_reason()
        if why:
            raise RuntimeError(why)
        packed = self.derived("onednn_packed", device, lambda: cpu_ops.prepack(self._int8_weight()))
        return cpu_ops.w8a8_impl(packed, self.w_scale, self.smooth, self.x_scale, self.bias)

    def _fbgemm_impl(self, device: torch.device) -> Optional[Impl]:
        """fbgemm's int8 GEMM (``sparseq.cpu_fbgemm``) on the int8 weight, packed once; None
        off the CPU, and where fbgemm runs only approximately (no VNNI, or no ``sparseq._C_cpu``)
        while the numerics are ``"exact"`` or the activation scale static."""
        if device.type != "cpu":
            return None
        from .. import cpu_fbgemm

        why = cpu_fbgemm.unavailable_reason()
        if why:
            raise RuntimeError(why)
        needs_exact = self.x_scale is not None or dispatch.get_cpu_numerics() == "exact"
        if needs_exact and not cpu_fbgemm.exact_runs():
            return None
        weight = self.derived("fbgemm_packed", device, lambda: cpu_fbgemm.PackedWeight(self._int8_weight(), self.w_scale))
        return cpu_fbgemm.w8a8_impl(weight, self.smooth, self.bias, self.x_scale)

    def _activation_options(self) -> dict:
        return {"smooth": self.smooth is not None, "static": self.x_scale is not None}

    def _int8_weight(self) -> Tensor:
        """The int8 weight as dense ``[N, K]`` (2:4 expanded: x86 has no sparse int8 GEMM)."""
        raise NotImplementedError

    def _int8_dense(self) -> Tensor:
        """``q * s`` in fp32, in the smoothed space (the activations are divided by ``smooth``)."""
        return self._int8_weight().float() * self.w_scale[:, None]

    def dense_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        w = self._int8_dense()
        return (w if self.smooth is None else w / self.smooth[None, :]).to(dtype or self.dtype)


class Int8Linear(_W8A8Mixin, CompressedLinear):
    """W8A8: int8 per-channel weight, int8 activations (dynamic per token or static), fused
    scales and bias; optional SmoothQuant factors ``smooth[K]`` folded into the weight."""

    FORMAT = "w8a8"
    OP = "int8_mm"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32,
                 device=None, dense_fallback: bool = True, smooth: bool = False, static: bool = False) -> None:
        super().__init__(in_features, out_features, bias, dtype, device, dense_fallback)
        self.register_buffer("weight_q", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("w_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self._init_activation(in_features, smooth, static, device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, smooth: Optional[Tensor] = None, act_amax: Optional[float] = None,
                    **kwargs) -> "Int8Linear":
        """``smooth``: SmoothQuant factors (activation / smooth, weight * smooth);
        ``act_amax``: calibrated max |activation / smooth| for a static per-tensor scale."""
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device,
                    smooth=smooth is not None, static=act_amax is not None, **kwargs)
        q, s = ops.quantize_per_channel(_smoothed_weight(w, smooth))
        layer.weight_q.copy_(q)
        layer.w_scale.copy_(s)
        layer._set_activation(smooth, act_amax)
        layer._copy_bias(linear)
        return layer

    def options(self) -> dict:
        return self._activation_options()

    def _int8_weight(self) -> Tensor:
        return self.weight_q

    def backend_impl(self, backend: str, m: int, dtype: torch.dtype, device: torch.device) -> Optional[Impl]:
        if backend == "onednn":
            return self._onednn_impl(device)
        if backend == "fbgemm":
            return self._fbgemm_impl(device)
        if backend not in ("triton", "reference"):
            return None
        mm = _triton(self.OP) if backend == "triton" else ops.int8_mm
        quant = self._quantizer(backend)
        if mm is None or quant is None:
            return None

        def run(x: Tensor) -> Tensor:
            xq, xs = quant(x)
            return mm(xq, self.weight_q, xs, self.w_scale, self.bias, x.dtype)

        return run


class Sparse24Int8Linear(_W8A8Mixin, CompressedLinear):
    """2:4 weight with int8 values (``values[N, K/2]`` int8, ``meta``, ``w_scale[N]``).

    ``mode="w8a8"`` quantizes activations (dynamic per token or static, optional smoothing);
    ``mode="weight_only"`` keeps float activations.
    """

    OP = "sparse24_int8_mm"
    MODES = ("w8a8", "weight_only")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32,
                 device=None, dense_fallback: bool = True, mode: str = "w8a8", smooth: bool = False,
                 static: bool = False) -> None:
        super().__init__(in_features, out_features, bias, dtype, device, dense_fallback)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if mode == "weight_only" and (smooth or static):
            raise ValueError("smooth/static activation scales apply to mode='w8a8' only")
        check_multiple(type(self).__name__, in_features, 8, "in_features")
        self.mode = mode
        self.register_buffer("values", torch.empty(out_features, in_features // 2, dtype=torch.int8, device=device))
        self.register_buffer("meta", torch.empty(out_features, in_features // 8, dtype=torch.uint8, device=device))
        self.register_buffer("w_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self._init_activation(in_features, smooth, static, device)

    @property
    def FORMAT(self) -> str:  # noqa: N802 (a per-instance format name)
        return "2:4+w8a8" if self.mode == "w8a8" else "2:4+int8_weight_only"

    @property
    def table_op(self) -> str:
        return self.OP if self.mode == "w8a8" else "sparse24_int8_weight_only_mm"

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "w8a8", prune: Optional[str] = None,
                    smooth: Optional[Tensor] = None, act_amax: Optional[float] = None,
                    **kwargs) -> "Sparse24Int8Linear":
        w = _weight_24(linear, prune)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device,
                    mode=mode, smooth=smooth is not None, static=act_amax is not None, **kwargs)
        values, meta = ops.compress_24(_smoothed_weight(w, smooth))
        q, s = ops.quantize_per_channel(values)
        layer.values.copy_(q)
        layer.meta.copy_(meta)
        layer.w_scale.copy_(s)
        layer._set_activation(smooth, act_amax)
        layer._copy_bias(linear)
        return layer

    def options(self) -> dict:
        return {"mode": self.mode, **self._activation_options()}

    def _dense_impl(self, device: torch.device, dtype: torch.dtype) -> Impl:
        if self.mode == "weight_only":
            return CompressedLinear._dense_impl(self, device, dtype)
        return _W8A8Mixin._dense_impl(self, device, dtype)

    def _mm(self, backend: str, dtype: torch.dtype, device: torch.device):
        if backend == "reference":
            return ops.sparse24_int8_mm, self.meta
        if backend == "triton":
            return _triton(self.OP), self.meta
        if backend == "cutlass" and self.mode == "w8a8":
            op = _cutlass_ready(self, self.OP, dtype, device)
            if op is not None:
                return op, _cutlass_meta(self, device)
        return None, None

    def _static_scale_rows(self, device: torch.device, m: int) -> Tensor:
        """The static ``x_scale`` repeated over ``m`` rows, from a buffer built once and grown
        on demand (the CUTLASS epilogue reads a per-row vector; a view costs no copy per call)."""
        key = ("x_scale_rows", device)
        rows = self._derived.get(key)
        if rows is None or rows.shape[0] < m:
            with self._resolve_lock:  # one thread grows it; the others see the grown buffer
                rows = self._derived.get(key)
                if rows is None or rows.shape[0] < m:
                    rows = self.x_scale.to(device).expand(max(m, dispatch.BUCKET_M[-1])).contiguous()
                    self._derived[key] = rows
        return rows[:m]

    def _int8_weight(self) -> Tensor:
        return ops.decompress_24(self.values, self.meta)

    def backend_impl(self, backend: str, m: int, dtype: torch.dtype, device: torch.device) -> Optional[Impl]:
        if backend == "onednn":
            return self._onednn_impl(device) if self.mode == "w8a8" else None
        if backend == "fbgemm":
            return self._fbgemm_impl(device) if self.mode == "w8a8" else None
        if backend in ("int8pack", "cpu_woq"):  # CPU, weight-only: an int8 weight-only kernel on the expanded weight
            from .. import cpu_ops

            if self.mode != "weight_only" or device.type != "cpu":
                return None
            return cpu_ops.weight_only_backend(backend, lambda: self.derived("int8_dense", device, self._int8_weight),
                                               self.w_scale, self.bias, dtype)
        mm, meta = self._mm(backend, dtype, device)
        if mm is None:
            return None
        if self.mode == "weight_only":
            return lambda x: mm(x, self.values, meta, self.w_scale, None, self.bias, None)
        if backend == "reference":
            quant = self._quantizer("reference")
        else:  # GPU: the Triton quantizer, else the reference arithmetic without its host-syncing checks
            quant = self._quantizer("triton") or self._quantizer("torch")
        if backend == "cutlass":
            bias32 = self.cast("bias", torch.float32, device)  # the kernel's epilogue reads fp32
            static = self.x_scale is not None

            def run_cutlass(x: Tensor) -> Tensor:
                xq, xs = quant(x)
                if static:
                    xs = self._static_scale_rows(device, x.shape[0])
                return mm(xq, self.values, meta, self.w_scale, xs, bias32, x.dtype)

            return run_cutlass

        def run(x: Tensor) -> Tensor:
            xq, xs = quant(x)
            return mm(xq, self.values, meta, self.w_scale, xs, self.bias, x.dtype)

        return run
