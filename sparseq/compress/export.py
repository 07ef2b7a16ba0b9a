"""Turn a compressed (simulated) model into sparseq kernel layers, and size accounting.

``SimulatedLinear`` layers become plain ``nn.Linear`` with their pruned weight, then
``sparseq.swap`` builds the kernel layers (2:4 compressed form, int8 weights, SmoothQuant
factors). Formats without kernels (N:M other than 2:4, unstructured) stay dense Linears
holding their zeros.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .recipe import parse_format
from .simulated import SimulatedLinear


def linear_weight_bytes(model: nn.Module, dense_bytes_per_value: int = 2) -> Dict[str, float]:
    """``{"before": bytes, "after": bytes}`` of all Linear weights, 16-bit dense as the baseline.

    Compressed layers count their stored bits (2:4: half the values + 4-bit metadata per 4;
    int8: one byte per value; fp32 scales/smooth factors included).
    """
    before = after = 0.0
    for m in model.modules():
        if isinstance(m, SimulatedLinear):
            n, k = m.out_features, m.in_features
            before += n * k * dense_bytes_per_value
            after += n * k * m.format.bits_per_weight() / 8 * (dense_bytes_per_value / 2)
            after += 4 * n if m.format.weight_quant else 0
            after += 4 * k if m.smooth is not None else 0
            after += 4 if m.act_amax is not None else 0
        elif type(m) is nn.Linear:
            before += m.weight.numel() * dense_bytes_per_value
            after += m.weight.numel() * dense_bytes_per_value
    return {"before": before, "after": after}


@torch.no_grad()
def to_dense_linears(model: nn.Module) -> Dict[str, SimulatedLinear]:
    """Replace every ``SimulatedLinear`` by an ``nn.Linear`` with its pruned float weight.

    Returns the replaced layers by name (their formats and smoothing factors).
    """
    from .oneshot import set_module

    sims = {n: m for n, m in model.named_modules() if isinstance(m, SimulatedLinear)}
    for name, sim in sims.items():
        lin = nn.Linear(sim.in_features, sim.out_features, bias=sim.bias is not None)
        lin.weight.copy_(sim.pruned_weight())
        if sim.bias is not None:
            lin.bias.copy_(sim.bias.detach())
        set_module(model, name, lin)
    return sims


def to_kernel_layers(model: nn.Module, dtype: Optional[torch.dtype] = None):
    """Swap the compressed layers of ``model`` for sparseq kernel layers (``sparseq.swap``).

    ``dtype`` casts the model first (e.g. bf16 on a GPU). Returns ``(swap report, recipe)``.
    """
    import sparseq

    sims = to_dense_linears(model)
    if dtype is not None:
        model.to(dtype)
    recipe = {n: s.format.name for n, s in sims.items() if s.format.runs_on_kernels and s.format.name != "dense"}
    smooth = {n: s.smooth for n, s in sims.items() if s.smooth is not None and n in recipe}
    act_amax = {n: float(s.act_amax) for n, s in sims.items() if s.act_amax is not None and n in recipe}
    report = sparseq.swap(model, recipe, smooth=smooth, act_amax=act_amax or None)
    return report, recipe


def kernel_format(fmt: str) -> str:
    """The kernel format a (possibly simulated) format is saved as."""
    f = parse_format(fmt)
    return f.name if f.runs_on_kernels else "dense"
