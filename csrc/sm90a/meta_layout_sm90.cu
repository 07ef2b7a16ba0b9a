// Canonical 2:4 metadata <-> the sm90 (wgmma.sp) CUTLASS layout, on the GPU: a byte permutation.
#include "sparseq/launchers.h"
#include "sparseq/meta_layout.cuh"

namespace {

template <bool kToCutlass>
__global__ void permute_sm90(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst, int n, int cols, int bits) {
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(n) * cols) return;
  int64_t r = i / cols, c = i % cols;
  int64_t o = sparseq::meta::sm90_offset(r, c, n, bits);
  if (kToCutlass) {
    dst[o] = src[i];
  } else {
    dst[i] = src[o];
  }
}

template <bool kToCutlass>
const char* launch(const uint8_t* src, uint8_t* dst, int n, int k, int bits, cudaStream_t stream) {
  if (n % 64 != 0 || k % 128 != 0) return "sm90 metadata layout needs N % 64 == 0 and K % 128 == 0";
  if (bits != 8 && bits != 16) return "sm90 metadata layout: bits must be 8 or 16";
  int cols = k / 8;
  int64_t total = int64_t(n) * cols;
  if (total == 0) return nullptr;
  int threads = 256;
  int64_t blocks = (total + threads - 1) / threads;
  permute_sm90<kToCutlass><<<unsigned(blocks), threads, 0, stream>>>(src, dst, n, cols, bits);
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

extern "C" const char* sparseq_meta_to_cutlass_sm90(const uint8_t* canonical, uint8_t* prepared, int n, int k, int bits,
                                                    cudaStream_t stream) {
  return launch<true>(canonical, prepared, n, k, bits, stream);
}

extern "C" const char* sparseq_meta_from_cutlass_sm90(const uint8_t* prepared, uint8_t* canonical, int n, int k,
                                                      int bits, cudaStream_t stream) {
  return launch<false>(prepared, canonical, n, k, bits, stream);
}
