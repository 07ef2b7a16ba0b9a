"""The shared machinery of sparseq's drop-in ``nn.Linear`` replacements.

A layer holds its weight in a canonical compressed form as buffers (so ``state_dict`` is the
compressed model), flattens leading dims to 2-D and runs one backend per (device, M bucket),
chosen once by ``sparseq.dispatch`` and cached: the hot path is a dict lookup and one op.
Derived tensors (kernel layouts, the dense fallback copy) are built per device at resolution
time, never in the hot path, and dropped when the layer is moved, cast or reloaded.
"""
from __future__ import annotations

import threading
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import dispatch
from .._checks import FLOAT_DTYPES

Impl = Callable[[Tensor], Tensor]
Key = Tuple[torch.device, int]

# Buffers that stay float32 whatever dtype the layer is cast to (``model.half()``).
FP32_BUFFERS = ("w_scale", "smooth", "x_scale")


class _LinearGrad(torch.autograd.Function):
    """``y = impl(x)`` forward; backward ``dx = dy @ W`` with the dense-equivalent weight
    (straight-through for activation quantization). Lets gradients reach layers below a
    sparseq layer (LoRA fine-tuning); the compressed weight itself is frozen."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: "CompressedLinear", impl: Impl) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        return impl(x)

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        w = ctx.layer.dense_weight().to(dy.device, dy.dtype)
        return dy @ w, None, None


class CompressedLinear(nn.Module):
    """Base class: subclasses define ``FORMAT``, ``OP``, ``dense_weight`` and ``backend_impl``.

    ``dense_fallback``: in an M bucket where the dispatch table says no sparseq kernel beats
    dense (or none supports the shape), run ``F.linear`` on a dense copy of the weight, built
    per device when such a bucket is first resolved. The copy costs ``N * K`` elements of the
    layer dtype (2x the bytes of a bf16 2:4 layer, 4x an int8 2:4 layer) and exists only on
    GPUs whose table picks dense somewhere. ``dense_fallback=False`` never builds it (the
    next backend in the table, finally the reference op, runs instead).
    """

    FORMAT = ""
    OP = ""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: Optional[torch.device] = None, dense_fallback: bool = True) -> None:
        super().__init__()
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"{type(self).__name__}: dtype must be float32, float16 or bfloat16, got {dtype}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.dtype = dtype
        self.dense_fallback = dense_fallback
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self._resolve_lock = threading.Lock()
        self._reset_caches()

    # ------------------------------------------------------------------ subclass hooks
    def dense_weight(self) -> Tensor:
        """The weight the layer computes with, as a dense ``[N, K]`` tensor of ``self.dtype``
        (decompressed, dequantized, SmoothQuant factors divided out)."""
        raise NotImplementedError

    def backend_impl(self, backend: str, m: int) -> Optional[Impl]:
        """A callable for ``backend`` (2-D input), or None where it cannot run this layer."""
        raise NotImplementedError

    # ------------------------------------------------------------------------ dispatch
    @property
    def table_op(self) -> str:
        """The dispatch-table key of this layer's op (``OP`` unless a mode changes it)."""
        return self.OP

    def reset(self) -> None:
        """Forget resolved kernels and derived tensors (e.g. after ``sparseq tune``)."""
        with self._resolve_lock:
            self._reset_caches()

    def _reset_caches(self) -> None:
        self._impls: Dict[Key, Impl] = {}
        self.backends: Dict[Key, str] = {}
        """The backend chosen per (device, M bucket index), for inspection."""
        self._derived: Dict[Tuple[str, torch.device], Tensor] = {}

    def derived(self, name: str, device: torch.device, build: Callable[[], Tensor]) -> Tensor:
        """A tensor derived from the buffers (kernel layout, dense copy), built once per device."""
        key = (name, device)
        t = self._derived.get(key)
        if t is None:
            t = self._derived.setdefault(key, build())
        return t

    def _dense_impl(self, device: torch.device) -> Optional[Impl]:
        if not self.dense_fallback:
            return None
        w = self.derived("dense", device, lambda: self.dense_weight().to(device))
        return lambda x: F.linear(x, w, self.bias)

    def _pick(self, key: Key) -> Tuple[str, Impl]:
        device, bucket = key
        m = dispatch.BUCKET_M[bucket]
        for backend in dispatch.preferences(self.table_op, self.out_features, self.in_features, self.dtype, device, m):
            impl = self._dense_impl(device) if backend == "dense" else self.backend_impl(backend, m)
            if impl is not None:
                return backend, impl
        raise RuntimeError(f"{type(self).__name__}: no backend for {device}")  # reference always applies

    def resolve(self, m: int, device: torch.device) -> Impl:
        """Pick (once, under a lock) and cache the implementation for batch ``m`` on ``device``."""
        key = (device, dispatch.bucket_of(m))
        impl = self._impls.get(key)
        if impl is not None:
            return impl
        with self._resolve_lock:
            impl = self._impls.get(key)
            if impl is None:
                backend, impl = self._pick(key)
                self.backends[key] = backend
                self._impls[key] = impl
        return impl

    def prepare(self, device: Optional[torch.device] = None) -> Dict[str, str]:
        """Resolve every M bucket on ``device`` (default: where the buffers are) now, building
        kernel layouts and the dense copy; returns ``{bucket: backend}``. Done automatically
        on the first call per bucket and when the layer moves to a GPU; call it yourself
        before CUDA-graph capture or ``torch.compile`` of a layer that has not run yet."""
        device = torch.device(device) if device is not None else self._buffer_device()
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        for bucket, name in enumerate(dispatch.BUCKET_NAMES):
            self.resolve(dispatch.BUCKET_M[bucket], device)
        return {name: self.backends[(device, b)] for b, name in enumerate(dispatch.BUCKET_NAMES)}

    def _impl_for(self, m: int, device: torch.device) -> Impl:
        if not torch.compiler.is_compiling():
            return self.resolve(m, device)
        key = (device, dispatch.bucket_of(m))
        impl = self._impls.get(key)
        if impl is not None:
            return impl
        if device.type == "cuda":
            raise RuntimeError(f"{type(self).__name__}: kernels for {device} are not resolved yet; run the model "
                               "once eagerly or call sparseq.nn.prepare(model) before torch.compile")
        return self._pick(key)[1]  # CPU: the reference op, traced (nothing cached while tracing)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features, expected {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        impl = self._impl_for(x2.shape[0], x2.device)
        if torch.is_grad_enabled() and x2.requires_grad:
            y = _LinearGrad.apply(x2, self, impl)
        else:
            y = impl(x2)
        return y.reshape(*lead, self.out_features)

    # -------------------------------------------------------- moves, casts, reloads
    def _buffer_device(self) -> torch.device:
        return next(self.buffers()).device

    def _apply(self, fn, recurse: bool = True):
        # Moving or casting invalidates every cached kernel layout and implementation.
        self._reset_caches()
        try:
            self.dtype = fn(torch.empty(0, dtype=self.dtype, device=self._buffer_device())).dtype
        except (RuntimeError, NotImplementedError):  # e.g. a probe from the meta device
            pass
        result = super()._apply(fn, recurse)
        for name in FP32_BUFFERS:  # scales keep their format's dtype
            buf = getattr(self, name, None)
            if isinstance(buf, Tensor) and buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        if self.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{type(self).__name__}: cannot cast to {self.dtype}")
        if self._buffer_device().type == "cuda":
            self._try_prepare()
        return result

    def _try_prepare(self) -> None:
        try:
            self.prepare()
        except Exception:  # e.g. garbage from to_empty(): the first forward resolves lazily
            self._reset_caches()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._reset_caches()  # new values: layouts and dense copies are stale

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_resolve_lock", None)
        state["_impls"], state["backends"], state["_derived"] = {}, {}, {}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._resolve_lock = threading.Lock()

    # ---------------------------------------------------------------------- reporting
    def options(self) -> dict:
        """Constructor options beyond the shape (saved in the manifest)."""
        return {}

    def extra_repr(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        text = (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={dtype}, format={self.FORMAT!r}")
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items() if k != "mode" and v)
        return text + (f", {opts}" if opts else "") + ("" if self.dense_fallback else ", dense_fallback=False")

    @property
    def qweight(self) -> Tensor:
        """The main compressed buffer (``values`` or ``weight_q``); tools such as PEFT look
        for it to find the layer's device."""
        return self.values if "values" in self._buffers else self.weight_q

    def compressed_bytes(self) -> int:
        """Bytes of the canonical buffers (what is saved; kernel layouts not included)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _copy_bias(self, linear: nn.Linear) -> None:
        if linear.bias is not None:
            self.bias.copy_(linear.bias.detach().to(self.dtype))


def prepare(model: nn.Module, device: Optional[torch.device] = None) -> Dict[str, Dict[str, str]]:
    """``prepare`` every sparseq layer of ``model``; returns ``{layer: {bucket: backend}}``."""
    return {name: m.prepare(device) for name, m in model.named_modules() if isinstance(m, CompressedLinear)}
