"""``torch.library`` custom ops ``sparseq::*``: one public op per public function, dispatched
by device, plus one pinned op per backend.

Signatures are written once, in ``sparseq.reference``: every op here takes its schema from the
reference function of the same name, and every backend op (``sparseq::<name>_triton``,
``sparseq::<name>_cutlass``, ``sparseq::<name>_reference``) takes the schema of its public op.

- ``sparseq::<name>``: the op behind ``sparseq.<name>``. On CUDA tensors it runs the fastest
  backend registered for it (the Triton kernel where one exists and Triton works, else the
  reference); on every other device the reference. Its fake (meta) implementation runs the
  reference's checks on meta tensors, so shape errors read the same at trace time.
- ``sparseq::<name>_reference``: always the pure-PyTorch reference (tests, benchmarks).
- ``sparseq::<name>_<backend>``: registered by the backend's module (``sparseq.kernels.*``
  registers ``_triton``); use :func:`register_backend`.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from . import reference as ref

LIB = "sparseq"


def _to_meta(a):
    return torch.empty(a.shape, dtype=a.dtype, device="meta") if isinstance(a, Tensor) else a


def _like(out, device: torch.device):
    if isinstance(out, tuple):
        return tuple(_like(o, device) for o in out)
    return torch.empty(out.shape, dtype=out.dtype, device=device)


def fake_from_reference(fn: Callable) -> Callable:
    """A fake impl that runs ``fn`` on meta copies of the inputs (shape checks included)."""

    def fake(*args):
        device = next(a.device for a in args if isinstance(a, Tensor))
        return _like(fn(*(_to_meta(a) for a in args)), device)

    return fake


def _prune_and_compress_24(w: Tensor, score: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    return ref.prune_and_compress_24(w, score, quantize=False)


def _prune_and_compress_24_int8(w: Tensor, score: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    return ref.prune_and_compress_24(w, score, quantize=True)


REFERENCE_FUNCTIONS: Dict[str, Callable] = {
    "prune_24": ref.prune_24,
    "compress_24": ref.compress_24,
    "decompress_24": ref.decompress_24,
    "prune_and_compress_24": _prune_and_compress_24,  # the reference's ``quantize`` flag, as two ops
    "prune_and_compress_24_int8": _prune_and_compress_24_int8,
    "quantize_per_channel": ref.quantize_per_channel,
    "quantize_per_token": ref.quantize_per_token,
    "quantize_per_tensor": ref.quantize_per_tensor,
    "int8_mm": ref.int8_mm,
    "int8_weight_only_mm": ref.int8_weight_only_mm,
    "sparse24_mm": ref.sparse24_mm,
    "sparse24_int8_mm": ref.sparse24_int8_mm,
}
"""Public op name -> the reference function that defines its signature and semantics."""

BACKEND_MODULES: Dict[str, str] = {"triton": "sparseq.kernels"}
"""Backends the public ops may run on CUDA, best first -> the package that registers them."""

_backend_impls: Dict[Tuple[str, str], Callable] = {}
_launchers: Dict[Tuple[str, str], Callable] = {}
_unavailable: Dict[str, str] = {}


def schema_of(name: str) -> str:
    """The schema of public op ``name`` without its name: ``"(Tensor x, ...) -> Tensor"``."""
    schema = str(getattr(torch.ops.sparseq, name).default._schema)
    return schema[schema.index("("):]


def register_backend(name: str, backend: str, impl: Callable):
    """Register ``impl`` as ``sparseq::<name>_<backend>`` with the schema and fake of public op
    ``name``, for every device; the public op's CUDA path may then run it. ``impl`` is called
    with the schema's arguments (positionally); extra keyword parameters with defaults (a
    kernel's ``config``) are allowed; an ``impl`` with a ``check`` keyword (``check=False``
    skips its argument checks) also serves as :func:`launcher`. A second registration returns
    the existing op."""
    qualname = f"{LIB}::{name}_{backend}"
    _backend_impls[(name, backend)] = impl
    takes_check = "check" in inspect.signature(impl).parameters
    _launchers[(name, backend)] = functools.partial(impl, check=False) if takes_check else impl
    if qualname in torch._C._dispatch_get_all_op_names():
        return getattr(torch.ops.sparseq, f"{name}_{backend}")
    op = torch.library.custom_op(qualname, impl, mutates_args=(), schema=schema_of(name))
    op.register_fake(fake_from_reference(REFERENCE_FUNCTIONS[name]))
    return op


def _warn_unavailable(backend: str, error: BaseException) -> None:
    if backend not in _unavailable:
        _unavailable[backend] = f"{type(error).__name__}: {error}"
        warnings.warn(f"sparseq: the {backend} kernels failed to import ({_unavailable[backend]}); "
                      "sparseq ops on CUDA fall back to slower paths", RuntimeWarning, stacklevel=3)


def backend_impl(name: str, backend: str) -> Optional[Callable]:
    """The Python implementation of ``sparseq::<name>_<backend>``, importing the backend's
    module on first use; None where the backend has no kernel for ``name`` or fails to import
    (the import failure is warned once, with its cause)."""
    key = (name, backend)
    if key in _backend_impls:
        return _backend_impls[key]
    if backend in _unavailable or backend not in BACKEND_MODULES:
        return None
    try:
        package = importlib.import_module(BACKEND_MODULES[backend])
        module = package.module_for(f"{name}_{backend}")
    except KeyError:  # no kernel of this backend implements the op
        return None
    try:
        importlib.import_module(module)
    except Exception as e:  # an ImportError inside a kernel module is a bug or a broken install: say so
        _warn_unavailable(backend, e)
        return None
    return _backend_impls.get(key)


def launcher(name: str, backend: str) -> Optional[Callable]:
    """The unchecked implementation of ``sparseq::<name>_<backend>`` (None where there is none):
    no argument checks, no op dispatch. For callers that checked their arguments once (layers)."""
    return _launchers.get((name, backend)) if backend_impl(name, backend) is not None else None


def _device_dispatch(name: str, reference_fn: Callable) -> Callable:
    """The CUDA implementation of public op ``name``: the first backend that has a kernel."""

    def impl(*args):
        for backend in BACKEND_MODULES:
            fn = backend_impl(name, backend)
            if fn is not None:
                return fn(*args)
        return reference_fn(*args)

    return impl


def _define(name: str, fn: Callable):
    op = torch.library.custom_op(f"{LIB}::{name}", fn, mutates_args=())
    op.register_fake(fake_from_reference(fn))
    return op


PUBLIC_OPS: Dict[str, object] = {}
"""Public op name -> ``sparseq::<name>`` (device-dispatched)."""
REFERENCE_OPS: Dict[str, object] = {}
"""Public op name -> ``sparseq::<name>_reference`` (always the reference)."""

for _name, _fn in REFERENCE_FUNCTIONS.items():
    PUBLIC_OPS[_name] = _define(_name, _fn)
    PUBLIC_OPS[_name].register_kernel("cuda", _device_dispatch(_name, _fn))
    REFERENCE_OPS[_name] = register_backend(_name, "reference", _fn)

prune_24 = PUBLIC_OPS["prune_24"]
compress_24 = PUBLIC_OPS["compress_24"]
decompress_24 = PUBLIC_OPS["decompress_24"]
prune_and_compress_24 = PUBLIC_OPS["prune_and_compress_24"]
prune_and_compress_24_int8 = PUBLIC_OPS["prune_and_compress_24_int8"]
quantize_per_channel = PUBLIC_OPS["quantize_per_channel"]
quantize_per_token = PUBLIC_OPS["quantize_per_token"]
quantize_per_tensor = PUBLIC_OPS["quantize_per_tensor"]
int8_mm = PUBLIC_OPS["int8_mm"]
int8_weight_only_mm = PUBLIC_OPS["int8_weight_only_mm"]
sparse24_mm = PUBLIC_OPS["sparse24_mm"]
sparse24_int8_mm = PUBLIC_OPS["sparse24_int8_mm"]
