// Canonical 2:4 metadata <-> the sm80 (mma.sp, CUTLASS 2.x) layout, on the GPU: a permutation of
// 16-bit words (bf16/fp16: 4 codes each) or 32-bit words (int8: 8 codes each).
#include "sparseq/launchers.h"
#include "sparseq/meta_layout.cuh"

namespace {

template <bool kToCutlass, class Word>
__global__ void permute_sm80(const Word* __restrict__ src, Word* __restrict__ dst, int n, int cols, int bits) {
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(n) * cols) return;
  int64_t r = i / cols, c = i % cols;
  int64_t o = sparseq::meta::sm80_offset(r, c, n, bits);
  if (kToCutlass) {
    dst[o] = src[i];
  } else {
    dst[i] = src[o];
  }
}

template <bool kToCutlass>
const char* launch(const void* src, void* dst, int n, int k, int bits, cudaStream_t stream) {
  if (n % 64 != 0 || k % 128 != 0) return "sm80 metadata layout needs N % 64 == 0 and K % 128 == 0";
  if (bits != 8 && bits != 16) return "sm80 metadata layout: bits must be 8 or 16";
  int cols = bits == 16 ? k / 16 : k / 32;
  int64_t total = int64_t(n) * cols;
  if (total == 0) return nullptr;
  int threads = 256;
  unsigned blocks = unsigned((total + threads - 1) / threads);
  if (bits == 16) {
    permute_sm80<kToCutlass><<<blocks, threads, 0, stream>>>(static_cast<const uint16_t*>(src),
                                                             static_cast<uint16_t*>(dst), n, cols, bits);
  } else {
    permute_sm80<kToCutlass><<<blocks, threads, 0, stream>>>(static_cast<const uint32_t*>(src),
                                                             static_cast<uint32_t*>(dst), n, cols, bits);
  }
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

extern "C" const char* sparseq_meta_to_cutlass_sm80(const uint8_t* canonical, void* prepared, int n, int k, int bits,
                                                    cudaStream_t stream) {
  return launch<true>(canonical, prepared, n, k, bits, stream);
}

extern "C" const char* sparseq_meta_from_cutlass_sm80(const void* prepared, uint8_t* canonical, int n, int k, int bits,
                                                      cudaStream_t stream) {
  return launch<false>(prepared, canonical, n, k, bits, stream);
}
