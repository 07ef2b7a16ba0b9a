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

from ..reference import absmax_scale, per_tensor_scale, round_to_int8_grid

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
    return q + (x - x.detach())  # straight-through estimator; the value is exactly q


def fake_quant_per_token(x: torch.Tensor, smooth: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dequant(quantize_per_token(x, smooth))``: fp32 ``x / smooth`` rounded to int8 per token."""
    xs = x.float() if smooth is None else x.float() / smooth
    return _fake_quant_rows(xs)


def fake_quant_per_tensor(x: torch.Tensor, act_amax: float, smooth: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dequant(quantize_per_tensor(x, per_tensor_scale(act_amax), smooth))``: static int8 with a
    calibrated maximum (values beyond it saturate at +-127), straight-through gradient."""
    xs = x.float() if smooth is None else x.float() / smooth
    scale = per_tensor_scale(act_amax).to(xs.device)
    q = round_to_int8_grid(xs, scale) * scale
    return q + (xs - xs.detach())


def static_amax(act_absmax: torch.Tensor, smooth: Optional[torch.Tensor]) -> float:
    """The static activation maximum of a layer: ``max_j |X_j| / smooth_j`` over calibration."""
    a = act_absmax.float() if smooth is None else act_absmax.float() / smooth
    return float(a.max())


def fake_quant_per_channel(weight: torch.Tensor) -> torch.Tensor:
    """``dequant(quantize_per_channel(weight))`` in fp32, with a straight-through gradient."""
    return _fake_quant_rows(weight.float())


def w8a8_output(x: torch.Tensor, weight: torch.Tensor, smooth: Optional[torch.Tensor],
                act_amax: Optional[float] = None) -> torch.Tensor:
    """``fq(x / s) @ fq(w * s)^T``: the W8A8 result (without bias) in fp32; activations per
    token, or static per tensor when ``act_amax`` is given."""
    w = weight.float() if smooth is None else weight.float() * smooth
    xq = fake_quant_per_token(x, smooth) if act_amax is None else fake_quant_per_tensor(x, act_amax, smooth)
    return xq @ fake_quant_per_channel(w).T


@torch.no_grad()
def search_alpha(
    x_rows: torch.Tensor,
    weight: torch.Tensor,
    act_absmax: torch.Tensor,
    grid: Iterable[float] = ALPHA_GRID,
    static: bool = False,
) -> Tuple[float, Optional[torch.Tensor], float]:
    """The ``alpha`` of ``grid`` (and None = no smoothing) with the least W8A8 output error on ``x_rows``.

    ``static``: score with static per-tensor activation scales (``static_amax``) instead of
    dynamic per-token ones. Returns ``(alpha, smooth, relative error)``; ``(-1.0, None, err)``
    when no smoothing wins.
    """
    x = x_rows.float()
    ref = x @ weight.float().T
    denom = ref.pow(2).sum().clamp(min=1e-20)

    def out(s):
        return w8a8_output(x, weight, s, static_amax(act_absmax, s) if static else None)

    best = (-1.0, None, float((out(None) - ref).pow(2).sum() / denom))
    for alpha in grid:
        s = smooth_factors(act_absmax, weight, alpha)
        err = float((out(s) - ref).pow(2).sum() / denom)
        if err < best[2]:
            best = (float(alpha), s, err)
    return best
