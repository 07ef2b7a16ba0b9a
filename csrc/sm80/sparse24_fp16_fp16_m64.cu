// sm80 2:4 GEMM instantiation: fp16 -> fp16, threadblock 128 x 64 (see sparseq/sm80_kernels.h).
#include "sparseq/sm80_sparse24_gemm.cuh"

SPARSEQ_SM80_LAUNCHER(fp16_fp16_m64, cutlass::half_t, cutlass::half_t, 64, 32)
