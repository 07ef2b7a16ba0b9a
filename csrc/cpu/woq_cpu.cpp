// sparseq._C_cpu: int8 weight-only linear on x86 CPUs,
//   int8_weight_only_cpu   y[m, n] = fp32(sum_k x[m, k] * wq[n, k]) * w_scale[n] + bias[n]
// for float activations (fp32, bf16, fp16) and the layer's own int8 weight [N, K] as stored (no
// repacking, no dense copy). Why hand-written: PyTorch has no fast CPU kernel for it. Measured on
// a 2-core Xeon (AMX), torch 2.14.1, 1 thread: torch._weight_int8pack_mm with fp32 activations
// runs 0.02-0.25x of the fp32 dense GEMM (a scalar loop), and the oneDNN/fbgemm int8 GEMMs
// quantize the activations (another format: W8A8). At small M the dense GEMM is bound by reading
// its weight; reading a quarter (fp32) or half (bf16) of the bytes is where the speed comes from.
//
// AVX-512 kernel: register blocks of up to 4 activation rows x 4 (M = 1: 1 x 8) weight rows, 16
// lanes of K per step; each weight vector is widened int8 -> int32 -> fp32 once per block and
// multiplied into every activation row of the block (FMA). The sum order differs from the
// reference's fp32 matmul as any GEMM's does: tested within the format's tolerance, not bit for
// bit. The epilogue is the reference's: acc * w_scale, then + bias, in fp32, rounded once to the
// activation dtype. Other CPUs run a plain loop (correct, not fast: the Python side offers this
// backend only on AVX-512 CPUs). Schema in sparseq/cpu_kernels.py.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include "cpu_common.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
// GCC 12's _mm512_reduce_add_ps initializes a temporary from itself (`__Y = __Y`) and warns.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define SPARSEQ_HAVE_AVX512_PATH 1
#else
#define SPARSEQ_HAVE_AVX512_PATH 0
#endif

namespace {

using namespace sparseq;  // Tensor, ScalarType, shape_of, ... (cpu_common.h)

// Multiply-adds per parallel task (about 10 us of work at one core), so small calls stay inline.
constexpr int64_t kGrainMacs = 1 << 17;
// Weight rows per parallel block: a multiple of every register block's rows (8, 4).
constexpr int64_t kTaskRows = 16;

void check_input(const Tensor& t, const char* name, ScalarType dtype, int64_t dim) {
  check_cpu_contiguous(t, name);
  STD_TORCH_CHECK(t.dim() == dim, "sparseq int8_weight_only_cpu: ", name, " must be ", dim, "-D, got ", shape_of(t));
  if (dtype != ScalarType::Undefined) {
    STD_TORCH_CHECK(t.scalar_type() == dtype, "sparseq int8_weight_only_cpu: ", name, " must be ", dtype_name(dtype),
                    ", got ", dtype_name(t.scalar_type()));
  }
}

// The output row's values from fp32 sums, in the reference's order: (acc * scale) + bias.
inline float finish(float acc, float scale, const float* bias, int64_t n) {
  const float y = acc * scale;
  return bias ? y + bias[n] : y;
}

bool portable_forced() {
  const char* v = std::getenv("SPARSEQ_CPU_WOQ_PORTABLE");
  return v && std::string(v) == "1";
}

// Plain loop for CPUs without AVX-512 (and the reference for the blocked kernel's structure).
__attribute__((target_clones("avx2", "default"))) void rows_portable(const float* x, const int8_t* w,
                                                                       int64_t m, int64_t k, int64_t n0,
                                                                       int64_t n1, float* acc) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wn = w + n * k;
    for (int64_t i = 0; i < m; ++i) {
      const float* xi = x + i * k;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < k; ++j) s += xi[j] * static_cast<float>(wn[j]);
      acc[i * (n1 - n0) + (n - n0)] = s;
    }
  }
}

#if SPARSEQ_HAVE_AVX512_PATH
#define SPARSEQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

// sums[i][j] = sum_k x[i, k] * w[j, k] for MB activation rows (stride ldx) and NB weight rows.
template <int MB, int NB>
SPARSEQ_AVX512 inline void block_avx512(const float* x, int64_t ldx, const int8_t* w, int64_t k,
                                        float sums[MB][NB]) {
  __m512 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t p = 0;
  for (; p + 16 <= k; p += 16) {
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * k + p));
      wv[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    }
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * ldx + p);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if (p < k) {  // the last K % 16 columns, masked (zeros elsewhere add nothing)
    const __mmask16 mask = static_cast<__mmask16>((1u << (k - p)) - 1u);
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w + j * k + p)));
    for (int i = 0; i < MB; ++i) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * ldx + p);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) sums[i][j] = _mm512_reduce_add_ps(acc[i][j]);
}

// Sums of activation rows [i, i + R) for R = 1..MBMAX (a runtime count) against NB weight rows.
template <int NB, int R, int MBMAX>
SPARSEQ_AVX512 void block_rows(int64_t rows, const float* x, const int8_t* wn, int64_t k, float* acc,
                               int64_t ld) {
  if constexpr (R <= MBMAX) {
    if (rows != R) return block_rows<NB, R + 1, MBMAX>(rows, x, wn, k, acc, ld);
    float s[R][NB];
    block_avx512<R, NB>(x, k, wn, k, s);
    for (int a = 0; a < R; ++a)
      for (int j = 0; j < NB; ++j) acc[a * ld + j] = s[a][j];
  }
}

// Sums of activation rows [0, m) against weight rows [n0, n0 + NB), into acc[i * ld + j]: the
// activation rows in blocks of MBMAX, the last block smaller. MBMAX x NB accumulators stay in
// registers (AVX-512 has 32).
template <int NB, int MBMAX>
SPARSEQ_AVX512 void weight_rows_avx512(const float* x, const int8_t* w, int64_t m, int64_t k, int64_t n0,
                                       float* acc, int64_t ld) {
  const int8_t* wn = w + n0 * k;
  for (int64_t i = 0; i < m; i += MBMAX) {
    block_rows<NB, 1, MBMAX>(std::min<int64_t>(MBMAX, m - i), x + i * k, wn, k, acc + i * ld, ld);
  }
}

// Weight rows [n0, n1) in blocks of NB, then single rows. The block shape follows M: at M = 1, 8
// weight rows (one activation row gives too few independent sums to hide the FMA latency); else
// 4 x 4 (8 x 3 measured 1.3-1.4x slower at M = 8 and 16).
template <int NB, int MBMAX>
SPARSEQ_AVX512 void rows_shape(const float* x, const int8_t* w, int64_t m, int64_t k, int64_t n0, int64_t n1,
                               float* acc) {
  const int64_t ld = n1 - n0;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) weight_rows_avx512<NB, MBMAX>(x, w, m, k, n, acc + (n - n0), ld);
  for (; n < n1; ++n) weight_rows_avx512<1, MBMAX>(x, w, m, k, n, acc + (n - n0), ld);
}

SPARSEQ_AVX512 void rows_avx512(const float* x, const int8_t* w, int64_t m, int64_t k, int64_t n0, int64_t n1,
                                float* acc) {
  if (m == 1) return rows_shape<8, 1>(x, w, m, k, n0, n1, acc);
  rows_shape<4, 4>(x, w, m, k, n0, n1, acc);
}

// SPARSEQ_CPU_WOQ_PORTABLE=1 runs the plain loop on any CPU (read once; the tests use it).
bool cpu_has_avx512() {
  static const bool yes = !portable_forced() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return yes;
}
#endif

void weight_rows(const float* x, const int8_t* w, int64_t m, int64_t k, int64_t n0, int64_t n1, float* acc) {
#if SPARSEQ_HAVE_AVX512_PATH
  if (cpu_has_avx512()) return rows_avx512(x, w, m, k, n0, n1, acc);
#endif
  rows_portable(x, w, m, k, n0, n1, acc);
}

template <typename T>
void run(const Tensor& x, const int8_t* w, const float* scale, const float* bias, Tensor& y, int64_t n) {
  const int64_t m = x.size(0), k = x.size(1);
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  T* yp = static_cast<T*>(y.mutable_data_ptr());
  std::vector<float> xf;  // fp32 activations (bf16 / fp16 widened once; exact)
  const float* x32 = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    x32 = xp;
  } else {
    xf.resize(static_cast<size_t>(m * k));
    for (int64_t e = 0; e < m * k; ++e) xf[e] = as_float(xp[e]);
    x32 = xf.data();
  }
  // Tasks own whole blocks of kTaskRows weight rows, each about kGrainMacs of work.
  const int64_t blocks = (n + kTaskRows - 1) / kTaskRows;
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, kTaskRows * k * m));
  torch::stable::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * kTaskRows, n1 = std::min(n, b1 * kTaskRows);
    std::vector<float> acc(static_cast<size_t>(m * (n1 - n0)));
    weight_rows(x32, w, m, k, n0, n1, acc.data());
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = n0; c < n1; ++c) yp[i * n + c] = T(finish(acc[i * (n1 - n0) + (c - n0)], scale[c], bias, c));
  });
}

// y [M, N] in x's dtype of x [M, K] (fp32 / bf16 / fp16), wq int8 [N, K], w_scale fp32 [N],
// bias fp32 [N] or None. The caller (sparseq.cpu_kernels) passes contiguous tensors.
Tensor int8_weight_only_cpu(Tensor x, Tensor wq, Tensor w_scale, std::optional<Tensor> bias) {
  check_input(x, "x", ScalarType::Undefined, 2);
  check_input(wq, "wq", ScalarType::Char, 2);
  const int64_t m = x.size(0), k = x.size(1), n = wq.size(0);
  STD_TORCH_CHECK(wq.size(1) == k, "sparseq int8_weight_only_cpu: x is ", shape_of(x), " but wq is ", shape_of(wq),
                  " (K must match)");
  check_input(w_scale, "w_scale", ScalarType::Float, 1);
  STD_TORCH_CHECK(w_scale.size(0) == n, "sparseq int8_weight_only_cpu: w_scale must have shape [", n, "], got ",
                  shape_of(w_scale));
  const float* b = nullptr;
  if (bias.has_value()) {
    check_input(*bias, "bias", ScalarType::Float, 1);
    STD_TORCH_CHECK(bias->size(0) == n, "sparseq int8_weight_only_cpu: bias must have shape [", n, "], got ",
                    shape_of(*bias));
    b = static_cast<const float*>(bias->const_data_ptr());
  }
  Tensor y = torch::stable::new_empty(x, {m, n});
  if (m == 0 || n == 0) return y;
  const int8_t* w = static_cast<const int8_t*>(wq.const_data_ptr());
  const float* s = static_cast<const float*>(w_scale.const_data_ptr());
  switch (x.scalar_type()) {
    case ScalarType::Float: run<float>(x, w, s, b, y, n); break;
    case ScalarType::BFloat16: run<c10::BFloat16>(x, w, s, b, y, n); break;
    case ScalarType::Half: run<c10::Half>(x, w, s, b, y, n); break;
    default:
      STD_TORCH_CHECK(false, "sparseq int8_weight_only_cpu: x must be float32, bfloat16 or float16, got ",
                      dtype_name(x.scalar_type()));
  }
  return y;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(sparseq, CPU, m) {
  m.impl("int8_weight_only_cpu", TORCH_BOX(&int8_weight_only_cpu));
}
