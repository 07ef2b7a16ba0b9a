"""Schemas and fakes of the ops that the compiled CUDA extensions implement.

The C++ side only adds ``TORCH_LIBRARY_IMPL(sparseq, CUDA, m)``; the schemas live here so
that torch.compile and meta tensors know them even where the extension is not built.
"""
from __future__ import annotations

import torch

from . import ops  # noqa: F401  (the reference ops share the namespace)

_lib = torch.library.Library("sparseq", "FRAGMENT")

CUDA_OP_SCHEMAS: dict = {}
"""name -> schema string of every op the CUDA extensions register (filled as kernels land)."""

for _name, _schema in CUDA_OP_SCHEMAS.items():
    _lib.define(_name + _schema)
