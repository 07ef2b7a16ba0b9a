// Hopper (sm90a) 2:4 sparse GEMM: CUTLASS 3.x sparse collective (TMA, warp-specialized
// wgmma.sp) with a fused epilogue visitor tree (EVT). Included by one .cu per instantiation.
//
//   Y^T[N, M] = W[N, K] (2:4, operand A, K-major) . X[M, K]^T (operand B, K-major)
//   16-bit:  y = acc + bias[n]                                    (fp32 math, cast at the end)
//   int8:    y = ((float(acc) * x_scale[m]) * w_scale[n]) + bias[n]
// The int8 epilogue rounds every step (mul_rn/add_rn, no FMA contraction) so that it equals
// sparseq.reference.int8_mm bit for bit.
#pragma once

#include "cutlass/cutlass.h"

#include "cute/tensor.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "sparseq/launchers.h"
#include "sparseq/rounded_ops.cuh"

namespace sparseq::sm90 {

using namespace cute;


template <class TileShape, class ElementD, bool kInt8>
struct Epilogue;

// 16-bit: D = acc + bias[n]  (bias is per GEMM row; a null pointer adds 0)
template <class TileShape, class ElementD>
struct Epilogue<TileShape, ElementD, false> {
  static constexpr auto Round = cutlass::FloatRoundStyle::round_to_nearest;
  using Bias = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float>;
  using Tree = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<AddRn, ElementD, float, Round>,
      cutlass::epilogue::fusion::Sm90AccFetch, Bias>;

  static typename Tree::Arguments arguments(SparseqGemmArgs const& a) {
    return {{}, {a.bias, 0.f, {}}, {}};
  }
};

// int8: D = ((acc * x_scale[m]) * w_scale[n]) + bias[n]
template <class TileShape, class ElementD>
struct Epilogue<TileShape, ElementD, true> {
  static constexpr auto Round = cutlass::FloatRoundStyle::round_to_nearest;
  using XScale = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, _0>, 1>;
  using WScale = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float>;
  using Bias = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float>;
  using TimesX = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<MulRn, float, float, Round>,
      cutlass::epilogue::fusion::Sm90AccFetch, XScale>;
  using TimesW = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<MulRn, float, float, Round>, TimesX, WScale>;
  using Tree = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<AddRn, ElementD, float, Round>, TimesW, Bias>;

  static typename Tree::Arguments arguments(SparseqGemmArgs const& a) {
    return {
        {
            {{}, {a.col_scale, 0.f, {}}, {}},  // acc * x_scale
            {a.row_scale, 0.f, {}},            // * w_scale
            {},
        },
        {a.bias, 0.f, {}},  // + bias
        {},
    };
  }
};

template <class ElementAB_, class ElementD_, class TileShape_, class ClusterShape_, class KernelSchedule_,
          class EpilogueSchedule_>
struct Sparse24Gemm {
  using ElementAB = ElementAB_;
  using ElementD = ElementD_;
  using TileShape = TileShape_;
  using ClusterShape = ClusterShape_;
  static constexpr bool kInt8 = cute::is_same_v<ElementAB, int8_t>;
  using ElementAcc = cute::conditional_t<kInt8, int32_t, float>;
  using LayoutA = cutlass::layout::RowMajor;     // W [N, K]
  using LayoutB = cutlass::layout::ColumnMajor;  // X [M, K] seen as K x M
  using LayoutD = cutlass::layout::ColumnMajor;  // Y [M, N] seen as N x M
  static constexpr int kAlignAB = 128 / cutlass::sizeof_bits<ElementAB>::value;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;

  using Fusion = Epilogue<TileShape, ElementD, kInt8>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, float, void, LayoutD, kAlignD, ElementD, LayoutD,
      kAlignD, EpilogueSchedule_, typename Fusion::Tree>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, ElementAB, LayoutA, kAlignAB, ElementAB, LayoutB,
      kAlignAB, ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule_>::CollectiveOp;

  using ProblemShape = Shape<int, int, int, int>;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using SparseConfig = typename CollectiveMainloop::SparseConfig;

  // Every sparseq sm90 kernel must read the one prepared metadata layout
  // (sparseq/cutlass_layout.py: 64 x 128 atoms).
  static_assert(cute::size<0>(typename SparseConfig::TensorEAtom{}) == 64, "metadata atom must be 64 rows");
  static_assert(cute::size<1>(typename SparseConfig::TensorEAtom{}) == 128, "metadata atom must be 128 wide in K");

  static typename Gemm::Arguments arguments(SparseqGemmArgs const& a) {
    ProblemShape problem{a.n, a.m, a.k, 1};
    auto layout_a = SparseConfig::fill_layoutA(problem);
    auto layout_e = SparseConfig::fill_layoutE(problem);
    auto stride_b = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, make_shape(a.m, a.k, 1));
    auto stride_d = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, make_shape(a.n, a.m, 1));
    cutlass::KernelHardwareInfo hw_info{a.device_id, a.sm_count};
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        problem,
        {static_cast<ElementAB const*>(a.a_values), layout_a, static_cast<ElementAB const*>(a.b), stride_b,
         static_cast<typename CollectiveMainloop::ElementE const*>(a.a_meta), layout_e},
        {Fusion::arguments(a), nullptr, stride_d, static_cast<ElementD*>(a.d), stride_d},
        hw_info};
    return args;
  }

  static const char* run(SparseqGemmArgs const* a, size_t* workspace_needed) {
    auto args = arguments(*a);
    if (workspace_needed != nullptr) {
      *workspace_needed = Gemm::get_workspace_size(args);
      return nullptr;
    }
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) {
      return "CUTLASS sm90 2:4 GEMM cannot implement this problem (shape or alignment)";
    }
    if (Gemm::get_workspace_size(args) > a->workspace_bytes) {
      return "CUTLASS sm90 2:4 GEMM: workspace too small";
    }
    if (gemm.initialize(args, a->workspace, a->stream) != cutlass::Status::kSuccess) {
      return "CUTLASS sm90 2:4 GEMM: initialize failed";
    }
    if (gemm.run(a->stream) != cutlass::Status::kSuccess) {
      return "CUTLASS sm90 2:4 GEMM: kernel launch failed";
    }
    cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
  }
};

// Tile configurations per M bucket (see sparseq/sm90_kernels.h).
template <int TileK>
struct Configs {
  using Small = cute::tuple<Shape<_64, _64, Int<TileK>>, Shape<_1, _1, _1>,
                            cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                            cutlass::epilogue::TmaWarpSpecialized>;
  using Medium = cute::tuple<Shape<_64, _128, Int<TileK>>, Shape<_1, _1, _1>,
                             cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                             cutlass::epilogue::TmaWarpSpecialized>;
  using Large = cute::tuple<Shape<_128, _128, Int<TileK>>, Shape<_2, _1, _1>,
                            cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                            cutlass::epilogue::TmaWarpSpecializedCooperative>;
};

template <class ElementAB, class ElementD, class Config>
using GemmFor = Sparse24Gemm<ElementAB, ElementD, cute::tuple_element_t<0, Config>, cute::tuple_element_t<1, Config>,
                             cute::tuple_element_t<2, Config>, cute::tuple_element_t<3, Config>>;

template <class ElementAB>
using ConfigsFor = Configs<cute::is_same_v<ElementAB, int8_t> ? 256 : 128>;

}  // namespace sparseq::sm90

// Defines the C launcher sparseq_sm90_<name> for one instantiation.
#if defined(CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED)
#define SPARSEQ_SM90_LAUNCHER(name, ElementAB, ElementD, ConfigName)                                      \
  extern "C" const char* sparseq_sm90_##name(const SparseqGemmArgs* args, size_t* workspace_needed) {     \
    using G = sparseq::sm90::GemmFor<ElementAB, ElementD,                                                 \
                                     typename sparseq::sm90::ConfigsFor<ElementAB>::ConfigName>;          \
    return G::run(args, workspace_needed);                                                                \
  }
#else
#define SPARSEQ_SM90_LAUNCHER(name, ElementAB, ElementD, ConfigName)                                  \
  extern "C" const char* sparseq_sm90_##name(const SparseqGemmArgs*, size_t*) {                      \
    return "sparseq was built without sm90a sparse tensor-core support (needs nvcc >= 12.2, sm_90a)"; \
  }
#endif
