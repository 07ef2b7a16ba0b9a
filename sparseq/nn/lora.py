"""LoRA on sparseq layers: dense adapters beside the compressed base, merged by re-compressing.

``recompress(layer, weight)`` builds a layer of the same format and options from a new dense
weight (2:4 formats keep the layer's sparsity pattern unless asked to re-prune).
With PEFT: ``lora_config(...)`` (or ``register_peft(config)``) makes ``get_peft_model`` wrap
sparseq layers (forward = compressed base + dense LoRA); ``merge_and_unload()`` re-compresses
base + delta into the base format. Without PEFT: ``add_lora(model)`` / ``merge_lora(model)``.
Unmerging is not possible (re-compression is lossy): keep the unmerged model to go on training.
"""
from __future__ import annotations

import math
from typing import Any, Callable, List, Optional

import torch
from torch import Tensor, nn

from .. import ops
from .base import CompressedLinear
from .layers import Sparse24Int8Linear, Sparse24Linear
from .swap import _set_module


def kept_mask(layer: CompressedLinear) -> Tensor:
    """Bool ``[N, K]``: the positions a 2:4 layer keeps (its sparsity pattern)."""
    ones = torch.ones(layer.values.shape, dtype=torch.float32, device=layer.values.device)
    return ops.decompress_24(ones, layer.meta) != 0


def recompress(layer: CompressedLinear, weight: Tensor, bias: Optional[Tensor] = None,
               prune: Optional[str] = None) -> CompressedLinear:
    """A new layer with ``layer``'s class, format and options holding dense ``weight[N, K]``.

    2:4 formats keep ``layer``'s pattern (``weight`` is masked by it) unless ``prune`` is
    given (e.g. ``"magnitude"``: a new pattern). SmoothQuant factors and a static activation
    scale are kept as they are. ``bias`` defaults to the layer's own.
    """
    if tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise ValueError(f"weight must have shape ({layer.out_features}, {layer.in_features}), got {tuple(weight.shape)}")
    weight = weight.detach().to(layer.dtype)
    is_24 = isinstance(layer, (Sparse24Linear, Sparse24Int8Linear))
    if is_24 and prune is None:
        weight = torch.where(kept_mask(layer).to(weight.device), weight, torch.zeros_like(weight))
    bias = layer.bias if bias is None else bias
    lin = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().to(layer.dtype), requires_grad=False)
    options: dict = {"dense_fallback": layer.dense_fallback}
    if is_24:
        options["prune"] = prune
    if isinstance(layer, Sparse24Int8Linear):
        options["mode"] = layer.mode
    smooth, x_scale = getattr(layer, "smooth", None), getattr(layer, "x_scale", None)
    if smooth is not None:
        options["smooth"] = smooth
    if x_scale is not None:
        options["act_amax"] = 1.0  # placeholder: the exact scale is copied below
    with torch.no_grad():
        new = type(layer).from_linear(lin, **options)
        if x_scale is not None:
            new.x_scale.copy_(x_scale)
    return new


# ---------------------------------------------------------------------- with PEFT


def _peft_layer_class():
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    from peft.tuners.tuners_utils import check_adapters_to_merge

    class LoraCompressedLinear(PeftLoraLinear):
        """PEFT LoRA around a sparseq layer: base (compressed) + dense adapters."""

        def _get_in_out_features(self, module: nn.Module):
            return module.in_features, module.out_features

        def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
            adapter_names = check_adapters_to_merge(self, adapter_names)
            if not adapter_names:
                return
            base = self.get_base_layer()
            w = base.dense_weight().float()
            b = None if base.bias is None else base.bias.float()
            for name in adapter_names:
                if name in self.lora_variant:
                    raise NotImplementedError(f"merging LoRA variant {type(self.lora_variant[name]).__name__} "
                                              "into a sparseq layer is not supported")
                w = w + self.get_delta_weight(name).float().to(w.device)
                if self.lora_bias[name]:
                    if b is None:
                        raise RuntimeError("cannot merge lora_bias: the base layer has no bias")
                    b = b + self.lora_B[name].bias.float() * self.scaling[name]
            if safe_merge and not (torch.isfinite(w).all() and (b is None or torch.isfinite(b).all())):
                raise ValueError(f"NaNs detected in the merged weights of adapters {adapter_names}")
            self.base_layer = recompress(base, w, b)
            self.merged_adapters.extend(adapter_names)

        def unmerge(self) -> None:
            raise RuntimeError("LoRA merged into a sparseq layer cannot be unmerged (re-compression is lossy); "
                               "keep the unmerged model to go on training")

    return LoraCompressedLinear


_PEFT_CLASS: Any = None


def register_peft(config: Any) -> Any:
    """Let ``peft.get_peft_model(model, config)`` wrap sparseq layers; returns ``config``.
    (PEFT needs the model to hold at least one parameter, e.g. a LayerNorm.)"""
    global _PEFT_CLASS
    if _PEFT_CLASS is None:
        _PEFT_CLASS = _peft_layer_class()
    config._register_custom_module({CompressedLinear: _PEFT_CLASS})
    return config


def lora_config(**kwargs: Any) -> Any:
    """A ``peft.LoraConfig(**kwargs)`` that targets sparseq layers too (needs ``peft``)."""
    try:
        from peft import LoraConfig
    except ImportError as e:
        raise ImportError("sparseq LoRA with PEFT needs peft: pip install peft (or use sparseq.nn.add_lora)") from e
    return register_peft(LoraConfig(**kwargs))


# ------------------------------------------------------------------ without PEFT


class LoRACompressedLinear(nn.Module):
    """A compressed ``base`` layer plus a trainable low-rank update (fp32 adapters):
    ``y = base(x) + alpha / rank * (x A^T) B^T``; B starts at zero."""

    def __init__(self, base: CompressedLinear, rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        device = base.qweight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

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

    def merged(self, prune: Optional[str] = None) -> CompressedLinear:
        """The base format re-made from ``dense + B A`` (see ``recompress``)."""
        w = self.base.dense_weight().float()
        return recompress(self.base, w + self.delta_weight().detach().to(w.device), prune=prune)


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0,
             filter: Optional[Callable[[str, nn.Module], bool]] = None) -> List[str]:
    """Wrap every (filtered) compressed layer of ``model`` with a LoRA adapter; returns names."""
    names = [n for n, m in model.named_modules() if isinstance(m, CompressedLinear)
             and (filter is None or filter(n, m))]
    for name in names:
        _set_module(model, name, LoRACompressedLinear(model.get_submodule(name), rank, alpha))
    return names


@torch.no_grad()
def merge_lora(model: nn.Module, prune: Optional[str] = None) -> List[str]:
    """Replace every LoRA wrapper by its merged, re-compressed base layer; returns names."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRACompressedLinear)]
    for name in names:
        _set_module(model, name, model.get_submodule(name).merged(prune))
    return names
