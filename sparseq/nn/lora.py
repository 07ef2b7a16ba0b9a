"""LoRA adapters beside sparseq layers: fine-tune a compressed model, then merge back.

``add_lora(model)`` wraps each compressed layer: ``y = base(x) + scale * (x A^T) B^T`` with
the base frozen (its compressed buffers are not parameters) and only ``A``, ``B`` trained.
``merge_lora(model)`` folds ``scale * B A`` into the dense weight and re-compresses it into
the base layer's format, keeping a 2:4 layer's sparsity pattern (the mask stays fixed).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

from .. import ops
from .base import CompressedLinear
from .swap import _set_module, make_layer


class LoRACompressedLinear(nn.Module):
    """A compressed ``base`` layer plus a trainable low-rank update (fp32 adapters)."""

    def __init__(self, base: CompressedLinear, rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        device = base.w_scale.device if hasattr(base, "w_scale") else base.values.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # B = 0: starts as the base layer

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: Tensor) -> Tensor:
        update = (x.float() @ self.lora_A.T) @ self.lora_B.T
        return self.base(x) + (self.scale * update).to(x.dtype)

    def delta_weight(self) -> Tensor:
        return self.scale * (self.lora_B @ self.lora_A)

    def merged(self) -> CompressedLinear:
        """The base format re-made from ``dense + B A`` (2:4 pattern of the base kept)."""
        base = self.base
        w = base.dense_weight().float()
        smooth = getattr(base, "smooth", None)
        if hasattr(base, "meta"):
            ones = torch.ones(base.out_features, base.in_features // 2, device=w.device)
            mask = ops.decompress_24(ones, base.meta) != 0
            w = torch.where(mask, w + self.delta_weight().to(w.device), torch.zeros_like(w))
        else:
            w = w + self.delta_weight().to(w.device)
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=w.device, dtype=base.dtype)
        with torch.no_grad():
            linear.weight.copy_(w.to(base.dtype))
            if base.bias is not None:
                linear.bias.copy_(base.bias)
        options: dict = {"dense_fallback": base.dense_fallback}
        if base.FORMAT in ("w8a8", "2:4+w8a8"):
            options["smooth"] = smooth
            x_scale = getattr(base, "x_scale", None)
            options["act_amax"] = None if x_scale is None else float(x_scale[0]) * 127
        return make_layer(linear, base.FORMAT, **options)


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0,
             filter: Optional[Callable[[str, nn.Module], bool]] = None) -> List[str]:
    """Wrap every (filtered) compressed layer of ``model`` with a LoRA adapter; returns names."""
    names = [n for n, m in model.named_modules() if isinstance(m, CompressedLinear)
             and (filter is None or filter(n, m))]
    for name in names:
        _set_module(model, name, LoRACompressedLinear(model.get_submodule(name), rank, alpha))
    return names


@torch.no_grad()
def merge_lora(model: nn.Module) -> List[str]:
    """Replace every LoRA wrapper by its merged, re-compressed base layer; returns names."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRACompressedLinear)]
    for name in names:
        _set_module(model, name, model.get_submodule(name).merged())
    return names
