// sm90a 2:4 GEMM instantiation: int8 x int8 -> fp16, tile config "Small" (see sparseq/sm90_kernels.h).
#include "sparseq/sm90_sparse24_gemm.cuh"

SPARSEQ_SM90_LAUNCHER(int8_fp16_m64, int8_t, cutlass::half_t, Small)
