// C ABI between the CUTLASS kernel files (no torch) and the torch bindings.
//
// The GEMM computes Y^T = W . X^T with the 2:4 weight W as the sparse operand A:
//   GEMM M = N (weight rows), GEMM N = M (tokens), GEMM K = K.
//   a_values  W values [N, K/2] row-major (the canonical compressed values, unchanged)
//   a_meta    W metadata in the prepared CUTLASS layout of the kernel's arch
//   b         X [M, K] row-major (K-major B)
//   d         Y [M, N] row-major (= column-major D of the GEMM)
// Epilogue (fp32): y = acc * col_scale[token] * row_scale[n] + bias[n], cast to the output
// type; row_scale/col_scale only for int8 kernels; bias may be NULL (adds 0).
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct SparseqGemmArgs {
  const void* a_values;
  const void* a_meta;
  const void* b;
  void* d;
  const float* bias;       /* [N] fp32 or NULL */
  const float* row_scale;  /* [N] fp32 per weight row (int8 kernels) */
  const float* col_scale;  /* [M] fp32 per token (int8 kernels) */
  int n;                   /* weight rows (GEMM M) */
  int m;                   /* tokens (GEMM N) */
  int k;
  int device_id;
  int sm_count;
  void* workspace;
  size_t workspace_bytes;
  cudaStream_t stream;
} SparseqGemmArgs;

/* Every kernel launcher has this signature. With workspace_needed != NULL it only writes the
   workspace size and returns; otherwise it launches on args->stream. Returns NULL on success
   or a static, human-readable error message. Never synchronizes. */
typedef const char* (*SparseqGemmLauncher)(const SparseqGemmArgs* args, size_t* workspace_needed);

/* Metadata layout converters: canonical meta [n, k/8] uint8 <-> prepared CUTLASS layout
   (see sparseq/cutlass_layout.py). bits = 16 (bf16/fp16) or 8 (int8). */
const char* sparseq_meta_to_cutlass_sm90(const uint8_t* canonical, uint8_t* prepared, int n, int k, int bits,
                                         cudaStream_t stream);
const char* sparseq_meta_from_cutlass_sm90(const uint8_t* prepared, uint8_t* canonical, int n, int k, int bits,
                                           cudaStream_t stream);
const char* sparseq_meta_to_cutlass_sm80(const uint8_t* canonical, void* prepared, int n, int k, int bits,
                                         cudaStream_t stream);
const char* sparseq_meta_from_cutlass_sm80(const void* prepared, uint8_t* canonical, int n, int k, int bits,
                                           cudaStream_t stream);

#ifdef __cplusplus
}
#endif
