"""Weight pruning: magnitude, Wanda and SparseGPT, to 2:4, general N:M or unstructured sparsity.

Every function takes a dense ``weight[N, K]`` (``nn.Linear`` layout) and returns the pruned
weight (same dtype) and its keep-mask. 2:4 masks by magnitude / Wanda come from
``sparseq.reference.prune_24`` (ties go to the lower index), so every part of sparseq
agrees on them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .. import reference

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class Sparsity:
    """A sparsity pattern: keep ``n`` of every ``m`` along K (N:M), or a fraction ``ratio`` zero."""

    n: int = 0
    m: int = 0
    ratio: float = 0.0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def is_24(self) -> bool:
        return (self.n, self.m) == (2, 4)

    @property
    def zero_fraction(self) -> float:
        return 1.0 - self.n / self.m if self.structured else self.ratio

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{round(self.ratio * 100, 4):g}%"


def parse_sparsity(spec: str) -> Sparsity:
    """``"2:4"`` / ``"4:8"`` (keep N of M) or ``"50%"`` / ``"0.5"`` (unstructured zero fraction)."""
    s = spec.strip()
    nm = re.fullmatch(r"(\d+):(\d+)", s)
    if nm:
        n, m = int(nm.group(1)), int(nm.group(2))
        if not 0 < n < m:
            raise ValueError(f"N:M sparsity needs 0 < N < M, got {spec!r}")
        return Sparsity(n=n, m=m)
    try:
        ratio = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise ValueError(f"unknown sparsity {spec!r}: use N:M (e.g. 2:4) or a zero fraction (e.g. 50% or 0.5)") from None
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"unstructured sparsity must be in [0, 1), got {spec!r}")
    return Sparsity(ratio=ratio)


def _check(weight: torch.Tensor, sparsity: Sparsity) -> None:
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    if sparsity.structured and weight.shape[1] % sparsity.m != 0:
        raise ValueError(f"K={weight.shape[1]} is not a multiple of M={sparsity.m} for {sparsity} sparsity")


def mask_from_score(score: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    """Keep-mask of the highest scores: the top N of each M along K, or the top (1 - ratio) per row."""
    _check(score, sparsity)
    if sparsity.is_24:
        return reference.prune_24(score.float(), score.float())
    n_rows, k = score.shape
    if sparsity.structured:
        g = score.float().reshape(n_rows, k // sparsity.m, sparsity.m)
        order = torch.argsort(g, dim=-1, descending=True, stable=True)[..., : sparsity.n]
        mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order, True)
        return mask.reshape(n_rows, k)
    n_zero = int(round(k * sparsity.ratio))
    order = torch.argsort(score.float(), dim=-1, descending=False, stable=True)[:, :n_zero]
    return torch.ones_like(score, dtype=torch.bool).scatter_(-1, order, False)


def prune_magnitude(weight: torch.Tensor, sparsity: Sparsity) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep the largest ``|w|``."""
    mask = mask_from_score(weight.abs(), sparsity)
    return weight * mask, mask


def prune_wanda(weight: torch.Tensor, sparsity: Sparsity, x_norm: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Wanda: keep the largest ``|W[n, j]| * ||X_j||`` (``x_norm[K]``: L2 norm of input feature j)."""
    if x_norm.shape != (weight.shape[1],):
        raise ValueError(f"x_norm must have shape ({weight.shape[1]},), got {tuple(x_norm.shape)}")
    mask = mask_from_score(weight.abs().float() * x_norm.float()[None, :], sparsity)
    return weight * mask, mask


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (SparseGPT's ``Hinv``)."""
    h = hessian.double().clone()
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] += damp * torch.mean(torch.diag(h)).clamp(min=1e-12)
    for attempt in range(6):
        try:
            chol = torch.linalg.cholesky(h)
            inv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(inv, upper=True).float()
        except RuntimeError:  # not positive definite: more damping
            h[diag, diag] += 10.0 ** attempt * damp * torch.mean(torch.diag(h)).clamp(min=1e-12)
    raise RuntimeError("SparseGPT: the Hessian stayed singular after damping")


@torch.no_grad()
def prune_sparsegpt(
    weight: torch.Tensor,
    sparsity: Sparsity,
    hessian: torch.Tensor,
    damp: float = 0.01,
    blocksize: int = 128,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh, 2023): prune column by column and update the columns
    not yet visited to compensate, using the inverse of ``H = X^T X`` (``hessian[K, K]``).

    Masks are chosen per block of ``blocksize`` columns (unstructured) or per group of M
    columns (N:M) by ``w^2 / [H^-1]_jj^2``. Returns ``(pruned weight, keep-mask)``.
    """
    _check(weight, sparsity)
    n_rows, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}], got {tuple(hessian.shape)}")
    if sparsity.structured and blocksize % sparsity.m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={sparsity.m}")
    w = weight.detach().float().clone()
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_hessian_factor(h, damp)
    keep = torch.ones_like(w, dtype=torch.bool)
    prune_m = sparsity.m - sparsity.n
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = w[:, i1:i2].clone()
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        err1 = torch.zeros_like(w1)
        if sparsity.structured:
            drop1 = torch.zeros_like(w1, dtype=torch.bool)
        else:
            score = w1 ** 2 / d[None, :] ** 2
            n_zero = int(round(score.numel() * sparsity.ratio))
            drop1 = torch.zeros_like(w1, dtype=torch.bool)
            if n_zero:
                drop1.view(-1)[torch.argsort(score.view(-1), stable=True)[:n_zero]] = True
        for i in range(i2 - i1):
            if sparsity.structured and i % sparsity.m == 0:
                score = w1[:, i:i + sparsity.m] ** 2 / d[None, i:i + sparsity.m] ** 2
                order = torch.argsort(score, dim=1, stable=True)[:, :prune_m]
                drop1[:, i:i + sparsity.m].scatter_(1, order, True)
            col = w1[:, i]
            e = torch.where(drop1[:, i], col, torch.zeros_like(col)) / d[i]  # (w - q) / d, q = kept part
            w1[:, i + 1:].addr_(e, hinv1[i, i + 1:], alpha=-1.0)
            err1[:, i] = e
        w1.masked_fill_(drop1, 0.0)
        w[:, i1:i2] = w1
        keep[:, i1:i2] = ~drop1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    w = w * keep
    return w.to(weight.dtype), keep


def prune(
    weight: torch.Tensor,
    sparsity: Sparsity,
    method: str = "sparsegpt",
    hessian: Optional[torch.Tensor] = None,
    x_norm: Optional[torch.Tensor] = None,
    **sparsegpt_options: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` by ``method`` (magnitude, wanda, sparsegpt); returns ``(weight, keep-mask)``."""
    if method == "magnitude":
        return prune_magnitude(weight, sparsity)
    if method == "wanda":
        if x_norm is None:
            raise ValueError("wanda needs the input feature norms (calibration)")
        return prune_wanda(weight, sparsity, x_norm)
    if method == "sparsegpt":
        if hessian is None:
            raise ValueError("sparsegpt needs the input Hessian X^T X (calibration)")
        return prune_sparsegpt(weight, sparsity, hessian, **sparsegpt_options)
    raise ValueError(f"unknown pruning method {method!r}: choose from {', '.join(METHODS)}")
