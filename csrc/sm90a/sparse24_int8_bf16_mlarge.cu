// sm90a 2:4 GEMM instantiation: int8 x int8 -> bf16, tile config "Large" (see sparseq/sm90_kernels.h).
#include "sparseq/sm90_sparse24_gemm.cuh"

SPARSEQ_SM90_LAUNCHER(int8_bf16_mlarge, int8_t, cutlass::bfloat16_t, Large)
