"""SmoothQuant W8A8: migrate activation outliers into the weights, then int8 both.

``smooth[j] = max|X_j|^alpha / max|W_j|^(1 - alpha)``; the activation is divided by
``smooth`` and the weight multiplied by it (``(X / s)(W * s)^T == X W^T`` in exact math), as
``sparseq.reference.quantize_per_token(x, smooth)`` defines. Also: fake quantization that
matches the reference bit for bit (with a straight-through gradient) and a per-layer
search of ``alpha`` on calibration rows.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch

from ..reference import absmax_scale, round_to_int8_grid

DEFAULT_ALPHA = 0.5
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def smooth_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = DEFAULT_ALPHA, eps: float = 1e-5) -> torch.Tensor:
    """Per-input-channel factors ``smooth[K]`` fp32 for activation max ``act_absmax[K]``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (migration strength) must be in [0, 1], got {alpha}")
    if act_absmax.shape != (weight.shape[1],):
        raise ValueError(f"act_absmax must have shape ({weight.shape[1]},), got {tuple(act_absmax.shape)}")
    a = act_absmax.float().clamp(min=eps)
    w = weight.detach().float().abs().amax(dim=0).clamp(min=eps)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    return s.clamp(min=eps).contiguous()


def _fake_quant_rows(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per row, dequantized: the reference rule (scale 1.0 for a zero row)."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True)
    scale = absmax_scale(amax)
    q = round_to_int8_grid(x, scale) * scale
    return x + (q - x).detach()  # straight-through estimator


def fake_quant_per_token(x: torch.Tensor, smooth: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dequant(quantize_per_token(x, smooth))``: fp32 ``x / smooth`` rounded to int8 per token."""
    xs = x.float() if smooth is None else x.float() / smooth
    return _fake_quant_rows(xs)


def fake_quant_per_channel(weight: torch.Tensor) -> torch.Tensor:
    """``dequant(quantize_per_channel(weight))`` in fp32, with a straight-through gradient."""
    return _fake_quant_rows(weight.float())


def w8a8_output(x: torch.Tensor, weight: torch.Tensor, smooth: Optional[torch.Tensor]) -> torch.Tensor:
    """``fq(x / s) @ fq(w * s)^T``: the W8A8 result (without bias) in fp32."""
    w = weight.float() if smooth is None else weight.float() * smooth
    return fake_quant_per_token(x, smooth) @ fake_quant_per_channel(w).T


@torch.no_grad()
def search_alpha(
    x_rows: torch.Tensor,
    weight: torch.Tensor,
    act_absmax: torch.Tensor,
    grid: Iterable[float] = ALPHA_GRID,
) -> Tuple[float, Optional[torch.Tensor], float]:
    """The ``alpha`` of ``grid`` (and None = no smoothing) with the least W8A8 output error on ``x_rows``.

    Returns ``(alpha, smooth, relative error)``; ``(-1.0, None, err)`` when no smoothing wins.
    """
    x = x_rows.float()
    ref = x @ weight.float().T
    denom = ref.pow(2).sum().clamp(min=1e-20)
    best = (-1.0, None, float((w8a8_output(x, weight, None) - ref).pow(2).sum() / denom))
    for alpha in grid:
        s = smooth_factors(act_absmax, weight, alpha)
        err = float((w8a8_output(x, weight, s) - ref).pow(2).sum() / denom)
        if err < best[2]:
            best = (float(alpha), s, err)
    return best
