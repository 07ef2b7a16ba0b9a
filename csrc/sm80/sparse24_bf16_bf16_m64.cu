// sm80 2:4 GEMM instantiation: bf16 -> bf16, threadblock 128 x 64 (see sparseq/sm80_kernels.h).
#include "sparseq/sm80_sparse24_gemm.cuh"

SPARSEQ_SM80_LAUNCHER(bf16_bf16_m64, cutlass::bfloat16_t, cutlass::bfloat16_t, 64, 32)
