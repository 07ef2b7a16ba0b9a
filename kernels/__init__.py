"""sparseq.kernels: Triton kernels and their wrappers (installed as ``sparseq.kernels``).

Nothing is imported eagerly: import a kernel module (e.g. ``sparseq.kernels.int8_mm``) to
compile-on-first-call and register its ``sparseq::<name>_triton`` op, or call
:func:`register` to import them all. Importing this package imports neither triton nor any
kernel module, and compiles nothing.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from typing import Dict, List

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: this checkout's root is on sys.path (``python -m pytest``
    # run from it, PYTHONPATH=<checkout>). A ``kernels`` installed elsewhere is Hugging Face's,
    # which transformers >= 5.25 requires and imports with ``import transformers`` (else
    # "cannot import name 'CUDAProperties' from 'kernels'"): that import gets it, not this folder.
    _root = Path(__file__).resolve().parent.parent
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if Path(p or ".").resolve() != _root])
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)

TRITON_OPS: Dict[str, str] = {
    "quantize_per_token_triton": "sparseq.kernels.quantize",
    "quantize_per_tensor_triton": "sparseq.kernels.quantize",
    "int8_mm_triton": "sparseq.kernels.int8_mm",
    "int8_weight_only_mm_triton": "sparseq.kernels.int8_weight_only_mm",
    "sparse24_mm_triton": "sparseq.kernels.sparse24_mm",
    "sparse24_int8_mm_triton": "sparseq.kernels.sparse24_mm",
    "prune_and_compress_24_triton": "sparseq.kernels.prune_compress",
    "prune_and_compress_24_int8_triton": "sparseq.kernels.prune_compress",
}
"""``sparseq::<op>`` name -> the module whose import registers it (same schema as ``<op>`` without ``_triton``)."""


def register() -> List[str]:
    """Import every kernel module so that all ``sparseq::*_triton`` ops exist; returns their names.

    Needs triton; compiles nothing (kernels compile on their first call).
    """
    for module in dict.fromkeys(TRITON_OPS.values()):
        importlib.import_module(module)
    return sorted(TRITON_OPS)


class UnknownTritonOp(ValueError, KeyError):
    """No Triton kernel implements the op (a ValueError, and a KeyError for lookups that catch one)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def module_for(op_name: str) -> str:
    """The module that registers ``op_name`` (e.g. ``"int8_mm_triton"``); raises
    :class:`UnknownTritonOp` for an op without a Triton kernel."""
    try:
        return TRITON_OPS[op_name]
    except KeyError:
        raise UnknownTritonOp(f"no Triton op {op_name!r}; known: {sorted(TRITON_OPS)}") from None
