// sm80 2:4 GEMM instantiation: int8 -> bf16, threadblock 128 x 64 (see sparseq/sm80_kernels.h).
#include "sparseq/sm80_sparse24_gemm.cuh"

SPARSEQ_SM80_LAUNCHER(int8_bf16_m64, int8_t, cutlass::bfloat16_t, 64, 32)
