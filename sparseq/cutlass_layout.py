"""Pure-PyTorch reference of the CUTLASS 2:4 metadata layouts (sm90 and sm80), both directions.

The canonical metadata (``sparseq.reference``: ``meta[N, K/8]`` uint8, one 4-bit code
``i0 | i1 << 2`` per group of 4 along K, low nibble first) holds the same 4-bit codes as
CUTLASS's metadata; only their placement in memory differs. So every conversion here is a
permutation of whole units: bytes on sm90, 16-bit (bf16/fp16) or 32-bit (int8) words on sm80.
The CUDA converters in ``csrc/`` compute the same index functions; ``csrc/tools/
dump_meta_layouts.cu`` prints CUTLASS's own layouts so the tests can pin these formulas.

sm90 (``wgmma.sp``, ``Sm90GemmSparseConfig`` with tile K >= 128, as every sparseq kernel uses)
    The weight rows (GEMM M) are cut in 64-row atoms and K in 128-wide atoms; each
    (K atom, row atom) pair is 1024 contiguous bytes, K atoms outermost. Inside an atom,
    16-bit types interleave rows and K so that a warp group loads its fragment with 128-bit
    loads (``TensorEAtom_16bit``); 8-bit types keep the atom row-major (64 rows x 16 bytes).
    Prepared shape: ``uint8 [K/128, N/64, 1024]``.
sm80 (``mma.sp``, CUTLASS 2.x ``SparseGemm``)
    Metadata words (uint16 = 4 codes for 16-bit types, uint32 = 8 codes for int8) of the
    ``[N, words]`` matrix are reordered by ``cutlass::reorder_meta`` (tools/util/
    host_reorder.h: rows interleaved in groups of 32 (16 for int8), 2x2 blocks swizzled) and
    stored ``ColumnMajorInterleaved<2>``. Prepared shape: ``int16|int32 [words/2, N, 2]``.

Both require ``N % 64 == 0`` and ``K % 128 == 0`` (``check_cutlass_shape``).
"""
from __future__ import annotations

from typing import Tuple

import torch

from ._checks import check_tensor
from .reference import check_compressed_24

ROW_ALIGN = 64
"""Weight rows (N) must be a multiple of this for the CUTLASS kernels (one metadata atom)."""
K_ALIGN = 128
"""K must be a multiple of this for the CUTLASS kernels (one metadata atom)."""
ATOM_BYTES = 1024
"""Bytes of one sm90 metadata atom (64 rows x 128 K, 4 bits per group of 4)."""

SM90 = 90
SM80 = 80
ARCHS = (SM80, SM90)


def element_bits(dtype: torch.dtype) -> int:
    """Bits of one weight value: 16 (bf16/fp16) or 8 (int8); the metadata layout depends on it."""
    if dtype in (torch.bfloat16, torch.float16):
        return 16
    if dtype == torch.int8:
        return 8
    raise TypeError(f"CUTLASS 2:4 kernels take bfloat16, float16 or int8 values, got {dtype}")


def check_cutlass_shape(n: int, k: int) -> None:
    """The shape rules of the CUTLASS kernels (metadata atoms are 64 rows x 128 K)."""
    if n % ROW_ALIGN != 0 or n <= 0:
        raise ValueError(f"CUTLASS 2:4 kernels need N (weight rows) to be a positive multiple of {ROW_ALIGN}, got {n}")
    if k % K_ALIGN != 0 or k <= 0:
        raise ValueError(f"CUTLASS 2:4 kernels need K to be a positive multiple of {K_ALIGN}, got {k}")


def _check_bits(bits: int) -> None:
    if bits not in (8, 16):
        raise ValueError(f"element_bits must be 8 or 16, got {bits}")


# ------------------------------------------------------------------------------ sm90


def sm90_meta_offsets(n: int, k: int, bits: int, device=None) -> torch.Tensor:
    """Destination byte of every canonical metadata byte ``[n, k/8]`` in the sm90 layout."""
    _check_bits(bits)
    check_cutlass_shape(n, k)
    r = torch.arange(n, device=device, dtype=torch.int64)[:, None]
    c = torch.arange(k // 8, device=device, dtype=torch.int64)[None, :]
    m, mb = r % 64, r // 64
    kk8, kb = c % 16, c // 16  # byte column inside the 128-wide K atom, K atom index
    if bits == 16:
        # TensorEAtom_16bit: ((8,2,4),(16,2,4)) ordered (k16, m2, k4, m8, k2, m4), in bytes.
        inner = (kk8 % 2) + 2 * ((m // 8) % 2) + 4 * (kk8 // 4) + 16 * (m % 8) + 128 * ((kk8 // 2) % 2) + 256 * (m // 16)
    else:
        # TensorEAtom_8bit: (64, 128) row-major, in bytes.
        inner = m * 16 + kk8
    return kb * (n // 64) * ATOM_BYTES + mb * ATOM_BYTES + inner


def meta_to_cutlass_sm90(meta: torch.Tensor, bits: int) -> torch.Tensor:
    """Canonical ``meta[N, K/8]`` -> sm90 layout ``uint8[K/128, N/64, 1024]``."""
    check_tensor("meta", meta, dtypes=(torch.uint8,), ndim=2, contiguous=True)
    n, k = meta.shape[0], meta.shape[1] * 8
    offsets = sm90_meta_offsets(n, k, bits, meta.device)
    out = torch.empty(n * k // 8, dtype=torch.uint8, device=meta.device)
    out[offsets.reshape(-1)] = meta.reshape(-1)
    return out.reshape(k // K_ALIGN, n // ROW_ALIGN, ATOM_BYTES)


def meta_from_cutlass_sm90(meta_cutlass: torch.Tensor, bits: int) -> torch.Tensor:
    """sm90 layout ``uint8[K/128, N/64, 1024]`` -> canonical ``meta[N, K/8]``."""
    check_tensor("meta_cutlass", meta_cutlass, dtypes=(torch.uint8,), ndim=3, contiguous=True)
    kb, nb, atom = meta_cutlass.shape
    if atom != ATOM_BYTES:
        raise ValueError(f"meta_cutlass must have shape (K/128, N/64, {ATOM_BYTES}), got {tuple(meta_cutlass.shape)}")
    n, k = nb * ROW_ALIGN, kb * K_ALIGN
    offsets = sm90_meta_offsets(n, k, bits, meta_cutlass.device)
    return meta_cutlass.reshape(-1)[offsets.reshape(-1)].reshape(n, k // 8)


# ------------------------------------------------------------------------------ sm80


def _sm80_word(bits: int) -> Tuple[torch.dtype, int]:
    """(word dtype, canonical bytes per word) of the sm80 metadata."""
    _check_bits(bits)
    return (torch.int16, 2) if bits == 16 else (torch.int32, 4)


def sm80_meta_offsets(n: int, k: int, bits: int, device=None) -> torch.Tensor:
    """Destination word of every canonical metadata word ``[n, words]`` in the sm80 layout.

    ``cutlass::reorder_meta`` (row groups of 32 for uint16 words, 16 for uint32; 2x2 blocks
    swizzled from Z to N order) followed by ``ColumnMajorInterleaved<2>`` addressing.
    """
    _, per_word = _sm80_word(bits)
    check_cutlass_shape(n, k)
    cols = k // 8 // per_word
    m = torch.arange(n, device=device, dtype=torch.int64)[:, None].expand(n, cols)
    kc = torch.arange(cols, device=device, dtype=torch.int64)[None, :].expand(n, cols)
    group, interweave = (32, 4) if bits == 16 else (16, 2)
    row = m // group * group + (m % 8) * interweave + (m % group) // 8
    col = kc
    swap_down = (row % 2 == 0) & (col % 2 == 1)
    swap_up = (row % 2 == 1) & (col % 2 == 0)
    row = row + swap_down.long() - swap_up.long()
    col = col - swap_down.long() + swap_up.long()
    return (col // 2) * (2 * n) + row * 2 + col % 2


def meta_to_cutlass_sm80(meta: torch.Tensor, bits: int) -> torch.Tensor:
    """Canonical ``meta[N, K/8]`` -> sm80 layout ``int16|int32 [words/2, N, 2]``."""
    check_tensor("meta", meta, dtypes=(torch.uint8,), ndim=2, contiguous=True)
    dtype, per_word = _sm80_word(bits)
    n, k = meta.shape[0], meta.shape[1] * 8
    offsets = sm80_meta_offsets(n, k, bits, meta.device)
    words = meta.view(dtype)  # little-endian: the first byte is the low byte of a word
    out = torch.empty(words.numel(), dtype=dtype, device=meta.device)
    out[offsets.reshape(-1)] = words.reshape(-1)
    cols = words.shape[1]
    return out.reshape(cols // 2, n, 2)


def meta_from_cutlass_sm80(meta_cutlass: torch.Tensor, bits: int) -> torch.Tensor:
    """sm80 layout ``int16|int32 [words/2, N, 2]`` -> canonical ``meta[N, K/8]``."""
    dtype, per_word = _sm80_word(bits)
    check_tensor("meta_cutlass", meta_cutlass, dtypes=(dtype,), ndim=3, contiguous=True)
    half_cols, n, two = meta_cutlass.shape
    if two != 2:
        raise ValueError(f"meta_cutlass must have shape (words/2, N, 2), got {tuple(meta_cutlass.shape)}")
    cols = 2 * half_cols
    k = cols * per_word * 8
    offsets = sm80_meta_offsets(n, k, bits, meta_cutlass.device)
    words = meta_cutlass.reshape(-1)[offsets.reshape(-1)].reshape(n, cols)
    return words.view(torch.uint8).reshape(n, k // 8)


# --------------------------------------------------------------------- both, by arch


def meta_to_cutlass(meta: torch.Tensor, bits: int, arch: int) -> torch.Tensor:
    """Canonical metadata -> the CUTLASS layout of ``arch`` (80 or 90)."""
    if arch == SM90:
        return meta_to_cutlass_sm90(meta, bits)
    if arch == SM80:
        return meta_to_cutlass_sm80(meta, bits)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch}")


def meta_from_cutlass(meta_cutlass: torch.Tensor, bits: int, arch: int) -> torch.Tensor:
    """The CUTLASS layout of ``arch`` -> canonical metadata."""
    if arch == SM90:
        return meta_from_cutlass_sm90(meta_cutlass, bits)
    if arch == SM80:
        return meta_from_cutlass_sm80(meta_cutlass, bits)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch}")


def cutlass_meta_shape(n: int, k: int, bits: int, arch: int) -> Tuple[Tuple[int, ...], torch.dtype]:
    """Shape and dtype of the prepared metadata of a ``[n, k]`` weight."""
    check_cutlass_shape(n, k)
    if arch == SM90:
        _check_bits(bits)
        return (k // K_ALIGN, n // ROW_ALIGN, ATOM_BYTES), torch.uint8
    if arch == SM80:
        dtype, per_word = _sm80_word(bits)
        return (k // 8 // per_word // 2, n, 2), dtype
    raise ValueError(f"arch must be one of {ARCHS}, got {arch}")


def cutlass_meta_arch(meta_cutlass: torch.Tensor) -> int:
    """Which layout a prepared metadata tensor is in (sm90: uint8 3-D; sm80: int16/int32 3-D)."""
    if meta_cutlass.dim() == 3 and meta_cutlass.dtype == torch.uint8 and meta_cutlass.shape[2] == ATOM_BYTES:
        return SM90
    if meta_cutlass.dim() == 3 and meta_cutlass.dtype in (torch.int16, torch.int32) and meta_cutlass.shape[2] == 2:
        return SM80
    raise ValueError(
        f"meta is not a prepared CUTLASS metadata tensor (got {meta_cutlass.dtype} {tuple(meta_cutlass.shape)}); "
        "convert the canonical (values, meta) with sparseq.cuda_ops.prepare_sparse24_cutlass first"
    )


def check_prepared(values: torch.Tensor, meta_cutlass: torch.Tensor) -> Tuple[int, int, int]:
    """Validate ``values[N, K/2]`` and its prepared metadata; returns ``(N, K, arch)``."""
    check_tensor("values", values, dtypes=(torch.bfloat16, torch.float16, torch.int8), ndim=2, contiguous=True)
    n, k = values.shape[0], values.shape[1] * 2
    check_cutlass_shape(n, k)
    arch = cutlass_meta_arch(meta_cutlass)
    shape, dtype = cutlass_meta_shape(n, k, element_bits(values.dtype), arch)
    if tuple(meta_cutlass.shape) != shape or meta_cutlass.dtype != dtype:
        raise ValueError(
            f"meta does not match values {tuple(values.shape)} {values.dtype}: expected the sm{arch} layout "
            f"{dtype} {shape}, got {meta_cutlass.dtype} {tuple(meta_cutlass.shape)}"
        )
    if not meta_cutlass.is_contiguous():
        raise ValueError("meta must be contiguous")
    return n, k, arch


def prepare_reference(values: torch.Tensor, meta: torch.Tensor, arch: int) -> torch.Tensor:
    """Reference of ``prepare_sparse24_cutlass``: canonical (values, meta) -> prepared meta."""
    n, k = check_compressed_24(values, meta)
    check_cutlass_shape(n, k)
    return meta_to_cutlass(meta, element_bits(values.dtype), arch)
