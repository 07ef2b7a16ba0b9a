"""One-shot compression of a whole model, block by block (``compress_model``).

Sequential by default: each Linear is calibrated on the outputs of the already-compressed
layers before it (layers reading the same input, e.g. q/k/v, are calibrated together), so
later layers correct for the error of earlier ones. Compressed layers become
``SimulatedLinear`` (float, fake-quant); ``sparseq.swap`` turns them into kernel layers.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .calibration import (
    LayerStats,
    capture_block_inputs,
    collect_stats,
    execution_groups,
    linear_names,
    run_block,
)
from .progress import progress
from .pruning import METHODS, prune
from .recipe import DEFAULT_RECIPE, Format, Recipe, resolve
from .simulated import SimulatedLinear
from .smoothquant import search_alpha, smooth_factors, static_amax
from .tasks import Task, task_for


@dataclass
class LayerReport:
    """What happened to one Linear layer."""

    name: str
    format: str
    method: str
    shape: tuple
    alpha: Optional[float] = None
    rel_error: float = 0.0  # ||Y_c - Y|| ^2 / ||Y||^2 on its calibration rows
    seconds: float = 0.0


@dataclass
class CompressionResult:
    """The compressed model (modified in place) and what was done to each layer."""

    model: nn.Module
    formats: Dict[str, Format]
    layers: List[LayerReport] = field(default_factory=list)
    seconds: float = 0.0

    def recipe(self) -> Dict[str, str]:
        """``{layer name: format name}`` for every compressed layer (``sparseq.swap`` input)."""
        return {name: fmt.name for name, fmt in self.formats.items() if fmt.name != "dense"}

    def smooth(self) -> Dict[str, torch.Tensor]:
        """SmoothQuant factors ``{layer name: smooth[K] fp32}`` of the W8A8 layers."""
        mods = dict(self.model.named_modules())
        return {n: mods[n].smooth for n in self.formats if isinstance(mods.get(n), SimulatedLinear) and mods[n].smooth is not None}


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _as_linear(mod: nn.Module) -> nn.Linear:
    if isinstance(mod, SimulatedLinear):  # re-compress a simulated layer from its float weight
        lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
        lin.weight.data.copy_(mod.pruned_weight())
        if mod.bias is not None:
            lin.bias.data.copy_(mod.bias.detach())
        return lin
    return mod


ACTIVATIONS = ("dynamic", "static")
"""W8A8 activation scales: per token at run time (default), or one calibrated per-tensor scale."""


def check_activations(activations: str) -> None:
    """ValueError unless ``activations`` is one of ``ACTIVATIONS``."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")


def _check_not_weaker(name: str, old: nn.Module, fmt: Format) -> None:
    """A compressed layer may only be compressed further (schedules): no lost sparsity or quantization."""
    if not isinstance(old, SimulatedLinear):
        return
    was = old.format
    if was.sparsity is not None and (fmt.sparsity is None or fmt.sparsity.zero_fraction < was.sparsity.zero_fraction):
        raise ValueError(f"layer {name!r} is already {was}; {fmt} would undo sparsity (a step may only compress further)")
    if was.quant is not None and fmt.quant != was.quant:
        raise ValueError(f"layer {name!r} is already {was}; {fmt} would change its quantization")


@torch.no_grad()
def compress_linear(
    linear: nn.Module,
    fmt: Format,
    method: str,
    stats: Optional[LayerStats],
    alpha: Union[float, str] = "search",
    damp: float = 0.01,
    blocksize: int = 128,
    bias_correction: bool = False,
    activations: str = "dynamic",
) -> tuple:
    """Compress one layer: prune (``method``), then SmoothQuant factors for W8A8 (and, with
    ``activations="static"``, the calibrated per-tensor activation maximum).

    Returns ``(SimulatedLinear, alpha used or None)``.
    """
    lin = _as_linear(linear)
    w, mask = lin.weight.detach().float(), None
    if fmt.sparsity is not None:
        kw = {"damp": damp, "blocksize": blocksize} if method == "sparsegpt" else {}
        if method == "sparsegpt" and stats is not None and stats.cross is not None:
            w = stats.dense_target_weight(w, damp)  # aim at the dense model's outputs
        w, mask = prune(w, fmt.sparsity, method,
                        hessian=stats.hessian_mean() if stats else None,
                        x_norm=stats.x_norm if stats else None, **kw)
    check_activations(activations)
    static = activations == "static" and fmt.act_quant
    if static and stats is None:
        raise ValueError("static activation scales need calibration statistics")
    used_alpha, smooth = None, None
    if fmt.act_quant and stats is not None and alpha != "none":
        if alpha == "search" and stats.rows is not None:
            used_alpha, smooth, _ = search_alpha(stats.rows, w, stats.absmax, static=static)
        elif alpha != "search":
            used_alpha, smooth = float(alpha), smooth_factors(stats.absmax, w, float(alpha))
    act_amax = static_amax(stats.absmax, smooth) if static else None
    if mask is not None and isinstance(linear, SimulatedLinear) and linear.mask is not None:
        mask = mask & linear.mask  # re-compressing: weights pruned before stay pruned
    sim = SimulatedLinear(lin, fmt, mask=mask, smooth=smooth, act_amax=act_amax)
    sim.weight.data.copy_(w)
    if mask is not None:
        sim.apply_mask()
    if bias_correction and stats is not None and fmt.sparsity is not None:
        shift = stats.bias_shift(lin.weight.detach().float(), sim.pruned_weight())
        if shift is not None:
            if sim.bias is None:
                sim.bias = nn.Parameter(torch.zeros(sim.out_features))
            sim.bias.data += shift
    return sim, used_alpha


@torch.no_grad()
def _rel_error(dense_w: torch.Tensor, bias: Optional[torch.Tensor], sim: SimulatedLinear, rows: Optional[torch.Tensor]) -> float:
    if rows is None or rows.numel() == 0:
        return float("nan")
    ref = rows @ dense_w.float().T + (0 if bias is None else bias.float())
    out = sim(rows)
    return float((out - ref).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-20))


def _token_masks(batches: Sequence[Dict[str, torch.Tensor]]) -> List[torch.Tensor]:
    return [b["attention_mask"].bool() if "attention_mask" in b else torch.ones_like(b["input_ids"], dtype=torch.bool) for b in batches]


def compress_model(
    model: nn.Module,
    tokenizer,
    calib_lines: Sequence[str],
    recipe: Recipe = DEFAULT_RECIPE,
    method: str = "sparsegpt",
    *,
    alpha: Union[float, str] = "search",
    sequential: bool = True,
    target: str = "dense",
    bias_correction: bool = False,
    batch_size: int = 32,
    max_length: int = 128,
    damp: float = 0.01,
    blocksize: int = 128,
    max_rows: int = 1024,
    filter: Optional[Callable[[str, nn.Module], bool]] = None,
    activations: str = "dynamic",
    task: Optional[Task] = None,
) -> CompressionResult:
    """Compress ``model``'s Linear layers in place by ``recipe`` (see ``sparseq.compress.recipe``).

    ``method``: magnitude, wanda or sparsegpt (2:4 / N:M / unstructured). ``alpha``: SmoothQuant
    migration strength for W8A8 layers, a float, ``"search"`` (per layer, least output error
    on calibration rows, default) or ``"none"``. ``sequential=False`` calibrates every layer on
    the dense model's activations instead (one-shot). ``target="dense"`` (sequential only) makes
    SparseGPT reconstruct the dense model's layer outputs from the compressed model's inputs
    (asymmetric calibration; corrects the error accumulated upstream); ``"self"`` is the
    classic layer-wise objective. ``activations="static"`` gives W8A8 layers one calibrated
    per-tensor activation scale (no per-token max at run time) instead of dynamic per-token
    scales. Layers outside the repeated blocks and layers rejected by ``filter(name, module)``
    stay dense. ``task`` (default ``task_for(model)``) says how to tokenize and which blocks
    to calibrate: encoder layers, or decoder blocks of a causal LM.
    """
    check_activations(activations)
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}: choose from {', '.join(METHODS)}")
    if target not in ("dense", "self"):
        raise ValueError(f"target must be 'dense' or 'self', got {target!r}")
    if not calib_lines:
        raise ValueError("calibration text is empty: need at least one line")
    start = time.perf_counter()
    task = task or task_for(model)
    prefix, blocks = task.blocks(model)
    all_names = [n for i in range(len(blocks)) for n in linear_names(blocks[i], f"{prefix}.{i}.")]
    if filter is not None:
        mods = dict(model.named_modules())
        all_names = [n for n in all_names if filter(n, mods[n])]
    formats = resolve(recipe, all_names)
    batches = task.batches(tokenizer, list(calib_lines), batch_size, max_length)
    masks = _token_masks(batches)
    inputs = capture_block_inputs(model, batches, blocks[0], task.model_inputs)
    dense_inputs = inputs if sequential and target == "dense" and method == "sparsegpt" else None
    result = CompressionResult(model, formats)
    bar = progress(total=sum(f.name != "dense" for f in formats.values()), desc=f"compress {method}", unit="layer")
    for i, block in enumerate(blocks):
        rel = {n[len(f"{prefix}.{i}."):]: n for n in all_names if n.startswith(f"{prefix}.{i}.") and formats[n].name != "dense"}
        groups = execution_groups(block, inputs, list(rel)) if sequential else [list(rel)]
        dense_next = None if sequential else run_block(block, inputs)
        dense_block = copy.deepcopy(block) if dense_inputs is not None else None
        for group in groups:
            if not group:
                continue
            mods = {g: block.get_submodule(g) for g in group}
            stats = collect_stats(block, inputs, masks, mods, max_rows, dense_block, dense_inputs)
            for g in group:
                t0 = time.perf_counter()
                name, old = rel[g], mods[g]
                _check_not_weaker(name, old, formats[name])
                dense_w = old.weight.detach().clone() if isinstance(old, nn.Linear) else old.pruned_weight()
                sim, used = compress_linear(old, formats[name], method, stats[g], alpha, damp, blocksize, bias_correction,
                                            activations)
                set_module(block, g, sim)
                err = _rel_error(dense_w, old.bias, sim, stats[g].rows)
                result.layers.append(LayerReport(name, formats[name].name, method, tuple(dense_w.shape), used, err,
                                                 time.perf_counter() - t0))
                bar.update(1)
                bar.set_postfix(layer=f"{i}.{g}", err=f"{err:.2e}")
            del stats
        inputs = run_block(block, inputs) if sequential else dense_next
        if dense_block is not None:
            dense_inputs = run_block(dense_block, dense_inputs)
            del dense_block
    bar.close()
    result.seconds = time.perf_counter() - start
    return result
