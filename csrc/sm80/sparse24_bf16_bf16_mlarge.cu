// sm80 2:4 GEMM instantiation: bf16 -> bf16, threadblock 128 x 128 (see sparseq/sm80_kernels.h).
#include "sparseq/sm80_sparse24_gemm.cuh"

SPARSEQ_SM80_LAUNCHER(bf16_bf16_mlarge, cutlass::bfloat16_t, cutlass::bfloat16_t, 128, 64)
