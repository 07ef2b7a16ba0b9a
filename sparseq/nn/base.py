"""The shared machinery of sparseq's drop-in ``nn.Linear`` replacements.

A layer holds its weight in a canonical compressed form as buffers (so ``state_dict`` is the
compressed model), flattens leading dims to 2-D and runs one backend per (device, M bucket),
chosen once by ``sparseq.dispatch`` and cached: the hot path is a dict lookup and one op.
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


class CompressedLinear(nn.Module):
    """Base class: subclasses define ``FORMAT``, ``OP`` and the per-backend implementations.

    ``dense_fallback``: where no sparse kernel wins for an M bucket (or none supports the
    shape), run ``F.linear`` on a dense copy of the weight, built on first use per device.
    That copy costs ``N * K`` elements of the layer dtype (2x a bf16 2:4 layer's bytes);
    turn it off to keep memory minimal (the reference op then runs instead).
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
        self._impls: Dict[Tuple[torch.device, int], Impl] = {}
        self._dense: Dict[torch.device, Tensor] = {}
        self._resolve_lock = threading.Lock()

    # ------------------------------------------------------------------ subclass hooks
    def dense_weight(self) -> Tensor:
        """The (de)compressed weight as a dense ``[N, K]`` tensor of ``self.dtype``."""
        raise NotImplementedError

    def backend_impl(self, backend: str, m: int) -> Optional[Impl]:
        """A callable for ``backend`` (2-D input), or None where it cannot run this layer."""
        raise NotImplementedError

    # ------------------------------------------------------------------------ dispatch
    def _dense_impl(self) -> Optional[Impl]:
        if not self.dense_fallback:
            return None

        def run(x: Tensor) -> Tensor:
            w = self._dense.get(x.device)
            if w is None:
                w = self._dense.setdefault(x.device, self.dense_weight().to(x.device))
            return F.linear(x, w, self.bias)

        return run

    def resolve(self, m: int, device: torch.device) -> Impl:
        """Pick (once) and cache the implementation for batch size ``m`` on ``device``."""
        key = (device, dispatch.bucket_of(m))
        impl = self._impls.get(key)
        if impl is not None:
            return impl
        with self._resolve_lock:
            impl = self._impls.get(key)
            if impl is None:
                for backend in dispatch.preferences(self.OP, self.out_features, self.in_features,
                                                    self.dtype, device, m):
                    impl = self._dense_impl() if backend == "dense" else self.backend_impl(backend, m)
                    if impl is not None:
                        self.last_backend = backend
                        break
                assert impl is not None, "the reference backend always applies"
                self._impls[key] = impl
        return impl

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features, expected {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = self.resolve(x2.shape[0], x2.device)(x2)
        return y.reshape(*lead, self.out_features)

    def _apply(self, fn, recurse: bool = True):
        # Moving or casting invalidates every cached kernel layout and implementation.
        self._impls = {}
        self._dense = {}
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_resolve_lock", None)
        state["_impls"], state["_dense"] = {}, {}
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
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={dtype}, format={self.FORMAT!r}")

    def compressed_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _copy_bias(self, linear: nn.Linear) -> None:
        if linear.bias is not None:
            self.bias.copy_(linear.bias.detach().to(self.dtype))
