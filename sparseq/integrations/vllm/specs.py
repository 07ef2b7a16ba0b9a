"""Which sparseq format each vLLM linear layer gets: the engine-neutral manifest handling of
``sparseq.integrations.serving``, shared with the SGLang plugin (names kept here for callers of
this module). Pure Python (no vLLM import): the plugin's vLLM classes live in ``.method``.
"""
from __future__ import annotations

from ..serving import LayerSpec, check_dtype, parse_manifest, part_names, rename_layers, resolve

__all__ = ["LayerSpec", "check_dtype", "parse_manifest", "part_names", "rename_layers", "resolve"]
