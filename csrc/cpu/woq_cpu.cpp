// sparseq._C_cpu: int8 weight-only linear on x86 CPUs,
//   int8_weight_only_cpu   y[m, n] = fp32(sum_k x[m, k] * wq[n, k]) * w_scale[n] + bias[n]
// for float activations (fp32, bf16, fp16) and the layer's own int8 weight [N, K] as stored (no
// repacking, no dense copy). Why hand-written: PyTorch has no fast CPU kernel for it. Measured on
// a 2-core Xeon (AMX), torch 2.14.1, 1 thread: torch._weight_int8pack_mm with fp32 activations
// runs 0.02-0.25x of the fp32 dense GEMM (a scalar loop), and the oneDNN/fbgemm int8 GEMMs
// quantize the activations (another format: W8A8). At small M the dense GEMM is bound by reading
// its weight; reading a quarter (fp32) or half (bf16) of the bytes is where the speed comes from.
//
// AVX-512 kernels. Register blocks of up to 6 activation rows x 4 weight rows (M = 1: 1 x 8), 16
// lanes of K per step; each weight vector is widened int8 -> int32 -> fp32 once per block and
// multiplied into every activation row of the block (FMA). Whole chunks of 16 activation rows
// (M >= 16) go through the lane kernel (the rows as the lanes of a vector, weight panels widened
// once into L1 and broadcast; see rows_lanes), which keeps the FMA ports busy where the register
// blocks spend theirs on widening and horizontal sums (fp32, 1 thread, 1536x384 M = 16: 4 x 4
// blocks 187 us, lane kernel 150 us, dense 220 us); the rows past the last chunk go through the
// register blocks. The sum order differs from the reference's fp32 matmul as any GEMM's does:
// tested within the format's tolerance, not bit for bit. The epilogue is the reference's:
// acc * w_scale, then + bias, in fp32, rounded once to the activation dtype. Other CPUs run a plain loop (correct, not fast: the Python side offers this
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
// up to 6 activation rows x 4 weight rows (24 accumulators + 4 weight vectors + 1 activation
// vector of the 32 registers: each widened weight vector serves 6 rows; fp32, 1 thread, vs 4 x 4:
// 1536x384 M = 5 / 10 / 12 73 -> 57, 128 -> 111, 145 -> 126 us, equal at M = 8; 8 x 3 measured
// 1.3-1.4x slower than 4 x 4 at M = 8 and 16).
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
  rows_shape<4, 6>(x, w, m, k, n0, n1, acc);
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

// Rows [i0, i1) x columns [n0, n1) of y (row stride n): the sums (register blocks, or the plain
// loop), then the epilogue.
template <typename T>
void rows_out(const float* x, const int8_t* w, int64_t i0, int64_t i1, int64_t k, int64_t n0, int64_t n1,
              const float* scale, const float* bias, T* y, int64_t n) {
  const int64_t ld = n1 - n0;
  std::vector<float> acc(static_cast<size_t>((i1 - i0) * ld));
  weight_rows(x + i0 * k, w, i1 - i0, k, n0, n1, acc.data());
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t c = n0; c < n1; ++c) y[i * n + c] = T(finish(acc[(i - i0) * ld + (c - n0)], scale[c], bias, c));
}

#if SPARSEQ_HAVE_AVX512_PATH

// Lane kernel (whole chunks of 16 activation rows): the rows are the 16 lanes of a vector. The
// activations, transposed once per task (a task per thread) into lane-major chunks
// xt[c][p][l] = x[16 c + l, p], are loaded one K column at a time; a panel of 16 weight rows x kPanelK columns
// is widened to fp32 once into an L1 buffer and each weight value is broadcast into an FMA with
// the column: 16 FMAs per column load, no widening or horizontal sum inside the loop (the register
// blocks widen each weight vector for every 6 activation rows and reduce 24 sums per block).
constexpr int kLanes = 16;
constexpr int64_t kPanelK = 256;  // 16 weight rows x 256 fp32 + 256 x 16 activations = 32 KB of L1

// r[i] = row i of a 16 x 16 block -> r[q] = column q (unpack pairs of rows, then shuffle
// groups of four, then 128-bit lanes).
SPARSEQ_AVX512 inline void transpose_16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {  // t[2i] lane L: a[4L], b[4L], a[4L+1], b[4L+1]; t[2i+1]: 4L+2, 4L+3
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m512 g[16];  // g[4i + j] lane L: column 4L + j of rows 4i .. 4i + 3
  for (int i = 0; i < 4; ++i) {
    g[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    g[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    g[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    g[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int j = 0; j < 4; ++j) {  // column 4L + j: lane L of g[j], g[4 + j], g[8 + j], g[12 + j]
    const __m512 ab_lo = _mm512_shuffle_f32x4(g[j], g[4 + j], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512 ab_hi = _mm512_shuffle_f32x4(g[j], g[4 + j], _MM_SHUFFLE(3, 2, 3, 2));
    const __m512 cd_lo = _mm512_shuffle_f32x4(g[8 + j], g[12 + j], _MM_SHUFFLE(1, 0, 1, 0));
    const __m512 cd_hi = _mm512_shuffle_f32x4(g[8 + j], g[12 + j], _MM_SHUFFLE(3, 2, 3, 2));
    r[j] = _mm512_shuffle_f32x4(ab_lo, cd_lo, _MM_SHUFFLE(2, 0, 2, 0));
    r[4 + j] = _mm512_shuffle_f32x4(ab_lo, cd_lo, _MM_SHUFFLE(3, 1, 3, 1));
    r[8 + j] = _mm512_shuffle_f32x4(ab_hi, cd_hi, _MM_SHUFFLE(2, 0, 2, 0));
    r[12 + j] = _mm512_shuffle_f32x4(ab_hi, cd_hi, _MM_SHUFFLE(3, 1, 3, 1));
  }
}

// A 64-byte aligned pointer into buf (which holds kLanes floats more than is used).
float* aligned_to_lanes(std::vector<float>& buf) {
  return buf.data() + (kLanes - reinterpret_cast<uintptr_t>(buf.data()) / sizeof(float) % kLanes) % kLanes;
}

// xt[c][p][l] = x[16 c + l, p] for m a multiple of 16, 16 x 16 blocks at a time.
SPARSEQ_AVX512 void transpose_to_lanes(const float* x, int64_t m, int64_t k, float* xt) {
  for (int64_t c = 0; c < m / kLanes; ++c) {
    for (int64_t p = 0; p < k; p += 16) {
      const int64_t width = std::min<int64_t>(16, k - p);
      const __mmask16 mask = static_cast<__mmask16>((1u << width) - 1u);
      __m512 r[16];
      for (int l = 0; l < 16; ++l) r[l] = _mm512_maskz_loadu_ps(mask, x + (c * kLanes + l) * k + p);
      transpose_16x16(r);
      float* out = xt + (c * k + p) * kLanes;
      for (int q = 0; q < width; ++q) _mm512_store_ps(out + q * kLanes, r[q]);
    }
  }
}

// Widens weight rows [0, 16) (stride k), columns [p0, p0 + width) to fp32: panel[j][q].
SPARSEQ_AVX512 inline void widen_panel(const int8_t* w, int64_t k, int64_t p0, int64_t width, float* panel) {
  for (int j = 0; j < 16; ++j) {
    const int8_t* src = w + j * k + p0;
    float* dst = panel + j * kPanelK;
    int64_t q = 0;
    for (; q + 16 <= width; q += 16) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + q));
      _mm512_storeu_ps(dst + q, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)));
    }
    for (; q < width; ++q) dst[q] = static_cast<float>(src[q]);
  }
}

// sums[c][j][l] = sum_p xt[c][p][l] * w[j, p] for 16 weight rows (stride k) and every lane chunk
// c: each panel is widened once and multiplied into all chunks (the chunk's 16 accumulators
// reloaded from sums between panels: 32 vector moves per 4096 FMAs).
SPARSEQ_AVX512 void lanes_block(const float* xt, int64_t chunks, const int8_t* w, int64_t k, float* panel,
                                float* sums) {
  for (int64_t p0 = 0; p0 < k; p0 += kPanelK) {
    const int64_t width = std::min<int64_t>(kPanelK, k - p0);
    widen_panel(w, k, p0, width, panel);
    for (int64_t c = 0; c < chunks; ++c) {
      float* out = sums + c * 16 * kLanes;
      __m512 acc[16];
      for (int j = 0; j < 16; ++j) acc[j] = p0 == 0 ? _mm512_setzero_ps() : _mm512_load_ps(out + j * kLanes);
      const float* col = xt + (c * k + p0) * kLanes;
      for (int64_t q = 0; q < width; ++q) {
        const __m512 xv = _mm512_load_ps(col + q * kLanes);
        for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(panel[j * kPanelK + q]), xv, acc[j]);
      }
      for (int j = 0; j < 16; ++j) _mm512_store_ps(out + j * kLanes, acc[j]);
    }
  }
}

// Output rows [0, m) x columns [n0, n1) of y (row stride n), m a multiple of 16 (rows [m,
// m_all) go through the register blocks): whole blocks of 16 weight rows
// through the lane kernel, the epilogue applied per weight row to the lane-major sums (one
// vector each: acc * scale, then + bias) and the rows gathered out of them; a smaller last block
// through the register blocks. xt is 64-byte aligned.
template <typename T>
SPARSEQ_AVX512 void rows_lanes(const float* x, const float* xt, const int8_t* w, int64_t m, int64_t m_all, int64_t k,
                               int64_t n0, int64_t n1, const float* scale, const float* bias, T* y, int64_t n) {
  const int64_t chunks = m / kLanes;
  alignas(64) float panel[16 * kPanelK];
  std::vector<float> store(static_cast<size_t>(chunks * 16 * kLanes + kLanes));
  float* sums = aligned_to_lanes(store);
  const __m512i across = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(kLanes));
  int64_t c0 = n0;
  for (; c0 + 16 <= n1; c0 += 16) {
    lanes_block(xt, chunks, w + c0 * k, k, panel, sums);
    for (int64_t c = 0; c < chunks; ++c) {
      float* block = sums + c * 16 * kLanes;
      for (int j = 0; j < 16; ++j) {
        __m512 v = _mm512_mul_ps(_mm512_load_ps(block + j * kLanes), _mm512_set1_ps(scale[c0 + j]));
        if (bias) v = _mm512_add_ps(v, _mm512_set1_ps(bias[c0 + j]));
        _mm512_store_ps(block + j * kLanes, v);
      }
      for (int64_t l = 0; l < kLanes; ++l) {
        const __m512 row = _mm512_i32gather_ps(across, block + l, 4);
        T* out = y + (c * kLanes + l) * n + c0;
        if constexpr (std::is_same_v<T, float>) {
          _mm512_storeu_ps(out, row);
        } else {
          alignas(64) float vals[16];
          _mm512_store_ps(vals, row);
          for (int j = 0; j < 16; ++j) out[j] = T(vals[j]);
        }
      }
    }
  }
  if (c0 < n1) rows_out<T>(x, w, 0, m, k, c0, n1, scale, bias, y, n);
  if (m < m_all) rows_out<T>(x, w, m, m_all, k, n0, n1, scale, bias, y, n);
}

// x's first m rows (a multiple of 16) transposed into lane-major chunks (transpose_to_lanes), 64-byte aligned, in
// the calling thread's buffer, kept between calls up to 1 MiB (a fresh 100 KB allocation per
// call, M = 16 and K = 1536, cost ~6 us of page faults where malloc returned it to the OS);
// larger copies go to `once`, the caller's.
const float* lane_major(const float* x, int64_t m, int64_t k, std::vector<float>& once) {
  thread_local std::vector<float> kept;
  const size_t need = static_cast<size_t>(m * k + kLanes);
  std::vector<float>& buf = need <= (size_t{1} << 18) ? kept : once;
  if (buf.size() < need) buf.resize(need);
  float* xt = aligned_to_lanes(buf);
  transpose_to_lanes(x, m, k, xt);
  return xt;
}

#endif

// How many of m activation rows the lane kernel takes (0: none): whole chunks of 16; the rest
// (fewer than 16) go through the 6 x 4 register blocks, which beat a chunk with idle lanes
// (measured, fp32, 1 thread, M = 13 / 15: 384x1536 134 / 145 us vs 161 / 158 us, 2048x2048 951 /
// 1046 us vs 1104 / 1126 us; a tie on 1536x384).
int64_t lanes_rows(int64_t m) {
#if SPARSEQ_HAVE_AVX512_PATH
  if (!cpu_has_avx512()) return 0;
  return m / kLanes * kLanes;
#else
  (void)m;
  return 0;
#endif
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
#if SPARSEQ_HAVE_AVX512_PATH
  const int64_t lane_rows = lanes_rows(m);
  if (lane_rows > 0) {
    // Each task transposes the activations for itself (a task per thread): the lane-major copy
    // then stays in the cache of the core that reads it (one copy shared by two threads ran 1.3x
    // slower at M = 16, K = 1536 than the copy made per task).
    torch::stable::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      std::vector<float> once;
      const float* xt = lane_major(x32, lane_rows, k, once);
      rows_lanes<T>(x32, xt, w, lane_rows, m, k, b0 * kTaskRows, std::min(n, b1 * kTaskRows), scale, bias, yp, n);
    });
    return;
  }
#endif
  torch::stable::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    rows_out<T>(x32, w, 0, m, k, b0 * kTaskRows, std::min(n, b1 * kTaskRows), scale, bias, yp, n);
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
