// The sm90a kernel instantiations (one .cu each under csrc/sm90a/) and their M buckets.
//
// X(name, input, output, bucket): input bf16|fp16|int8, output bf16|fp16, bucket = the largest
// token count M the config is meant for (0 = no limit). Names are the C symbols
// sparseq_sm90_<name>. Tile/cluster per bucket (Y^T = W X^T: tokens on the tile's N side):
//   M <= 64    64 x  64 x K  cluster 1x1x1  pingpong     (decode: bytes, not FLOPs, bound)
//   M <= 256   64 x 128 x K  cluster 1x1x1  pingpong
//   M  > 256  128 x 128 x K  cluster 2x1x1  cooperative  (B tile multicast over 2 CTAs)
// K = 128 for 16-bit inputs and 256 for int8 (both give the same metadata atom).
#pragma once
#include "sparseq/launchers.h"

#define SPARSEQ_SM90_KERNELS(X)              \
  X(bf16_bf16_m64, bf16, bf16, 64)           \
  X(bf16_bf16_m256, bf16, bf16, 256)         \
  X(bf16_bf16_mlarge, bf16, bf16, 0)         \
  X(fp16_fp16_m64, fp16, fp16, 64)           \
  X(fp16_fp16_m256, fp16, fp16, 256)         \
  X(fp16_fp16_mlarge, fp16, fp16, 0)         \
  X(int8_bf16_m64, int8, bf16, 64)           \
  X(int8_bf16_m256, int8, bf16, 256)         \
  X(int8_bf16_mlarge, int8, bf16, 0)         \
  X(int8_fp16_m64, int8, fp16, 64)           \
  X(int8_fp16_m256, int8, fp16, 256)         \
  X(int8_fp16_mlarge, int8, fp16, 0)

#ifdef __cplusplus
extern "C" {
#endif
#define SPARSEQ_DECLARE_SM90(name, in, out, bucket) \
  const char* sparseq_sm90_##name(const SparseqGemmArgs* args, size_t* workspace_needed);
SPARSEQ_SM90_KERNELS(SPARSEQ_DECLARE_SM90)
#undef SPARSEQ_DECLARE_SM90
#ifdef __cplusplus
}
#endif
