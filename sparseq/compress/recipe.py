"""Recipes: which format each Linear layer gets.

A format is ``[sparsity][+quant]``: sparsity ``2:4`` (kernels exist), any ``N:M`` or an
unstructured ``50%`` (simulated, for incremental schedules); quant ``w8a8`` (SmoothQuant,
per-token dynamic activations) or ``int8_weight_only``; or ``dense``. A recipe is one
format for every layer, or a dict ``{layer name or fnmatch pattern: format}`` (first match
wins, unmatched layers stay dense).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Union

from .pruning import Sparsity, parse_sparsity

QUANTS = ("w8a8", "int8_weight_only")
KERNEL_FORMATS = ("dense", "2:4", "w8a8", "int8_weight_only", "2:4+w8a8", "2:4+int8_weight_only")
"""Formats that sparseq.nn layers run; other sparsities are simulated (dense weights with zeros)."""
DEFAULT_RECIPE = "2:4+w8a8"

Recipe = Union[str, Mapping[str, str]]


@dataclass(frozen=True)
class Format:
    """A parsed format: optional sparsity and optional quantization."""

    sparsity: Optional[Sparsity]
    quant: Optional[str]

    @property
    def name(self) -> str:
        parts = [str(self.sparsity)] if self.sparsity else []
        parts += [self.quant] if self.quant else []
        return "+".join(parts) or "dense"

    @property
    def runs_on_kernels(self) -> bool:
        return self.name in KERNEL_FORMATS

    @property
    def act_quant(self) -> bool:
        return self.quant == "w8a8"

    @property
    def weight_quant(self) -> bool:
        return self.quant is not None

    def bits_per_weight(self) -> float:
        """Stored bits per dense weight element (2:4 metadata: 4 bits per 4 weights)."""
        value_bits = 8.0 if self.quant else 16.0
        if self.sparsity is None:
            return value_bits
        if self.sparsity.is_24:
            return value_bits / 2 + 1.0
        return value_bits * (1.0 - self.sparsity.zero_fraction)  # idealized, no index cost

    def __str__(self) -> str:
        return self.name


def parse_format(spec: str) -> Format:
    """``"2:4+w8a8"`` -> Format; raises ValueError naming what is wrong."""
    s = spec.strip().lower()
    if s in ("dense", "none", ""):
        return Format(None, None)
    sparsity, quant = None, None
    for part in s.split("+"):
        part = part.strip()
        if part in QUANTS or part in ("int8", "w8"):
            if quant is not None:
                raise ValueError(f"format {spec!r} has two quantizations")
            quant = "int8_weight_only" if part in ("int8", "w8") else part
        else:
            try:
                parsed = parse_sparsity(part)
            except ValueError as e:
                raise ValueError(f"unknown format {spec!r}: {e}; quantizations are {', '.join(QUANTS)}") from None
            if sparsity is not None:
                raise ValueError(f"format {spec!r} has two sparsities")
            sparsity = parsed
            if not sparsity.structured and sparsity.ratio == 0.0:
                sparsity = None
    return Format(sparsity, quant)


def resolve(recipe: Recipe, names: Iterable[str]) -> Dict[str, Format]:
    """The format of every layer name under ``recipe`` (a format string or a pattern dict)."""
    names = list(names)
    if isinstance(recipe, str):
        fmt = parse_format(recipe)
        return {n: fmt for n in names}
    if not isinstance(recipe, Mapping):
        raise TypeError(f"recipe must be a format string or a dict of layer patterns, got {type(recipe).__name__}")
    parsed = [(pattern, parse_format(f)) for pattern, f in recipe.items()]
    out = {}
    for n in names:
        out[n] = next((f for p, f in parsed if n == p or fnmatch.fnmatchcase(n, p)), Format(None, None))
    return out
