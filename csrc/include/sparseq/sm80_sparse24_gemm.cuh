// Ampere (sm80) 2:4 sparse GEMM: CUTLASS 2.x SparseGemmWithVisitor (mma.sp) with the same fused
// epilogue as the sm90 kernels, as a 2.x visitor tree. Included by one .cu per instantiation.
//
//   Y^T[N, M] = W[N, K] (2:4, operand A, row-major) . X[M, K]^T (operand B, column-major)
// D is column-major (= Y row-major [M, N]); the store is element-wise (alignment 1) because
// the 2.x visitor store vectorizes along the GEMM N mode only.
#pragma once

#include "cutlass/cutlass.h"
#include "cutlass/gemm/device/gemm_sparse_with_visitor.h"
#include "cutlass/epilogue/threadblock/fusion/visitors.hpp"
#include "cutlass/layout/matrix.h"

#include "sparseq/launchers.h"
#include "sparseq/rounded_ops.cuh"

namespace sparseq::sm80 {

using namespace cute;


template <class ElementAB_, class ElementD_, int TbN, int WarpN>
struct Sparse24Gemm {
  using ElementAB = ElementAB_;
  using ElementD = ElementD_;
  static constexpr bool kInt8 = cute::is_same_v<ElementAB, int8_t>;
  using ElementAcc = cute::conditional_t<kInt8, int32_t, float>;
  static constexpr int kTileK = kInt8 ? 128 : 64;
  using TbShape = cutlass::gemm::GemmShape<128, TbN, kTileK>;
  using WarpShape = cutlass::gemm::GemmShape<64, WarpN, kTileK>;
  using InstShape = cutlass::gemm::GemmShape<16, 8, kInt8 ? 64 : 32>;
  using Operator = cute::conditional_t<kInt8, cutlass::arch::OpMultiplyAddSaturate, cutlass::arch::OpMultiplyAdd>;
  static constexpr int kStages = 3;
  static constexpr int kEvtStages = 1;
  static constexpr auto Round = cutlass::FloatRoundStyle::round_to_nearest;

  using ThreadMap = cutlass::epilogue::threadblock::OutputTileThreadLayout<TbShape, WarpShape, ElementD, 1, kEvtStages>;
  using Acc = cutlass::epilogue::threadblock::VisitorAccFetch;
  using ColVec = cutlass::epilogue::threadblock::VisitorColBroadcast<ThreadMap, float, Stride<_1, _0, _0>>;
  using RowVec = cutlass::epilogue::threadblock::VisitorRowBroadcast<ThreadMap, float, Stride<_0, _1, _0>>;
  template <template <class> class Fn, class Out>
  using Compute = cutlass::epilogue::threadblock::VisitorCompute<Fn, Out, float, Round>;
  using Store = cutlass::epilogue::threadblock::VisitorAuxStore<ThreadMap, ElementD, Round,
                                                                Stride<_1, int64_t, int64_t>>;

  // 16-bit: acc + bias[n];  int8: ((acc * x_scale[m]) * w_scale[n]) + bias[n]
  using Scaled = cutlass::epilogue::threadblock::Sm80EVT<
      Compute<MulRn, float>, cutlass::epilogue::threadblock::Sm80EVT<Compute<MulRn, float>, Acc, RowVec>, ColVec>;
  using Sum = cute::conditional_t<kInt8, cutlass::epilogue::threadblock::Sm80EVT<Compute<AddRn, float>, Scaled, ColVec>,
                                  cutlass::epilogue::threadblock::Sm80EVT<Compute<AddRn, float>, Acc, ColVec>>;
  using Tree = cutlass::epilogue::threadblock::Sm80EVT<Store, Sum>;

  using Gemm = cutlass::gemm::device::SparseGemmWithVisitor<
      ElementAB, cutlass::layout::RowMajor, ElementAB, cutlass::layout::ColumnMajor, ElementD,
      cutlass::layout::RowMajor, ElementAcc, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, TbShape, WarpShape,
      InstShape, Tree, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, kStages,
      128 / cutlass::sizeof_bits<ElementAB>::value, 128 / cutlass::sizeof_bits<ElementAB>::value, Operator,
      kEvtStages>;
  using ElementE = typename Gemm::GemmKernel::ElementE;
  using LayoutE = typename Gemm::GemmKernel::LayoutE;
  static_assert(cute::is_same_v<LayoutE, cutlass::layout::ColumnMajorInterleaved<2>>, "unexpected metadata layout");
  static_assert(sizeof(ElementE) == (kInt8 ? 4 : 2), "unexpected metadata word");

  static typename Tree::Arguments epilogue(SparseqGemmArgs const& a) {
    typename Store::Arguments store{static_cast<ElementD*>(a.d), {_1{}, int64_t(a.n), int64_t(a.n) * a.m}};
    typename ColVec::Arguments bias{a.bias, 0.f, {}};
    if constexpr (kInt8) {
      return {{{{{}, {a.col_scale, 0.f, {}}, {}}, {a.row_scale, 0.f, {}}, {}}, bias, {}}, store};
    } else {
      return {{{}, bias, {}}, store};
    }
  }

  static const char* run(SparseqGemmArgs const* a, size_t* workspace_needed) {
    cutlass::gemm::GemmCoord problem(a->n, a->m, a->k);
    const int meta_cols = a->k / 2 / Gemm::kElementsPerElementE;
    cutlass::TensorRef<ElementAB const, cutlass::layout::RowMajor> ref_a(
        static_cast<ElementAB const*>(a->a_values), cutlass::layout::RowMajor(a->k / 2));
    cutlass::TensorRef<ElementAB const, cutlass::layout::ColumnMajor> ref_b(static_cast<ElementAB const*>(a->b),
                                                                          cutlass::layout::ColumnMajor(a->k));
    // (the 2.x API takes a mutable metadata ref; the kernel only reads it)
    cutlass::TensorRef<ElementE, LayoutE> ref_e(static_cast<ElementE*>(const_cast<void*>(a->a_meta)),
                                                      LayoutE::packed(cutlass::MatrixCoord(a->n, meta_cols)));
    typename Gemm::Arguments args(problem, ref_a, ref_b, ref_e, epilogue(*a));
    if (workspace_needed != nullptr) {
      *workspace_needed = Gemm::get_workspace_size(args);
      return nullptr;
    }
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) {
      return "CUTLASS sm80 2:4 GEMM cannot implement this problem (shape or alignment)";
    }
    if (gemm.initialize(args, a->workspace, a->stream) != cutlass::Status::kSuccess) {
      return "CUTLASS sm80 2:4 GEMM: initialize failed";
    }
    if (gemm(a->stream) != cutlass::Status::kSuccess) {
      return "CUTLASS sm80 2:4 GEMM: kernel launch failed";
    }
    cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
  }
};

}  // namespace sparseq::sm80

#define SPARSEQ_SM80_LAUNCHER(name, ElementAB, ElementD, TbN, WarpN)                                 \
  extern "C" const char* sparseq_sm80_##name(const SparseqGemmArgs* args, size_t* workspace_needed) { \
    return sparseq::sm80::Sparse24Gemm<ElementAB, ElementD, TbN, WarpN>::run(args, workspace_needed);  \
  }
