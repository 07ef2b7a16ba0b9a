// The sm80 kernel instantiations (one .cu each under csrc/sm80/) and their M buckets.
// X(name, input, output, bucket) as in sm90_kernels.h. CUTLASS 2.x SparseGemmWithVisitor
// (mma.sp), 3 stages; Y^T = W X^T with tokens on the tile's N side:
//   M <= 64   threadblock 128 x  64, warps 64 x 32
//   M  > 64   threadblock 128 x 128, warps 64 x 64
// tile K = 64 (16-bit) / 128 (int8).
#pragma once
#include "sparseq/launchers.h"

#define SPARSEQ_SM80_KERNELS(X)    \
  X(bf16_bf16_m64, bf16, bf16, 64) \
  X(bf16_bf16_mlarge, bf16, bf16, 0) \
  X(fp16_fp16_m64, fp16, fp16, 64) \
  X(fp16_fp16_mlarge, fp16, fp16, 0) \
  X(int8_bf16_m64, int8, bf16, 64) \
  X(int8_bf16_mlarge, int8, bf16, 0) \
  X(int8_fp16_m64, int8, fp16, 64) \
  X(int8_fp16_mlarge, int8, fp16, 0)

#ifdef __cplusplus
extern "C" {
#endif
#define SPARSEQ_DECLARE_SM80(name, in, out, bucket) \
  const char* sparseq_sm80_##name(const SparseqGemmArgs* args, size_t* workspace_needed);
SPARSEQ_SM80_KERNELS(SPARSEQ_DECLARE_SM80)
#undef SPARSEQ_DECLARE_SM80
#ifdef __cplusplus
}
#endif
