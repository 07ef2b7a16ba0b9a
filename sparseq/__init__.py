"""sparseq: pruned and quantized PyTorch models, built to run faster than dense on GPUs.

Importing sparseq registers the ``sparseq::*`` reference ops and does no CUDA work; Triton
kernels and the compiled extensions load lazily (see ``kernels_available()``).
"""
from __future__ import annotations

from .api import (
    compress_24,
    decompress_24,
    int8_mm,
    int8_weight_only_mm,
    is_24_sparse,
    prune_24,
    prune_and_compress_24,
    quantize_per_channel,
    quantize_per_tensor,
    quantize_per_token,
    sparse24_int8_mm,
    sparse24_mm,
)
from .backends import BackendStatus, kernels_available
from .reference import FORMAT_VERSION
from .version import __version__

# Larger parts of the API load on first use (keeps `import sparseq` light).
_LAZY = {
    "Sparse24Linear": "sparseq.nn",
    "Int8Linear": "sparseq.nn",
    "Int8WeightOnlyLinear": "sparseq.nn",
    "Sparse24Int8Linear": "sparseq.nn",
    "swap": "sparseq.nn",
    "prepare": "sparseq.nn",
    "save": "sparseq.serialization",
    "load": "sparseq.serialization",
    "compress_model": "sparseq.compress",
    "plan": "sparseq.compress",
    "cpu_numerics": "sparseq.dispatch",
    "set_cpu_numerics": "sparseq.dispatch",
    "get_cpu_numerics": "sparseq.dispatch",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sparseq' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def _install_transformers_integration() -> None:
    """Teach transformers' ``from_pretrained`` quant method ``sparseq`` (lazily: transformers is
    not imported here; see ``sparseq.integrations.transformers``)."""
    import importlib.util

    if importlib.util.find_spec("transformers") is not None:
        from .integrations import transformers as _hf

        _hf.install()


_install_transformers_integration()

__all__ = [
    "__version__",
    "FORMAT_VERSION",
    "BackendStatus",
    "kernels_available",
    "prune_24",
    "is_24_sparse",
    "compress_24",
    "decompress_24",
    "prune_and_compress_24",
    "quantize_per_channel",
    "quantize_per_token",
    "quantize_per_tensor",
    "int8_mm",
    "int8_weight_only_mm",
    "sparse24_mm",
    "sparse24_int8_mm",
    "cpu_numerics",
    "set_cpu_numerics",
    "get_cpu_numerics",
]
