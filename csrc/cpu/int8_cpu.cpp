// sparseq._C_cpu: the CPU halves of the W8A8 format around PyTorch's int8 GEMMs (oneDNN,
// torch._int_mm), each one pass over its tensor instead of the 6-9 torch ops that compute them:
//   quantize_int8_cpu     per-token (or static) int8 quantization of the activations (or
//                         int8 + 128 as uint8: oneDNN's activations on CPUs without AMX)
//   quantize_grid_cpu     the same integers as fp32, with range columns for fbgemm's per-tensor
//                         quantizer to take them exactly (sparseq/cpu_fbgemm.py)
//   w8a8_epilogue_cpu     fp32(acc) * x_scale[m] * w_scale[n] + bias[n]
//   normalize_rows_cpu    rows divided by their max |x| (NaN/Inf zeroed): the input of fbgemm's
//                         approximate linear_dynamic form (per-token semantics, per-tensor kernel)
// The quantizers and the epilogue equal the reference arithmetic (sparseq/reference.py) bit for
// bit: the same fp32 operations in the same order, no contraction into FMAs (-ffp-contract=off),
// round half to even, NaN -> 0 in the int8 cast as torch does on x86. Schemas live in sparseq/cpu_kernels.py.
//
// PyTorch's stable C ABI only (torch/csrc/stable, torch/headeronly): one build loads under every
// torch from TORCH_TARGET_VERSION on, CPU or CUDA builds alike.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include "cpu_common.h"

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using namespace sparseq;  // Tensor, ScalarType, shape_of, ... (cpu_common.h)

constexpr float kInt8Max = 127.0f;
// Adding and subtracting 1.5 * 2^23 rounds a float of magnitude < 2^22 to an integer, half to
// even (the default rounding mode), in two vectorizable adds instead of a libm call per element.
constexpr float kRoundMagic = 12582912.0f;
// Rows per parallel task: about 32K elements each, so small calls run inline on the caller.
constexpr int64_t kGrainElements = 1 << 15;
// quantize_grid_cpu's columns after a row's K: -128 and 127, fbgemm's quantizer range.
constexpr int64_t kRangeColumns = 2;

void check_vector(const std::optional<Tensor>& t, const char* name, int64_t n) {
  if (!t.has_value()) return;
  check_cpu_contiguous(*t, name);
  STD_TORCH_CHECK(t->scalar_type() == ScalarType::Float, "sparseq CPU op: ", name, " must be float32, got ",
                  dtype_name(t->scalar_type()));
  STD_TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "sparseq CPU op: ", name, " must have shape [", n, "], got ",
                  shape_of(*t));
}

int64_t grain_rows(int64_t cols) { return cols > 0 ? std::max<int64_t>(1, kGrainElements / cols) : kGrainElements; }

// The two float passes over a row, compiled for AVX-512, AVX2 and baseline x86-64 (the loader
// picks one per CPU); plain loops the compiler vectorizes (-fopenmp-simd, no OpenMP runtime).
#if defined(__x86_64__) && defined(__GNUC__)
#define SPARSEQ_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SPARSEQ_CLONES
#endif

// max |xs| over a row, NaN where the row holds one (as torch's amax).
SPARSEQ_CLONES float row_absmax(const float* xs, int64_t k) {
  float amax = 0.0f;
  int nan = 0;
#pragma omp simd reduction(max : amax) reduction(| : nan)
  for (int64_t j = 0; j < k; ++j) {
    const float v = std::fabs(xs[j]);
    amax = v > amax ? v : amax;
    nan |= v != v;
  }
  return nan ? std::nanf("") : amax;
}

// clamp(round(xs / divisor), -127, 127) as int8, round half to even; NaN -> 0 (torch's float
// -> int8 cast on x86). Clamped before rounding: the same integers, and the sum below is exact.
// Two loops (float grid into tmp, then the cast) vectorize at full width; one mixed loop did not.
SPARSEQ_CLONES void row_to_grid_div(const float* xs, int64_t k, float divisor, float* tmp) {
#pragma omp simd
  for (int64_t j = 0; j < k; ++j) {
    float v = xs[j] / divisor;
    v = v != v ? 0.0f : v;
    v = v > -kInt8Max ? v : -kInt8Max;
    v = v < kInt8Max ? v : kInt8Max;
    tmp[j] = (v + kRoundMagic) - kRoundMagic;
  }
}

// The integers of tmp as int8, or offset by 128 as uint8 (oneDNN's u8 activations: the same
// byte with its sign bit flipped).
SPARSEQ_CLONES void grid_to_int8(const float* tmp, int64_t k, bool offset, int8_t* q) {
  if (offset) {
    uint8_t* u = reinterpret_cast<uint8_t*>(q);
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) u[j] = static_cast<uint8_t>(static_cast<int32_t>(tmp[j]) + 128);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < k; ++j) q[j] = static_cast<int8_t>(static_cast<int32_t>(tmp[j]));
  }
}

// One row of clamp(round(xs / divisor)) as int8 (offset: uint8). A multiply by 1 / divisor with
// a division only for elements near a half-integer (where the two can round apart) measured
// slower on a Zen 4 EPYC (1536 x 128: 81 vs 67 us): the pass is not bound by the division.
void row_to_int8(const float* xs, int64_t k, float divisor, bool offset, float* tmp, int8_t* q) {
  row_to_grid_div(xs, k, divisor, tmp);
  grid_to_int8(tmp, k, offset, q);
}

// xs = x / smooth (fp32), the reference's SmoothQuant division.
SPARSEQ_CLONES void row_divide(const float* x, const float* smooth, int64_t k, float* out) {
#pragma omp simd
  for (int64_t j = 0; j < k; ++j) out[j] = x[j] / smooth[j];
}

// xs = x / smooth in fp32, one row: x itself where it already is that (fp32, no smooth), else
// written into buf (k floats).
template <typename T>
const float* smoothed_row(const T* x, const float* smooth, int64_t k, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    if (!smooth) return x;
    row_divide(x, smooth, k, buf);
  } else {
    for (int64_t j = 0; j < k; ++j) buf[j] = smooth ? as_float(x[j]) / smooth[j] : as_float(x[j]);
  }
  return buf;
}

// A row's scale from its amax: amax / 127 (1 where it is 0, NaN stays NaN), or the static scale
// with NaN where the row holds NaN or Inf (the reference's activation_grid).
inline float row_scale(float amax, const float* static_scale) {
  if (static_scale) return *static_scale + amax * 0.0f;
  return amax == 0.0f ? 1.0f : amax / kInt8Max;
}

// One row: xs = x / smooth in fp32 (into buf unless x already is that), amax, scale, xq.
template <typename T>
void quantize_row(const T* x, const float* smooth, int64_t k, const float* static_scale, bool offset, float* buf,
                  float* tmp, int8_t* q, float* scale_out) {
  const float* xs = smoothed_row(x, smooth, k, buf);
  const float scale = row_scale(row_absmax(xs, k), static_scale);
  row_to_int8(xs, k, static_scale ? *static_scale : scale, offset, tmp, q);
  *scale_out = scale;
}

template <typename T>
void quantize_rows(const Tensor& x, const float* smooth, const float* static_scale, bool offset, Tensor& q,
                   Tensor& scale) {
  const int64_t m = x.size(0), k = x.size(1);
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  int8_t* qp = static_cast<int8_t*>(q.mutable_data_ptr());  // int8, or uint8 bytes where offset
  float* sp = static_cast<float*>(scale.mutable_data_ptr());
  torch::stable::parallel_for(0, m, grain_rows(k), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same_v<T, float> && !smooth ? 0 : k), tmp(k);
    for (int64_t i = begin; i < end; ++i) {
      quantize_row(xp + i * k, smooth, k, static_scale, offset, buf.data(), tmp.data(), qp + i * k, sp + i);
    }
  });
}

// (xq int8 [M, K], scale fp32 [M]) of x [M, K] (fp32, bf16 or fp16): the reference's
// activation_grid as int8 (offset: xq + 128 as uint8, what oneDNN takes without AMX). smooth:
// fp32 [K] or None; x_scale: fp32 [1] (static) or None.
std::tuple<Tensor, Tensor> quantize_int8_cpu(Tensor x, std::optional<Tensor> smooth, std::optional<Tensor> x_scale,
                                             bool offset) {
  check_cpu_contiguous(x, "x");
  STD_TORCH_CHECK(x.dim() == 2, "sparseq quantize_int8_cpu: x must be 2-D [M, K], got ", shape_of(x));
  const int64_t m = x.size(0), k = x.size(1);
  check_vector(smooth, "smooth", k);
  check_vector(x_scale, "x_scale", 1);
  Tensor q = torch::stable::new_empty(x, {m, k}, offset ? ScalarType::Byte : ScalarType::Char);
  Tensor scale = torch::stable::new_empty(x, {m}, ScalarType::Float);
  const float* sm = smooth.has_value() ? static_cast<const float*>(smooth->const_data_ptr()) : nullptr;
  const float* st = x_scale.has_value() ? static_cast<const float*>(x_scale->const_data_ptr()) : nullptr;
  switch (x.scalar_type()) {
    case ScalarType::Float: quantize_rows<float>(x, sm, st, offset, q, scale); break;
    case ScalarType::BFloat16: quantize_rows<c10::BFloat16>(x, sm, st, offset, q, scale); break;
    case ScalarType::Half: quantize_rows<c10::Half>(x, sm, st, offset, q, scale); break;
    default:
      STD_TORCH_CHECK(false, "sparseq quantize_int8_cpu: x must be float32, bfloat16 or float16, got ",
                      dtype_name(x.scalar_type()));
  }
  return {q, scale};
}

template <typename T>
void grid_rows(const Tensor& x, const float* smooth, const float* static_scale, Tensor& grid, Tensor& scale) {
  const int64_t m = x.size(0), k = x.size(1), ld = k + kRangeColumns;
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  float* gp = static_cast<float*>(grid.mutable_data_ptr());
  float* sp = static_cast<float*>(scale.mutable_data_ptr());
  torch::stable::parallel_for(0, m, grain_rows(k), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* out = gp + i * ld;  // x / smooth first (in out unless x is that), then its grid into out
      const float* xs = smoothed_row(xp + i * k, smooth, k, out);
      sp[i] = row_scale(row_absmax(xs, k), static_scale);
      row_to_grid_div(xs, k, static_scale ? *static_scale : sp[i], out);
      out[k] = -128.0f;
      out[k + 1] = kInt8Max;
    }
  });
}

// (grid fp32 [M, K + 2], scale fp32 [M]) of x [M, K] (fp32, bf16 or fp16): each row the
// reference's activation_grid (the integers of xq as floats, NaN -> 0 as in the int8 cast), then
// two range columns holding -128 and 127. A per-tensor asymmetric uint8 quantizer over
// [min, max] (fbgemm's dynamic one) then picks scale 1 and zero point 128 and reproduces
// xq + 128 exactly; the weight's two matching columns are zero (sparseq/cpu_fbgemm.py).
std::tuple<Tensor, Tensor> quantize_grid_cpu(Tensor x, std::optional<Tensor> smooth, std::optional<Tensor> x_scale) {
  check_cpu_contiguous(x, "x");
  STD_TORCH_CHECK(x.dim() == 2, "sparseq quantize_grid_cpu: x must be 2-D [M, K], got ", shape_of(x));
  const int64_t m = x.size(0), k = x.size(1);
  check_vector(smooth, "smooth", k);
  check_vector(x_scale, "x_scale", 1);
  Tensor grid = torch::stable::new_empty(x, {m, k + kRangeColumns}, ScalarType::Float);
  Tensor scale = torch::stable::new_empty(x, {m}, ScalarType::Float);
  const float* sm = smooth.has_value() ? static_cast<const float*>(smooth->const_data_ptr()) : nullptr;
  const float* st = x_scale.has_value() ? static_cast<const float*>(x_scale->const_data_ptr()) : nullptr;
  switch (x.scalar_type()) {
    case ScalarType::Float: grid_rows<float>(x, sm, st, grid, scale); break;
    case ScalarType::BFloat16: grid_rows<c10::BFloat16>(x, sm, st, grid, scale); break;
    case ScalarType::Half: grid_rows<c10::Half>(x, sm, st, grid, scale); break;
    default:
      STD_TORCH_CHECK(false, "sparseq quantize_grid_cpu: x must be float32, bfloat16 or float16, got ",
                      dtype_name(x.scalar_type()));
  }
  return {grid, scale};
}

// out = (fp32(acc) * s) * w_scale + bias, one row, in the reference's order (no FMA).
template <typename A>
inline void epilogue_row(const A* acc, float s, const float* ws, const float* bias, float* out, int64_t n) {
  if (bias) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = (static_cast<float>(acc[j]) * s) * ws[j] + bias[j];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = (static_cast<float>(acc[j]) * s) * ws[j];
  }
}

SPARSEQ_CLONES void epilogue_row_f32(const float* acc, float s, const float* ws, const float* bias, float* out,
                                     int64_t n) {
  epilogue_row(acc, s, ws, bias, out, n);
}

SPARSEQ_CLONES void epilogue_row_i32(const int32_t* acc, float s, const float* ws, const float* bias, float* out,
                                     int64_t n) {
  epilogue_row(acc, s, ws, bias, out, n);
}

template <typename A>
void epilogue_rows(const A* acc, const float* xs, const float* ws, const float* bias, float* y, int64_t m,
                   int64_t n) {
  torch::stable::parallel_for(0, m, grain_rows(n), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if constexpr (std::is_same_v<A, float>) {
        epilogue_row_f32(acc + i * n, xs[i], ws, bias, y + i * n, n);
      } else {
        epilogue_row_i32(acc + i * n, xs[i], ws, bias, y + i * n, n);
      }
    }
  });
}

// fp32 [M, N] = fp32(acc) * x_scale[m] * w_scale[n] (+ bias[n]), in the reference's order. An
// fp32 acc is overwritten and returned; an int32 acc gives a new tensor.
Tensor w8a8_epilogue_cpu(Tensor acc, Tensor x_scale, Tensor w_scale, std::optional<Tensor> bias) {
  check_cpu_contiguous(acc, "acc");
  STD_TORCH_CHECK(acc.dim() == 2, "sparseq w8a8_epilogue_cpu: acc must be 2-D [M, N], got ", shape_of(acc));
  const int64_t m = acc.size(0), n = acc.size(1);
  check_vector(x_scale, "x_scale", m);
  check_vector(w_scale, "w_scale", n);
  check_vector(bias, "bias", n);
  const float* xs = static_cast<const float*>(x_scale.const_data_ptr());
  const float* ws = static_cast<const float*>(w_scale.const_data_ptr());
  const float* b = bias.has_value() ? static_cast<const float*>(bias->const_data_ptr()) : nullptr;
  if (acc.scalar_type() == ScalarType::Float) {
    float* p = static_cast<float*>(acc.mutable_data_ptr());
    epilogue_rows<float>(p, xs, ws, b, p, m, n);
    return acc;
  }
  STD_TORCH_CHECK(acc.scalar_type() == ScalarType::Int, "sparseq w8a8_epilogue_cpu: acc must be float32 or int32, got ",
                  dtype_name(acc.scalar_type()));
  Tensor y = torch::stable::new_empty(acc, {m, n}, ScalarType::Float);
  epilogue_rows<int32_t>(static_cast<const int32_t*>(acc.const_data_ptr()), xs, ws, b,
                         static_cast<float*>(y.mutable_data_ptr()), m, n);
  return y;
}

// u = (x / smooth) * (1 / amax) with NaN and +-Inf -> 0, one row: fbgemm's input on the "fast" CPU
// path (sparseq/cpu_fbgemm.py), every row in [-1, 1] (within an ulp). v - v is 0 only for finite v.
// A multiply, not a division per element: vdivps took ~4 us of a 16 x 1536 batch on a Xeon.
SPARSEQ_CLONES void row_normalize(const float* xs, int64_t k, float amax, float* u) {
  const float inv = 1.0f / amax;  // 0 -> inf, inf -> 0, NaN -> NaN: such rows come out all zero
#pragma omp simd
  for (int64_t j = 0; j < k; ++j) {
    const float v = xs[j] * inv;
    u[j] = v - v == 0.0f ? v : 0.0f;
  }
}

template <typename T>
void normalize_rows(const Tensor& x, const float* smooth, Tensor& u, Tensor& amax) {
  const int64_t m = x.size(0), k = x.size(1);
  const T* xp = static_cast<const T*>(x.const_data_ptr());
  float* up = static_cast<float*>(u.mutable_data_ptr());
  float* ap = static_cast<float*>(amax.mutable_data_ptr());
  torch::stable::parallel_for(0, m, grain_rows(k), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* out = up + i * k;  // x / smooth first (in u unless x is that), then normalised into u
      const float* xs = smoothed_row(xp + i * k, smooth, k, out);
      ap[i] = row_absmax(xs, k);
      row_normalize(xs, k, ap[i], out);
    }
  });
}

// (u fp32 [M, K], amax fp32 [M]) of x [M, K] (fp32, bf16 or fp16): amax = max |x / smooth| per
// row (NaN where the row holds one), u = (x / smooth) * (1 / amax) with NaN and +-Inf zeroed — what
// sparseq/cpu_fbgemm.py computes in torch ops before fbgemm's GEMM where this extension is absent.
std::tuple<Tensor, Tensor> normalize_rows_cpu(Tensor x, std::optional<Tensor> smooth) {
  check_cpu_contiguous(x, "x");
  STD_TORCH_CHECK(x.dim() == 2, "sparseq normalize_rows_cpu: x must be 2-D [M, K], got ", shape_of(x));
  const int64_t m = x.size(0), k = x.size(1);
  check_vector(smooth, "smooth", k);
  Tensor u = torch::stable::new_empty(x, {m, k}, ScalarType::Float);
  Tensor amax = torch::stable::new_empty(x, {m}, ScalarType::Float);
  const float* sm = smooth.has_value() ? static_cast<const float*>(smooth->const_data_ptr()) : nullptr;
  switch (x.scalar_type()) {
    case ScalarType::Float: normalize_rows<float>(x, sm, u, amax); break;
    case ScalarType::BFloat16: normalize_rows<c10::BFloat16>(x, sm, u, amax); break;
    case ScalarType::Half: normalize_rows<c10::Half>(x, sm, u, amax); break;
    default:
      STD_TORCH_CHECK(false, "sparseq normalize_rows_cpu: x must be float32, bfloat16 or float16, got ",
                      dtype_name(x.scalar_type()));
  }
  return {u, amax};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(sparseq, CPU, m) {
  m.impl("quantize_int8_cpu", TORCH_BOX(&quantize_int8_cpu));
  m.impl("quantize_grid_cpu", TORCH_BOX(&quantize_grid_cpu));
  m.impl("w8a8_epilogue_cpu", TORCH_BOX(&w8a8_epilogue_cpu));
  m.impl("normalize_rows_cpu", TORCH_BOX(&normalize_rows_cpu));
}

// A Python module (limited API, any CPython >= 3.10) so that `import sparseq._C_cpu` works;
// importing it registers the kernels.
#include <Python.h>
static struct PyModuleDef sparseq_c_cpu_module = {PyModuleDef_HEAD_INIT, "_C_cpu", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C_cpu(void) { return PyModule_Create(&sparseq_c_cpu_module); }
