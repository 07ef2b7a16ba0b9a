// sm90a 2:4 GEMM instantiation: bf16 x bf16 -> bf16, tile config "Medium" (see sparseq/sm90_kernels.h).
#include "sparseq/sm90_sparse24_gemm.cuh"

SPARSEQ_SM90_LAUNCHER(bf16_bf16_m256, cutlass::bfloat16_t, cutlass::bfloat16_t, Medium)
