"""Input validation shared by the reference, the ops and the kernel wrappers.

Every check raises a TypeError (wrong type/dtype) or a ValueError (wrong shape, device,
layout or value) whose message names the argument and the rule it broke.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)
WEIGHT_DTYPES = FLOAT_DTYPES + (torch.int8,)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    ndim: Optional[int] = None,
    contiguous: bool = False,
) -> torch.Tensor:
    """Check that ``t`` is a tensor of an allowed dtype and rank (and contiguous if asked)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype in ({_names(dtypes)}), got {_names([t.dtype])}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    return t


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    """All given (non-None) tensors must live on one device."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if not items:
        return
    first_name, first = items[0]
    for n, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{n} is on {t.device} but {first_name} is on {first.device}; "
                "all inputs must be on the same device"
            )


def check_multiple(name: str, value: int, multiple: int, what: str) -> None:
    """``value`` (a dimension called ``what`` of ``name``) must be a positive multiple."""
    if value <= 0 or value % multiple != 0:
        raise ValueError(f"{name}: {what} must be a positive multiple of {multiple}, got {value}")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _first(mask: torch.Tensor) -> str:
    """The index of the first True of ``mask`` as text (error path only)."""
    idx = tuple(int(i) for i in mask.nonzero()[0])
    return str(idx[0]) if len(idx) == 1 else str(list(idx))


def check_finite(name: str, t: torch.Tensor) -> None:
    """Reject NaN/Inf (a data-dependent check: the reference runs it, hot paths may not)."""
    if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
        bad = ~torch.isfinite(t)
        raise ValueError(f"{name} contains NaN or Inf (first at index {_first(bad)})")


def check_positive(name: str, t: torch.Tensor) -> None:
    """Scales must be finite and > 0."""
    check_finite(name, t)
    if t.device.type != "meta" and not bool((t > 0).all()):
        raise ValueError(f"{name} must be > 0 everywhere (scales and smoothing factors); "
                         f"index {_first(t <= 0)} is {float(t[t <= 0][0])}")


def check_bias(bias: Optional[torch.Tensor], n: int, ref: torch.Tensor) -> None:
    if bias is None:
        return
    check_tensor("bias", bias, dtypes=FLOAT_DTYPES, ndim=1)
    check_shape("bias", bias, (n,))
    check_same_device(bias=bias, x=ref)


def check_scale_vector(name: str, s: torch.Tensor, n: int, ref: torch.Tensor, *, allow_scalar: bool = False) -> None:
    """An fp32 scale vector of length ``n`` (or length 1 when a per-tensor scale is allowed)."""
    check_tensor(name, s, dtypes=(torch.float32,), ndim=1)
    if not (s.shape[0] == n or (allow_scalar and s.shape[0] == 1)):
        allowed = f"({n},)" + (" or (1,)" if allow_scalar else "")
        raise ValueError(f"{name} must have shape {allowed}, got {tuple(s.shape)}")
    check_same_device(**{name: s, "x": ref})
