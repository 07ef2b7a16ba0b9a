// sm90a 2:4 GEMM instantiation: fp16 x fp16 -> fp16, tile config "Large" (see sparseq/sm90_kernels.h).
#include "sparseq/sm90_sparse24_gemm.cuh"

SPARSEQ_SM90_LAUNCHER(fp16_fp16_mlarge, cutlass::half_t, cutlass::half_t, Large)
