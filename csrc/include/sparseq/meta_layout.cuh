// Index functions of the CUTLASS 2:4 metadata layouts; the same formulas as
// sparseq/cutlass_layout.py (which tests pin to CUTLASS's own layout code).
#pragma once

#include <cstdint>

namespace sparseq::meta {

// sm90: destination byte of canonical byte (r, c) of an [n, k/8] metadata matrix.
__host__ __device__ inline int64_t sm90_offset(int64_t r, int64_t c, int64_t n, int bits) {
  int64_t m = r % 64, mb = r / 64, kk8 = c % 16, kb = c / 16;
  int64_t inner;
  if (bits == 16) {
    inner = (kk8 % 2) + 2 * ((m / 8) % 2) + 4 * (kk8 / 4) + 16 * (m % 8) + 128 * ((kk8 / 2) % 2) + 256 * (m / 16);
  } else {
    inner = m * 16 + kk8;
  }
  return kb * (n / 64) * 1024 + mb * 1024 + inner;
}

// sm80: destination word of canonical word (r, c) of an [n, cols] metadata word matrix
// (cutlass::reorder_meta, then ColumnMajorInterleaved<2>).
__host__ __device__ inline int64_t sm80_offset(int64_t r, int64_t c, int64_t n, int bits) {
  const int64_t group = bits == 16 ? 32 : 16;
  const int64_t interweave = bits == 16 ? 4 : 2;
  int64_t row = r / group * group + (r % 8) * interweave + (r % group) / 8;
  int64_t col = c;
  if (row % 2 == 0 && col % 2 == 1) {
    ++row;
    --col;
  } else if (row % 2 == 1 && col % 2 == 0) {
    --row;
    ++col;
  }
  return (col / 2) * (2 * n) + row * 2 + col % 2;
}

}  // namespace sparseq::meta
