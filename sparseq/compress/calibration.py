"""Calibration: capture what each Linear layer sees, block by block, in bounded memory.

The model's repeated blocks (the ``nn.ModuleList`` holding the most Linear layers, e.g.
``encoder.layer``) are run one at a time on stored block inputs; forward hooks accumulate,
per Linear, the statistics the algorithms need instead of every activation:

- ``hessian = X^T X`` (SparseGPT; its diagonal gives Wanda's ``||X_j||^2``),
- ``absmax[K]`` (SmoothQuant),
- a fixed-size reservoir of input rows (SmoothQuant's alpha search, sensitivity).

Memory: the block inputs of the calibration set plus ``K x K`` per Linear being calibrated.
Padding tokens are left out of every statistic.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

BlockInput = Tuple[Tuple[Any, ...], Dict[str, Any]]


class _Stop(Exception):
    """Raised by the capture hook to end a forward pass early."""


@dataclass
class LayerStats:
    """Running input statistics of one Linear layer."""

    in_features: int
    max_rows: int = 1024
    hessian: torch.Tensor = field(init=False)
    absmax: torch.Tensor = field(init=False)
    rows: Optional[torch.Tensor] = field(init=False, default=None)
    n_tokens: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.hessian = torch.zeros(self.in_features, self.in_features, dtype=torch.float64)
        self.absmax = torch.zeros(self.in_features)
        self._gen = torch.Generator().manual_seed(0)

    def add(self, x: torch.Tensor) -> None:
        """Fold rows ``x[M, K]`` into the statistics."""
        x = x.detach().float().cpu()
        self.hessian += (x.T @ x).double()
        self.absmax = torch.maximum(self.absmax, x.abs().amax(dim=0))
        self.n_tokens += x.shape[0]
        self._reservoir(x)

    def _reservoir(self, x: torch.Tensor) -> None:
        if self.max_rows <= 0:
            return
        pool = x if self.rows is None else torch.cat([self.rows, x])
        if pool.shape[0] > self.max_rows:
            keep = torch.randperm(pool.shape[0], generator=self._gen)[: self.max_rows]
            pool = pool[keep.sort().values]
        self.rows = pool

    @property
    def x_norm(self) -> torch.Tensor:
        """``||X_j||_2`` over all calibration tokens (Wanda)."""
        return torch.diag(self.hessian).clamp(min=0).sqrt().float()

    def hessian_mean(self) -> torch.Tensor:
        """``X^T X / n`` in fp32 (SparseGPT's H up to a factor)."""
        return (self.hessian / max(self.n_tokens, 1)).float()


def find_blocks(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """``(name, ModuleList)`` of the model's repeated blocks: the list holding the most Linears."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            n = sum(isinstance(m, nn.Linear) for m in mod.modules())
            if n and (best is None or n > best[0]):
                best = (n, name, mod)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks with Linear layers")
    return best[1], best[2]


def linear_names(module: nn.Module, prefix: str = "") -> List[str]:
    """Names (with ``prefix``) of the Linear-like layers inside ``module`` in definition order."""
    from .simulated import SimulatedLinear

    out = []
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, SimulatedLinear)):
            out.append(f"{prefix}{name}" if prefix else name)
    return out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, batches: Sequence[Dict[str, torch.Tensor]], block: nn.Module) -> List[BlockInput]:
    """The ``(args, kwargs)`` the first block receives for each batch (the forward stops there)."""
    from .evaluate import model_inputs

    device = next(model.parameters()).device
    captured: List[BlockInput] = []

    def hook(_mod, args, kwargs):
        captured.append((tuple(args), dict(kwargs)))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            try:
                model(**model_inputs(b, device))
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise RuntimeError("the first block did not run for every calibration batch")
    return captured


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, inputs: Sequence[BlockInput]) -> List[BlockInput]:
    """Run ``block`` on every stored input; returns the next block's inputs (same extra args)."""
    return [((block_output(block(*a, **k)),) + tuple(a[1:]), k) for a, k in inputs]


@torch.no_grad()
def collect_stats(
    block: nn.Module,
    inputs: Sequence[BlockInput],
    token_masks: Sequence[torch.Tensor],
    layers: Dict[str, nn.Module],
    max_rows: int = 1024,
) -> Dict[str, LayerStats]:
    """Run ``block`` on ``inputs`` with hooks on ``layers`` (name -> module); returns their stats.

    ``token_masks[i]`` (bool ``[batch, seq]``) marks the real tokens of batch ``i``.
    """
    stats = {name: LayerStats(mod.in_features, max_rows) for name, mod in layers.items()}
    current: List[torch.Tensor] = []

    def make_hook(name: str):
        def hook(_mod, args, _out):
            x = args[0]
            rows = x.reshape(-1, x.shape[-1])
            keep = current[0].reshape(-1)
            if keep.numel() == rows.shape[0]:
                rows = rows[keep.to(rows.device)]
            stats[name].add(rows)
        return hook

    handles = [mod.register_forward_hook(make_hook(name)) for name, mod in layers.items()]
    try:
        for (a, k), tm in zip(inputs, token_masks):
            current[:] = [tm]
            block(*a, **k)
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def execution_groups(block: nn.Module, inputs: Sequence[BlockInput], names: Sequence[str]) -> List[List[str]]:
    """Linear layers of ``block`` (relative ``names``) grouped in execution order; layers that
    read the same input tensor (e.g. q, k, v) form one group."""
    modules = dict(block.named_modules())
    seen: List[Tuple[str, torch.Tensor]] = []  # holding the tensors keeps their identity unique

    def make_hook(name: str):
        def hook(_mod, args):
            if all(n != name for n, _ in seen):
                seen.append((name, args[0]))
        return hook

    handles = [modules[n].register_forward_pre_hook(make_hook(n)) for n in names]
    try:
        a, k = inputs[0]
        block(*a, **k)
    finally:
        for h in handles:
            h.remove()
    groups: List[List[str]] = []
    last_input = None
    for name, x in seen:
        if groups and x is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = x
    missing = [n for n in names if all(n != s for s, _ in seen)]
    return groups + ([missing] if missing else [])
