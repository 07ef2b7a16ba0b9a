// sm80 2:4 GEMM instantiation: int8 -> fp16, threadblock 128 x 128 (see sparseq/sm80_kernels.h).
#include "sparseq/sm80_sparse24_gemm.cuh"

SPARSEQ_SM80_LAUNCHER(int8_fp16_mlarge, int8_t, cutlass::half_t, 128, 64)
