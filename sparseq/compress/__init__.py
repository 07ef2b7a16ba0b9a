"""The compression workflow: calibrate, prune (magnitude / Wanda / SparseGPT; 2:4, N:M,
unstructured), SmoothQuant W8A8, distillation recovery with fixed masks, and the planner.

>>> result = compress_model(model, tokenizer, lines, recipe="2:4+w8a8", method="sparsegpt")
>>> recover(result.model, dense_model, tokenizer, more_lines, steps=200)
>>> report, recipe = to_kernel_layers(result.model); sparseq.save(result.model, "out")
"""
from __future__ import annotations

from typing import Any

from .evaluate import Scores, compare, embed
from .oneshot import CompressionResult, compress_linear, compress_model
from .pruning import Sparsity, parse_sparsity, prune, prune_magnitude, prune_sparsegpt, prune_wanda
from .recipe import DEFAULT_RECIPE, Format, parse_format
from .recovery import recover
from .simulated import SimulatedLinear
from .smoothquant import fake_quant_per_channel, fake_quant_per_token, search_alpha, smooth_factors


def plan(*args: Any, **kwargs: Any):
    """Per-layer formats under an accuracy budget (see ``sparseq.compress.planner.plan``)."""
    from .planner import plan as _plan

    return _plan(*args, **kwargs)


def to_kernel_layers(model, dtype=None):
    """Swap simulated layers for sparseq kernel layers (see ``sparseq.compress.export``)."""
    from .export import to_kernel_layers as _to

    return _to(model, dtype)


__all__ = [
    "CompressionResult", "DEFAULT_RECIPE", "Format", "Scores", "SimulatedLinear", "Sparsity",
    "compare", "compress_linear", "compress_model", "embed", "fake_quant_per_channel",
    "fake_quant_per_token", "parse_format", "parse_sparsity", "plan", "prune", "prune_magnitude",
    "prune_sparsegpt", "prune_wanda", "recover", "search_alpha", "smooth_factors", "to_kernel_layers",
]
