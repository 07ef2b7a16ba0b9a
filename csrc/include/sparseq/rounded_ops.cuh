// Correctly rounded elementwise ops for the fused epilogues of the sm80 and sm90 2:4 GEMMs.
// Each product and sum is rounded on its own (__fmul_rn / __fadd_rn): the compiler may not
// contract them into an FMA, so the int8 epilogue equals sparseq.reference.int8_mm bit for bit.
#pragma once

#include "cutlass/array.h"
#include "cutlass/cutlass.h"

namespace sparseq {

template <class T>
struct MulRn {
  CUTLASS_HOST_DEVICE T operator()(T a, T b) const { return a * b; }
};
template <int N>
struct MulRn<cutlass::Array<float, N>> {
  CUTLASS_DEVICE cutlass::Array<float, N> operator()(cutlass::Array<float, N> const& a,
                                                      cutlass::Array<float, N> const& b) const {
    cutlass::Array<float, N> r;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) r[i] = __fmul_rn(a[i], b[i]);
    return r;
  }
};

template <class T>
struct AddRn {
  CUTLASS_HOST_DEVICE T operator()(T a, T b) const { return a + b; }
};
template <int N>
struct AddRn<cutlass::Array<float, N>> {
  CUTLASS_DEVICE cutlass::Array<float, N> operator()(cutlass::Array<float, N> const& a,
                                                      cutlass::Array<float, N> const& b) const {
    cutlass::Array<float, N> r;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) r[i] = __fadd_rn(a[i], b[i]);
    return r;
  }
};

}  // namespace sparseq
