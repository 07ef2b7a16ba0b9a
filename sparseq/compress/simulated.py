"""``SimulatedLinear``: a Linear that computes a compressed format in float (fake quant).

Accuracy numbers come from this layer, so they do not depend on any kernel: the weight is
the pruned dense weight times its keep-mask, int8 rounding follows the reference rules
exactly (per-token activations after SmoothQuant division, per-channel weights), and
gradients pass straight through the rounding (for recovery).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .recipe import Format, parse_format
from .smoothquant import fake_quant_per_channel, fake_quant_per_tensor, fake_quant_per_token


class SimulatedLinear(nn.Module):
    """Drop-in for ``nn.Linear`` computing ``fmt`` (pruned weight, optional int8 fake quant)."""

    def __init__(self, linear: nn.Linear, fmt: Format | str = "dense", mask: Optional[torch.Tensor] = None,
                 smooth: Optional[torch.Tensor] = None, act_amax: Optional[float] = None) -> None:
        super().__init__()
        self.format = parse_format(fmt) if isinstance(fmt, str) else fmt
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().float().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone())
        self.register_buffer("mask", None if mask is None else mask.to(torch.bool).clone())
        self.register_buffer("smooth", None if smooth is None else smooth.float().clone())
        if act_amax is not None and not self.format.act_quant:
            raise ValueError(f"a static activation maximum needs a W8A8 format, not {self.format}")
        # static per-tensor activation quantization: the calibrated max |x / smooth| (None: per token)
        self.register_buffer("act_amax", None if act_amax is None else torch.tensor([float(act_amax)]))
        self.lora_a: Optional[nn.Parameter] = None
        self.lora_b: Optional[nn.Parameter] = None
        if self.mask is not None:
            self.apply_mask()

    def add_lora(self, rank: int, scale: float = 1.0) -> None:
        """Trainable low-rank update ``scale * B @ A`` of the weight (B starts at zero)."""
        self.lora_a = nn.Parameter(torch.randn(rank, self.in_features) / self.in_features ** 0.5)
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank))
        self.lora_scale = scale

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Fold the LoRA update into the weight (then masked again) and drop the adapters."""
        if self.lora_a is not None:
            self.weight += self.lora_scale * (self.lora_b @ self.lora_a)
            self.lora_a, self.lora_b = None, None
            self.apply_mask()

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero the pruned weights (after an optimizer step they may have moved)."""
        if self.mask is not None:
            self.weight.mul_(self.mask)

    def effective_weight(self) -> torch.Tensor:
        """The float weight the format computes with (masked, smoothed, int8-rounded)."""
        w = self.weight
        if self.lora_a is not None:
            w = w + self.lora_scale * (self.lora_b @ self.lora_a)
        if self.mask is not None:
            w = w * self.mask
        if self.smooth is not None:
            w = w * self.smooth
        return fake_quant_per_channel(w) if self.format.weight_quant else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.format.act_quant and self.act_amax is not None:
            x2 = fake_quant_per_tensor(x2, float(self.act_amax), self.smooth)
        elif self.format.act_quant:
            x2 = fake_quant_per_token(x2, self.smooth)
        elif self.smooth is not None:
            x2 = x2.float() / self.smooth
        y = x2.float() @ self.effective_weight().T
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    @torch.no_grad()
    def pruned_weight(self) -> torch.Tensor:
        """The pruned float weight without smoothing or rounding (what a kernel layer is built from)."""
        return (self.weight if self.mask is None else self.weight * self.mask).detach().clone()

    def extra_repr(self) -> str:
        act = "" if not self.format.act_quant else (", activations=static" if self.act_amax is not None else ", activations=per-token")
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}{act}"
