"""M-bucketed launch configs of the Triton GEMMs (tile sizes, split-K, warps, stages).

The buckets follow the dispatch layer (M = 1, 2-16, 17-64, 65-256, 257-1024, >1024). Small M
is the decode path, bound by weight bytes: narrow N tiles (32 rows: N=4096 gives 128 CTAs,
one wave on 132 SMs) and deep K tiles (512) with 4 stages keep ~32-64 KB of wide loads in
flight per SM; split-K adds CTAs only when N alone cannot fill the GPU. Large M is
bound by tensor-core rate: big square tiles and grouped (L2-friendly) tile order. The values
are starting points for H100 (132 SMs) until ``sparseq tune`` measures them; every config is
correct for every shape (ragged edges are masked).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import torch

from sparseq.dispatch import BUCKET_BOUNDS as M_BUCKETS  # the one definition of the buckets

# Config tables are keyed by each bucket's upper bound in M_BUCKETS; key 0 is the large-M bucket.


@dataclass(frozen=True)
class MatmulConfig:
    """One launch config: tile sizes (BLOCK_K counts dense K), split-K, grouping, warps, stages."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    SPLIT_K: int = 1
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {v}")
        if self.SPLIT_K < 1 or self.GROUP_M < 1:
            raise ValueError(f"SPLIT_K and GROUP_M must be >= 1, got {self.SPLIT_K}, {self.GROUP_M}")


C = MatmulConfig
# family -> M bucket -> config (SPLIT_K=1 here: split-K is chosen per shape by `pick`).
CONFIGS: Dict[str, Dict[int, MatmulConfig]] = {
    # W8A8: int8 x int8 -> int32 (both K-major).
    "int8": {
        1: C(16, 32, 512, num_warps=4, num_stages=4),
        16: C(16, 32, 512, num_warps=4, num_stages=4),
        64: C(64, 64, 128, num_warps=4, num_stages=4),
        256: C(64, 128, 128, num_warps=4, num_stages=4),
        1024: C(128, 128, 128, num_warps=8, num_stages=3),
        0: C(128, 256, 128, num_warps=8, num_stages=3),
    },
    # bf16/fp16 activations x int8 weights dequantized in registers.
    "int8_weight_only": {
        1: C(16, 32, 256, num_warps=4, num_stages=5),
        16: C(16, 32, 256, num_warps=4, num_stages=5),
        64: C(64, 64, 128, num_warps=4, num_stages=4),
        256: C(64, 128, 64, num_warps=4, num_stages=4),
        1024: C(128, 128, 64, num_warps=8, num_stages=3),
        0: C(128, 256, 64, num_warps=8, num_stages=3),
    },
    # 2:4 with float values: the compressed tile (BLOCK_N x BLOCK_K/2 values + meta) is expanded in registers.
    "sparse24": {
        1: C(16, 32, 256, num_warps=4, num_stages=5),
        16: C(16, 32, 256, num_warps=4, num_stages=5),
        64: C(64, 64, 128, num_warps=4, num_stages=3),
        256: C(64, 128, 64, num_warps=4, num_stages=3),
        1024: C(128, 128, 64, num_warps=8, num_stages=3),
        0: C(128, 128, 64, num_warps=8, num_stages=3),
    },
    # 2:4 with int8 values (weight-only or W8A8).
    "sparse24_int8": {
        1: C(16, 32, 256, num_warps=4, num_stages=5),
        16: C(16, 32, 256, num_warps=4, num_stages=5),
        64: C(64, 64, 128, num_warps=4, num_stages=3),
        256: C(64, 64, 128, num_warps=4, num_stages=4),
        1024: C(128, 128, 128, num_warps=8, num_stages=3),
        0: C(128, 128, 128, num_warps=8, num_stages=3),
    },
}

# Ampere (sm8x, no wgmma) keeps the accumulator in registers: the big Hopper tiles spill there
# (checked with ``python -m sparseq.kernels.aot --arch 80``), so its large-M tiles are smaller.
SM80_OVERRIDES: Dict[str, Dict[int, MatmulConfig]] = {
    "int8": {0: C(128, 128, 128, num_warps=8, num_stages=4)},
    "int8_weight_only": {0: C(128, 128, 64, num_warps=8, num_stages=4)},
    # BLOCK_K stays 128: int8 dots need K = BLOCK_K / 4 >= 32. The expanded weight tile
    # (BLOCK_N x BLOCK_K) sets the register pressure: 64 x 128 tiles with bf16/fp16
    # activations spilled under Triton 3.6 (255 registers, 24-120 B stack) and used 245 of 255
    # under 3.8; 128 x 64 with 2 stages needs 148-184 under both (with 3 stages its int8 variant
    # spilled 16 B under 3.8).
    "sparse24_int8": {
        1024: C(128, 64, 128, num_warps=8, num_stages=2),
        0: C(128, 64, 128, num_warps=8, num_stages=2),
    },
}


def m_bucket(m: int) -> int:
    """The bucket key of ``m``: the smallest bound in :data:`M_BUCKETS` >= m, else 0 (large M)."""
    for bound in M_BUCKETS:
        if m <= bound:
            return bound
    return 0


@functools.lru_cache(maxsize=None)
def _properties(index: int) -> Tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, 10 * props.major + props.minor


def _gpu(device: Optional[torch.device]) -> Tuple[int, int]:
    """(SM count, compute capability x10) of ``device``; an H100 (132, 90) off the GPU."""
    if device is None or torch.device(device).type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return 132, 90
    device = torch.device(device)
    return _properties(device.index if device.index is not None else torch.cuda.current_device())


def capability(device: Optional[torch.device] = None) -> int:
    """Compute capability x10 of ``device`` (90, an H100, under the interpreter)."""
    return _gpu(device)[1]


def sm_count(device: Optional[torch.device] = None) -> int:
    """Streaming multiprocessors of ``device`` (132, an H100 SXM, under the interpreter)."""
    return _gpu(device)[0]


def table(family: str, capability: int = 90) -> Dict[int, MatmulConfig]:
    """The M-bucket -> config table of ``family`` for a GPU of compute capability ``capability`` (x10)
    (a fresh dict: callers may change it)."""
    return dict(_table(family, capability))


@functools.lru_cache(maxsize=None)
def _table(family: str, capability: int) -> Dict[int, MatmulConfig]:
    try:
        base = dict(CONFIGS[family])
    except KeyError:
        raise ValueError(f"unknown kernel family {family!r}; choose from {sorted(CONFIGS)}") from None
    if capability < 90:
        base.update(SM80_OVERRIDES.get(family, {}))
    return base


def split_k_for(m: int, n: int, k: int, cfg: MatmulConfig, sms: int) -> int:
    """Split-K factor for small M (<= 64): only when the output tiles alone fill less than one
    wave of CTAs (e.g. narrow layers), doubling while the CTAs still fit one wave and every
    split keeps at least 4 K tiles. Large layers (N >= 4096 with BLOCK_N 32) never split: a
    split costs a zeroed partial-sum buffer and a second (epilogue) launch, which a decode step
    of ~10 us cannot afford."""
    if m > 64:
        return 1
    tiles = -(-m // cfg.BLOCK_M) * -(-n // cfg.BLOCK_N)
    k_tiles = -(-k // cfg.BLOCK_K)
    split = 1
    while split < 16 and tiles * split * 2 <= sms and k_tiles // (split * 2) >= 4:
        split *= 2
    return split


def pick(family: str, m: int, n: int, k: int, device: Optional[torch.device] = None) -> MatmulConfig:
    """The config of ``family`` for an ``[m, k] x [n, k]^T`` product on ``device`` (memoized:
    no per-call table copy on the hot path)."""
    return _pick(family, m, n, k, *_gpu(device))


@functools.lru_cache(maxsize=4096)
def _pick(family: str, m: int, n: int, k: int, sms: int, capability: int) -> MatmulConfig:
    cfg = _table(family, capability)[m_bucket(m)]
    split = split_k_for(m, n, k, cfg, sms)
    return replace(cfg, SPLIT_K=split) if split != cfg.SPLIT_K else cfg
