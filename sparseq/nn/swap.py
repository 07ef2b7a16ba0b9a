"""``swap(model, recipe)``: replace ``nn.Linear`` modules in place by sparseq layers.

A recipe is one format name for every Linear, or a dict of module-name patterns (fnmatch,
first match wins) to format names. Formats: ``2:4``, ``w8a8``, ``int8_weight_only``,
``2:4+w8a8``, ``2:4+int8_weight_only`` and ``dense`` (leave the layer alone).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Type, Union

import torch
import torch.nn.utils.prune  # noqa: F401  (torch.nn.utils does not import it)
from torch import nn

from .base import CompressedLinear
from ..reference import is_24_sparse
from .layers import PRUNE_METHODS, Int8Linear, Int8WeightOnlyLinear, Sparse24Int8Linear, Sparse24Linear

FORMATS: Dict[str, Tuple[Type[CompressedLinear], dict]] = {
    "2:4": (Sparse24Linear, {}),
    "w8a8": (Int8Linear, {}),
    "int8_weight_only": (Int8WeightOnlyLinear, {}),
    "2:4+w8a8": (Sparse24Int8Linear, {"mode": "w8a8"}),
    "2:4+int8_weight_only": (Sparse24Int8Linear, {"mode": "weight_only"}),
}
"""format name -> (layer class, fixed constructor options)."""

Recipe = Union[str, Mapping[str, str]]


def format_for(name: str, recipe: Recipe) -> str:
    """The format the recipe assigns to module ``name`` (``dense`` when nothing matches)."""
    if isinstance(recipe, str):
        return recipe
    for pattern, fmt in recipe.items():
        if fnmatch.fnmatchcase(name, pattern):
            return fmt
    return "dense"


def _check_recipe(recipe: Recipe) -> None:
    formats = [recipe] if isinstance(recipe, str) else list(recipe.values())
    for fmt in formats:
        if fmt != "dense" and fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r} in recipe; choose from {sorted(FORMATS) + ['dense']}")


@dataclass
class SwapRow:
    name: str
    format: str
    shape: Tuple[int, int]
    bytes_before: int
    bytes_after: int
    note: str = ""
    kind: str = "linear"
    """``linear`` (an ``nn.Linear``) or ``embedding`` (listed, always dense, not in the totals)."""


@dataclass
class SwapReport:
    """What ``swap`` did, per Linear layer; ``print(report)`` shows a table."""

    rows: List[SwapRow] = field(default_factory=list)

    @property
    def swapped(self) -> List[SwapRow]:
        return [r for r in self.rows if r.format != "dense"]

    @property
    def linear(self) -> List[SwapRow]:
        return [r for r in self.rows if r.kind == "linear"]

    @property
    def bytes_before(self) -> int:
        """Bytes of the Linear layers' weights and biases before the swap."""
        return sum(r.bytes_before for r in self.linear)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.linear)

    def __str__(self) -> str:
        head = f"{'layer':<48} {'format':<22} {'N x K':>13} {'MiB before':>10} {'MiB after':>10}  note"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.name:<48} {r.format:<22} {f'{r.shape[0]}x{r.shape[1]}':>13} "
                         f"{r.bytes_before / 2**20:>10.3f} {r.bytes_after / 2**20:>10.3f}  {r.note}")
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else 1.0
        lines.append(f"{len(self.swapped)} of {len(self.linear)} Linear layers swapped; linear weights "
                     f"{self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB ({ratio:.2f}x)")
        return "\n".join(lines)


def _linear_weight_bytes(m: nn.Linear) -> int:
    return sum(p.numel() * p.element_size() for p in (m.weight, m.bias) if p is not None)


def _unsupported(linear: nn.Linear, fmt: str) -> Optional[str]:
    n, k = linear.weight.shape
    if linear.weight.is_meta:
        return "weight is on the meta device (load the weights first, or use sparseq.load)"
    if linear.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"weight dtype {linear.weight.dtype} is not a float type"
    if fmt.startswith("2:4") and k % 8:
        return f"in_features {k} is not a multiple of 8 (2:4 needs it)"
    return None


def _tied_weights(model: nn.Module) -> Dict[str, str]:
    """``{module: other module}`` for modules whose ``weight`` is shared with another module."""
    owners: Dict[int, List[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name.rpartition(".")[0])
    tied = {}
    for names in owners.values():
        for n in names:
            others = [o for o in names if o != n]
            if others:
                tied[n] = others[0]
    return tied


def _refresh_torch_prune_mask(linear: nn.Linear) -> None:
    """Recompute ``weight = weight_orig * weight_mask`` of a ``torch.nn.utils.prune``
    reparametrization (as its forward hook does); the swap then drops the hooks."""
    if hasattr(linear, "weight_mask") and hasattr(linear, "weight_orig"):
        linear.weight = linear.weight_orig.detach() * linear.weight_mask



def make_layer(linear: nn.Linear, fmt: str, **options) -> CompressedLinear:
    """One sparseq layer of format ``fmt`` from ``linear`` (options go to ``from_linear``)."""
    cls, fixed = FORMATS[fmt]
    return cls.from_linear(linear, **fixed, **options)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@torch.no_grad()
def swap(model: nn.Module, recipe: Recipe = "2:4", filter: Optional[Callable[[str, nn.Module], bool]] = None,
         prune: Optional[str] = None, smooth: Optional[Mapping[str, torch.Tensor]] = None,
         act_amax: Optional[Mapping[str, float]] = None, dense_fallback: bool = True) -> SwapReport:
    """Replace ``nn.Linear`` modules of ``model`` in place; returns a report.

    ``filter(name, module) -> bool`` excludes layers (False = keep dense). ``prune`` =
    ``"magnitude"`` prunes weights that are not 2:4 yet (default: raise, naming the layer).
    ``smooth`` / ``act_amax`` give per-layer SmoothQuant factors and static activation maxima
    for the W8A8 formats. Layers whose shape no format supports stay dense with a reason;
    embeddings are listed as dense with theirs (no sparseq format is a lookup table).
    """
    _check_recipe(recipe)
    if prune is not None and prune not in PRUNE_METHODS:
        raise ValueError(f"prune must be one of {PRUNE_METHODS} or None, got {prune!r}")
    rows, todo = _plan(model, recipe, filter)
    for name, linear, fmt in todo:  # check everything first: an error leaves the model as it was
        if fmt.startswith("2:4") and prune is None and not is_24_sparse(linear.weight.detach()):
            raise ValueError(f"layer {name!r} ({fmt}): weight is not 2:4 sparse; prune it first "
                             "(sparseq.compress) or pass prune='magnitude'")
    for name, linear, fmt in todo:
        options: dict = {"dense_fallback": dense_fallback}
        if fmt.startswith("2:4"):
            options["prune"] = prune
        if fmt in ("w8a8", "2:4+w8a8"):
            options["smooth"] = (smooth or {}).get(name)
            options["act_amax"] = (act_amax or {}).get(name)
        try:
            layer = make_layer(linear, fmt, **options)
        except (ValueError, TypeError) as e:
            raise type(e)(f"layer {name!r} ({fmt}): {e}") from e
        if layer.qweight.device.type == "cuda":
            layer._try_prepare()  # kernel layouts now, not in the first forward
        _set_module(model, name, layer)  # drops the Linear (and any torch prune hooks)
        rows[name] = SwapRow(name, fmt, rows[name].shape, rows[name].bytes_before, layer.compressed_bytes())
    return SwapReport(list(rows.values()))


def _plan(model: nn.Module, recipe: Recipe, filter) -> Tuple[Dict[str, SwapRow], List[Tuple[str, nn.Linear, str]]]:
    """A report row per Linear (dense with a reason where skipped) and the layers to swap."""
    rows: Dict[str, SwapRow] = {}
    todo = []
    tied = _tied_weights(model)
    mha = {n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    for name, linear in model.named_modules():
        if isinstance(linear, nn.Embedding):  # listed so the report says why it stays dense
            size = linear.weight.numel() * linear.weight.element_size()
            rows[name] = SwapRow(name, "dense", tuple(linear.weight.shape), size, size,
                                 "embedding lookup: no sparseq format (they replace nn.Linear)", "embedding")
            continue
        if not isinstance(linear, nn.Linear):
            continue
        before = _linear_weight_bytes(linear)
        fmt = format_for(name, recipe)
        skip = "recipe says dense" if fmt == "dense" else None
        if skip is None and filter is not None and not filter(name, linear):
            skip = "excluded by filter"
        if skip is None:
            skip = _unsupported(linear, fmt)
        if skip is None and name.rpartition(".")[0] in mha:
            skip = "inside nn.MultiheadAttention (it reads .weight directly)"
        if skip is None and name in tied:
            skip = f"weight tied to {tied[name]!r} (swapping would untie it)"
        rows[name] = SwapRow(name, "dense", (linear.out_features, linear.in_features), before, before, skip or "")
        if skip is None:
            _refresh_torch_prune_mask(linear)
            todo.append((name, linear, fmt))
    return rows, todo
