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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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
    cross: Optional[torch.Tensor] = field(init=False, default=None)  # X^T X_dense
    sum_x: torch.Tensor = field(init=False)
    sum_dense: Optional[torch.Tensor] = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.hessian = torch.zeros(self.in_features, self.in_features, dtype=torch.float64)
        self.absmax = torch.zeros(self.in_features)
        self.sum_x = torch.zeros(self.in_features, dtype=torch.float64)
        self._gen = torch.Generator().manual_seed(0)

    def add_dense(self, x: torch.Tensor, x_dense: torch.Tensor) -> None:
        """Fold the dense model's rows ``x_dense`` aligned with this model's rows ``x``."""
        x, xd = x.detach().float().cpu(), x_dense.detach().float().cpu()
        if self.cross is None:
            self.cross = torch.zeros_like(self.hessian)
            self.sum_dense = torch.zeros_like(self.sum_x)
        self.cross += (x.T @ xd).double()
        self.sum_dense += xd.sum(0).double()

    def add(self, x: torch.Tensor) -> None:
        """Fold rows ``x[M, K]`` into the statistics."""
        x = x.detach().float().cpu()
        self.hessian += (x.T @ x).double()
        self.absmax = torch.maximum(self.absmax, x.abs().amax(dim=0))
        self.n_tokens += x.shape[0]
        self.sum_x += x.sum(0).double()
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

    def dense_target_weight(self, weight: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
        """The weight ``W'`` that best maps this model's inputs to the dense outputs:
        ``argmin ||X W'^T - X_dense W^T||^2 + lam ||W' - W||^2`` (ridge toward ``W``,
        ``lam = damp * mean diag(X^T X)``). Returns ``weight`` when no dense rows were seen."""
        if self.cross is None:
            return weight
        h = self.hessian
        lam = damp * torch.diag(h).mean().clamp(min=1e-12)
        eye = torch.eye(h.shape[0], dtype=h.dtype)
        w = weight.double()
        rhs = w @ self.cross.T + lam * w  # [N, K]
        return torch.linalg.solve(h + lam * eye, rhs.T).T.to(weight.dtype)

    def bias_shift(self, dense_weight: torch.Tensor, new_weight: torch.Tensor) -> Optional[torch.Tensor]:
        """Mean output difference ``W mean(X_dense) - W' mean(X)`` (``[N]``), or None."""
        if self.sum_dense is None or self.n_tokens == 0:
            return None
        n = self.n_tokens
        return (dense_weight.double() @ (self.sum_dense / n) - new_weight.double() @ (self.sum_x / n)).float()


def find_blocks(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """``(name, ModuleList)`` of the model's repeated blocks: the list holding the most Linears
    (plain or already compressed ``SimulatedLinear``, so a compressed model can be compressed further)."""
    from .simulated import SimulatedLinear

    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            n = sum(isinstance(m, (nn.Linear, SimulatedLinear)) for m in mod.modules())
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
def capture_block_inputs(model: nn.Module, batches: Sequence[Dict[str, torch.Tensor]], block: nn.Module,
                         model_inputs: Optional[Callable[..., Dict[str, Any]]] = None) -> List[BlockInput]:
    """The ``(args, kwargs)`` the first block receives for each batch (the forward stops there).
    ``model_inputs(batch, device)`` builds the forward's keywords (default: an encoder's)."""
    if model_inputs is None:
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
    dense_block: Optional[nn.Module] = None,
    dense_inputs: Optional[Sequence[BlockInput]] = None,
) -> Dict[str, LayerStats]:
    """Run ``block`` on ``inputs`` with hooks on ``layers`` (name -> module); returns their stats.

    ``token_masks[i]`` (bool ``[batch, seq]``) marks the real tokens of batch ``i``. With
    ``dense_block`` / ``dense_inputs`` (the uncompressed block and its own inputs) the
    cross statistics ``X^T X_dense`` are gathered too, batch by batch.
    """
    stats = {name: LayerStats(mod.in_features, max_rows) for name, mod in layers.items()}
    current: List[torch.Tensor] = []
    dense_rows: Dict[str, torch.Tensor] = {}

    def real_rows(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        keep = current[0].reshape(-1)
        return rows[keep.to(rows.device)] if keep.numel() == rows.shape[0] else rows

    def make_hook(name: str):
        def hook(_mod, args, _out):
            rows = real_rows(args[0])
            stats[name].add(rows)
            if name in dense_rows:
                stats[name].add_dense(rows, dense_rows.pop(name))
        return hook

    def make_dense_hook(name: str):
        def hook(_mod, args, _out):
            dense_rows[name] = real_rows(args[0]).detach()
        return hook

    handles = [mod.register_forward_hook(make_hook(name)) for name, mod in layers.items()]
    if dense_block is not None:
        handles += [dense_block.get_submodule(name).register_forward_hook(make_dense_hook(name)) for name in layers]
    try:
        for j, ((a, k), tm) in enumerate(zip(inputs, token_masks)):
            current[:] = [tm]
            if dense_block is not None and dense_inputs is not None:
                da, dk = dense_inputs[j]
                dense_block(*da, **dk)
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
