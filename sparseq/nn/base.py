"""The shared machinery of sparseq's drop-in ``nn.Linear`` replacements.

A layer holds its weight in a canonical compressed form as buffers (so ``state_dict`` is the
compressed model), flattens leading dims to 2-D and runs one backend per (device, M bucket,
compute dtype), chosen once by ``sparseq.dispatch`` and cached: the hot path is a dict lookup
and one kernel call (an unchecked launch in eager mode, the backend's op under torch.compile).
Derived tensors (kernel layouts, the dense fallback copy) are built per device at resolution
time, never in the hot path, and dropped when the layer is moved, cast or reloaded.
"""
from __future__ import annotations

import threading
import warnings
import weakref
from typing import Callable, Dict, Optional, Set, Tuple

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake
from torch.nn import functional as F

from .. import dispatch, reference
from .._checks import FLOAT_DTYPES, check_finite, check_positive

Impl = Callable[[Tensor], Tensor]
Key = Tuple[torch.device, int, torch.dtype]
"""(device, M bucket index, compute dtype): what a resolved implementation is cached by."""

_warned: Set[str] = set()


def warn_once(message: str) -> None:
    """Warn with ``message`` once per process (dispatch fallbacks would otherwise warn per layer)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def kernel_call(op: Callable, launch: Optional[Callable]) -> Callable:
    """Call ``launch`` (a kernel without argument checks) in eager mode and ``op`` (the custom op:
    one opaque node) while torch.compile traces. Layers check their buffers once when they are
    built; the per-call checks and op dispatch of the public op cost tens of microseconds."""
    if launch is None or launch is op:
        return op

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        return launch(*args)

    return call

# Buffers that stay float32 whatever dtype the layer is cast to (``model.half()``).
FP32_BUFFERS = ("w_scale", "smooth", "x_scale")


BUFFER_RULES: Dict[str, Callable[[str, Tensor], None]] = {
    "meta": lambda name, t: reference.check_meta_codes(t, name),
    "values": check_finite,  # float values; every int8 value is valid
    "w_scale": check_positive,
    "x_scale": check_positive,
    "smooth": check_positive,
    "bias": check_finite,
}
"""The value rules of each canonical buffer (the formats of ``sparseq.reference``), checked
when a layer's buffers come from outside (``sparseq.load``, ``load_state_dict``)."""


_BUCKETS = tuple(dispatch.bucket_of(m) for m in range(dispatch.BUCKET_BOUNDS[-1] + 1))
"""``dispatch.bucket_of(m)`` for every ``m`` up to the last bound, as a lookup (the hot path)."""
_LAST_BUCKET = len(dispatch.BUCKET_BOUNDS)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)
"""True where autocast is on for any device (0.09 us; ``torch.is_autocast_enabled(x.device.type)``
costs 0.5 us). Without it (an older torch) the fast path is never taken."""


_live_layers: "weakref.WeakSet[CompressedLinear]" = weakref.WeakSet()
"""Every sparseq layer alive, so a change of CPU numerics reaches them all."""


def _forget_cpu_kernels() -> None:
    for layer in list(_live_layers):
        layer.forget_kernels("cpu")


dispatch.on_cpu_numerics_change(_forget_cpu_kernels)


def by_threads(one: Impl, many: Impl) -> Impl:
    """``one`` while torch runs one intra-op thread, else ``many`` (checked per call: 0.1 us);
    ``many`` under torch.compile, which should not trace a thread-count query."""

    def chosen_for(x: Tensor) -> Impl:
        return many if torch.compiler.is_compiling() or torch.get_num_threads() != 1 else one

    def run(x: Tensor) -> Tensor:
        if torch.compiler.is_compiling() or torch.get_num_threads() != 1:
            return many(x)
        return one(x)

    run.chosen_for = chosen_for  # type: ignore[attr-defined]  (which impl runs x: sparseq.testing)
    run.approximate = getattr(one, "approximate", False) or getattr(many, "approximate", False)  # type: ignore[attr-defined]
    return run


def split_description(parts: list) -> str:
    """``"M<8: X; M>=8: Y"`` (or ``"M<8: X; M=8-9: Y; M>=10: Z"``) of ``[[first M, backend, impl], ...]``."""
    text = []
    for i, (first, backend, _) in enumerate(parts):
        if i == 0:
            text.append(f"M<{parts[1][0]}: {backend}")
        elif i == len(parts) - 1:
            text.append(f"M>={first}: {backend}")
        else:
            text.append(f"M={first}-{parts[i + 1][0] - 1}: {backend}")
    return "; ".join(text)


def split_impl(parts: list) -> Impl:
    """The per-call switch on M over ``[[first M, backend, impl], ...]`` (nested :func:`by_rows`)."""
    impl = parts[-1][2]
    for i in range(len(parts) - 2, -1, -1):
        impl = by_rows(parts[i + 1][0], parts[i][2], impl)
    return impl


def by_rows(split: int, below: Impl, above: Impl) -> Impl:
    """``below`` for inputs of fewer than ``split`` rows, else ``above`` (the CPU tables split an
    M bucket where a small layer's dense GEMV wins at its low end and an int8 GEMM at its top)."""

    def chosen_for(x: Tensor) -> Impl:
        m = x.shape[0] if x.dim() == 2 else x.numel() // max(x.shape[-1], 1)
        return below if m < split else above

    def run(x: Tensor) -> Tensor:
        return chosen_for(x)(x)

    run.chosen_for = chosen_for  # type: ignore[attr-defined]  (which impl runs x: sparseq.testing)
    run.approximate = getattr(below, "approximate", False) or getattr(above, "approximate", False)  # type: ignore[attr-defined]
    if getattr(below, "takes_nd", False) and getattr(above, "takes_nd", False):
        takes_nd(run)
    return run


def dense_bucket(impl: Impl) -> Impl:
    """Mark ``impl`` as the dense bucket (``F.linear`` on operands rounded once to the compute
    dtype), so ``sparseq.testing`` checks its output with that rounding in the bound, also
    behind a per-call switch (whose label names more than one backend)."""
    impl.dense_bucket = True  # type: ignore[attr-defined]
    return impl


def takes_nd(impl: Impl) -> Impl:
    """Mark ``impl`` as taking inputs of any number of leading dims (``F.linear``), so the hot
    path hands it a 3-D activation without two reshapes."""
    impl.takes_nd = True  # type: ignore[attr-defined]
    return impl


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
        return dy @ ctx.layer.dense_copy(dy.device, dy.dtype), None, None


class CompressedLinear(nn.Module):
    """Base class: subclasses define ``FORMAT``, ``OP``, ``dense_weight`` and ``backend_impl``.

    ``dense_fallback``: in an M bucket where the dispatch table says no sparseq kernel beats
    dense (or none supports the shape), run ``F.linear`` on a dense copy of the weight, built
    per device when such a bucket is first resolved. The copy costs ``N * K`` elements of the
    layer dtype (2x the bytes of a bf16 2:4 layer, 4x an int8 2:4 layer) and exists only on
    GPUs whose table picks dense somewhere (and, for training, once backward has run).
    ``dense_fallback=False`` skips the dense buckets of the table (the next backend runs) — but
    on a GPU where no sparseq kernel can run the layer at all, the dense copy is built anyway,
    with a warning that names why: the only other path, the reference, checks values (a host
    sync) and rebuilds the weight on every call, which no GPU path may do.

    Under ``torch.autocast`` a layer computes in the autocast dtype like ``nn.Linear`` (2:4
    float values and the bias are cast once per device and dtype, not per call).
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
        self._resolve_lock = threading.RLock()
        self._reset_caches()
        _live_layers.add(self)

    # ------------------------------------------------------------------ subclass hooks
    def dense_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The weight the layer computes with, as a dense ``[N, K]`` tensor of ``dtype`` (default
        ``self.dtype``; decompressed, dequantized, SmoothQuant factors divided out), rounded
        once from the exact fp32 value, so an input of another dtype is not held to the
        layer dtype's precision."""
        raise NotImplementedError

    def backend_impl(self, backend: str, m: int, dtype: torch.dtype, device: torch.device) -> Optional[Impl]:
        """A callable for ``backend`` (2-D input of ``dtype`` on ``device``), or None where it
        cannot run this layer."""
        raise NotImplementedError

    def check_input_dtype(self, dtype: torch.dtype, autocast: bool) -> None:
        """Raise a TypeError for a compute dtype the layer cannot take (``autocast``: the dtype
        comes from ``torch.autocast``, which every layer follows)."""
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"{type(self).__name__}: input dtype must be float32, float16 or bfloat16, got {dtype}")

    # ------------------------------------------------------------------------ dispatch
    @property
    def table_op(self) -> str:
        """The dispatch-table key of this layer's op (``OP`` unless a mode changes it)."""
        return self.OP

    def reset(self) -> None:
        """Forget resolved kernels and derived tensors (e.g. after ``sparseq tune``)."""
        with self._resolve_lock:
            self._reset_caches()

    def forget_kernels(self, device_type: str) -> None:
        """Forget the implementations resolved for ``device_type`` (derived tensors stay): the
        next call re-resolves, e.g. after ``sparseq.set_cpu_numerics``. A compiled model keeps
        what it was compiled with."""
        with self._resolve_lock:
            for key in [k for k in self._impls if k[0].type == device_type]:
                del self._impls[key]
                self.backends.pop(key, None)

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
            with self._resolve_lock:  # re-entrant: resolve() builds under it too; built once per key
                t = self._derived.get(key)
                if t is None:
                    t = self._derived[key] = build()
        return t

    def cast(self, name: str, dtype: torch.dtype, device: torch.device) -> Optional[Tensor]:
        """Buffer ``name`` (None stays None) in ``dtype`` on ``device``: the buffer itself when it
        already is, else a copy built once per device and dtype (autocast, fp32 bias for CUTLASS)."""
        t = getattr(self, name)
        if t is None or (t.dtype == dtype and t.device == device):
            return t
        return self.derived(f"{name}:{dtype}", device, lambda: t.to(device, dtype).contiguous())

    def dense_copy(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``dense_weight()`` on ``device`` in ``dtype``, built once (dense fallback, backward).
        While torch.compile traces, a missing copy is computed in the graph, not cached (a
        traced function may not change the layer); the first eager step caches it."""
        key = (f"dense:{dtype}", device)
        if torch.compiler.is_compiling() and key not in self._derived:
            return self.dense_weight(dtype).to(device)
        return self.derived(key[0], device, lambda: self.dense_weight(dtype).to(device).contiguous())

    def _dense_impl(self, device: torch.device, dtype: torch.dtype) -> Impl:
        w = self.dense_copy(device, dtype)
        bias = self.cast("bias", dtype, device)
        return dense_bucket(takes_nd(lambda x: F.linear(x, w, bias)))

    # dense_copy is what backward multiplies by; W8A8 layers override _dense_impl so the dense
    # bucket still quantizes activations as the format defines (same answer in every bucket).

    def _pick(self, key: Key) -> Tuple[str, Impl]:
        device, bucket, dtype = key
        m = dispatch.BUCKET_M[bucket]
        name = f"{type(self).__name__}({self.out_features}x{self.in_features}, {self.FORMAT})"
        if device.type != "cpu":  # GPU tables are keyed by the layer dtype, as `sparseq tune` writes them
            prefs = dispatch.preferences(self.table_op, self.out_features, self.in_features, self.dtype, device, m)
            return self._first_impl(prefs, key, name, m)
        bucket_name = dispatch.BUCKET_NAMES[bucket]
        if not dispatch.cpu_splits(bucket_name):
            return self._cpu_choice(key, m, name)
        parts: list = []  # [first M, backend, impl] per run of parts with the same backend
        for first, last in dispatch.cpu_parts(bucket_name):
            backend, impl = self._cpu_choice(key, last, name)
            if parts and parts[-1][1] == backend:
                parts[-1][2] = impl  # a run of parts: the impl resolved for its largest M
                continue
            parts.append([first, backend, impl])
        if len(parts) == 1:
            return parts[0][1], parts[0][2]
        return split_description(parts), split_impl(parts)

    def _cpu_choice(self, key: Key, m: int, name: str) -> Tuple[str, Impl]:
        """The CPU backend for batch ``m`` (tables keyed by the compute dtype: bf16 dense on AMX
        beats int8 where fp32 does not), switching per call on the intra-op thread count where
        the best backend depends on it."""
        _, _, dtype = key
        n, k = self.out_features, self.in_features
        prefs = dispatch.preferences(self.table_op, n, k, dtype, key[0], m)
        one = dispatch.preferences(self.table_op, n, k, dtype, key[0], m, True)  # positional: one_thread
        bn, impln = self._first_impl(prefs, key, name, m)
        if one != prefs:
            b1, impl1 = self._first_impl(one, key, name, m)
            if b1 != bn:
                return f"{b1} (1 thread) / {bn}", by_threads(impl1, impln)
        return bn, impln

    def _first_impl(self, prefs, key: Key, name: str, m: int) -> Tuple[str, Impl]:
        """The first backend of ``prefs`` that runs this layer at batch ``m``, and its implementation."""
        device, bucket, dtype = key
        failed = []
        for i, backend in enumerate(prefs):
            if backend == "dense":
                last_resort = i == len(prefs) - 1 and device.type == "cuda"
                if self.dense_fallback or last_resort:
                    if not self.dense_fallback:
                        why = "; ".join(failed) or "none applies to this shape and dtype"
                        warn_once(f"sparseq: no sparseq kernel runs {name} on {device} ({why}); running dense "
                                  "from a copy built once despite dense_fallback=False")
                    return backend, self._dense_impl(device, dtype)
                continue
            try:
                impl = self.backend_impl(backend, m, dtype, device)
            except Exception as e:  # an unsupported GPU or a broken backend: fall through, say why
                failed.append(f"{backend}: {type(e).__name__}: {e}")
                warn_once(f"sparseq: the {backend} backend cannot run {name} on {device} "
                          f"({type(e).__name__}: {e}); trying the next backend")
                continue
            if impl is not None:
                return backend, impl
            failed.append(f"{backend}: not available")
        raise RuntimeError(f"sparseq: no backend runs {name} on {device}: {'; '.join(failed)}")

    def resolve(self, m: int, device: torch.device, dtype: Optional[torch.dtype] = None) -> Impl:
        """Pick (once, under a lock) and cache the implementation for batch ``m`` on ``device``
        with inputs of ``dtype`` (default: the layer's)."""
        key = (device, dispatch.bucket_of(m), dtype or self.dtype)
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

    def prepare(self, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> Dict[str, str]:
        """Resolve every M bucket on ``device`` (default: where the buffers are) for inputs of
        ``dtype`` (default: the layer's; pass the autocast dtype to prepare an autocast run)
        now, building kernel layouts and the dense copy; returns ``{bucket: backend}``. Done
        automatically on the first call per bucket and when the layer moves to a GPU or loads
        a state dict there; call it yourself before CUDA-graph capture or ``torch.compile`` of
        a layer that has not run yet."""
        device = torch.device(device) if device is not None else self._buffer_device()
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        dtype = dtype or self.dtype
        for bucket, name in enumerate(dispatch.BUCKET_NAMES):
            self.resolve(dispatch.BUCKET_M[bucket], device, dtype)
        return {name: self.backends[(device, b, dtype)] for b, name in enumerate(dispatch.BUCKET_NAMES)}

    def _impl_for(self, m: int, device: torch.device, dtype: torch.dtype) -> Impl:
        if not torch.compiler.is_compiling():
            return self.resolve(m, device, dtype)
        key = (device, dispatch.bucket_of(m), dtype)
        impl = self._impls.get(key)
        if impl is not None:
            return impl
        if device.type == "cuda":
            raise RuntimeError(f"{type(self).__name__}: kernels for {device} ({dtype}) are not resolved yet; run "
                               "the model once eagerly or call sparseq.nn.prepare(model) (with dtype= under "
                               "autocast) before torch.compile")
        # CPU: the reference op is traced (it needs no derived tensor, and nothing may be cached
        # while tracing); prepare() before torch.compile compiles the fast CPU path instead
        return self.backend_impl("reference", dispatch.BUCKET_M[key[1]], dtype, device)

    @staticmethod
    def _compute_dtype(x: Tensor) -> Tuple[torch.dtype, bool]:
        """``(dtype, autocast)``: the dtype the layer computes in for input ``x``, the autocast
        dtype where autocast is on for ``x``'s device (as ``nn.Linear``), else ``x.dtype``."""
        if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type), True
        return x.dtype, False

    def forward(self, x: Tensor) -> Tensor:
        # Fast path (eager, no grad, no autocast, this device/bucket/dtype resolved before: a
        # cached impl exists only for inputs the slow path checked): a few attribute reads; an
        # input of more than 2 dims goes to the impl as it is where the impl takes it (F.linear),
        # else as a 2-D view. Each check here costs ~0.05-0.1 us; the layers it serves on a CPU
        # take ~12 us (384x384, M = 1), so a microsecond is 8%.
        if x.dtype == self.dtype and x.shape[-1] == self.in_features and not _any_autocast() \
                and not (x.requires_grad and torch.is_grad_enabled()) and not torch.compiler.is_compiling():
            m = x.shape[0] if x.dim() == 2 else x.numel() // self.in_features
            impl = self._impls.get((x.device, _BUCKETS[m] if m < len(_BUCKETS) else _LAST_BUCKET, x.dtype))
            if impl is not None:
                if x.dim() == 2 or getattr(impl, "takes_nd", False):
                    return impl(x)
                return impl(x.reshape(m, self.in_features)).view(*x.shape[:-1], self.out_features)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features, expected {self.in_features}")
        device = self.qweight.device
        if x.device != device:
            raise ValueError(f"{type(self).__name__}: input is on {x.device} but the layer is on {device}")
        dtype, autocast = self._compute_dtype(x)
        self.check_input_dtype(dtype, autocast)
        if x.dtype != dtype:
            x = x.to(dtype)
        flat = x.dim() == 2
        x2 = x if flat else x.reshape(-1, self.in_features)
        impl = self._impl_for(x2.shape[0], x2.device, dtype)
        if autocast:  # inputs are cast; the format's own arithmetic (fp32 accumulation) must not be
            with torch.autocast(x2.device.type, enabled=False):
                y = self._run(impl, x2)
        else:
            y = self._run(impl, x2)
        return y if flat else y.reshape(*x.shape[:-1], self.out_features)

    def _run(self, impl: Impl, x2: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x2.requires_grad:
            return _LinearGrad.apply(x2, self, impl)
        return impl(x2)

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
        self._try_prepare()
        return result

    def _try_prepare(self) -> None:
        """Prepare on a GPU (layouts and dense copies built now, outside any graph capture or
        compile); a failure is warned with its cause and left to the first forward."""
        if self._buffer_device().type != "cuda":
            return
        try:
            self.prepare()
        except Exception as e:  # e.g. garbage from to_empty(): the first forward resolves lazily
            self._reset_caches()
            warn_once(f"sparseq: could not prepare {type(self).__name__} on {self._buffer_device()} "
                      f"({type(e).__name__}: {e}); kernels resolve on the first forward instead")

    def check_state(self, tensors: Optional[Dict[str, Tensor]] = None) -> None:
        """Check the canonical buffers (or ``tensors``, buffer name -> incoming tensor, in their
        place) against the format: dtype and shape as declared, meta codes valid, float values
        and bias finite, scales and SmoothQuant factors finite and > 0. One vectorized pass per buffer; raises ValueError/TypeError naming the buffer."""
        for name, buf in self._buffers.items():
            t = buf if tensors is None else tensors.get(name, buf)
            if t is None:
                continue
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            if buf is not None and t is not buf:
                if t.dtype != buf.dtype and (not t.is_floating_point() or not buf.is_floating_point()):
                    raise TypeError(f"{name}: dtype {t.dtype} where the format stores {buf.dtype}")
                if tuple(t.shape) != tuple(buf.shape):
                    raise ValueError(f"{name}: shape {tuple(t.shape)} where the layer expects {tuple(buf.shape)}")
            rule = BUFFER_RULES.get(name)
            if rule is not None and not is_fake(t):  # no values to read while tracing
                rule(name, t)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        incoming = {n: state_dict[prefix + n] for n in self._buffers if prefix + n in state_dict}
        try:
            self.check_state(incoming)  # before anything is copied: a bad tensor changes nothing here
        except (TypeError, ValueError) as e:
            raise type(e)(f"layer {prefix.rstrip('.')!r} ({type(self).__name__}): {e}") from None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        with self._resolve_lock:
            self._reset_caches()  # new values: layouts and dense copies are stale
        self._try_prepare()  # as after a move: rebuilt now, not during compile or capture

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_resolve_lock", None)
        state["_impls"], state["backends"], state["_derived"] = {}, {}, {}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._resolve_lock = threading.RLock()
        _live_layers.add(self)

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
