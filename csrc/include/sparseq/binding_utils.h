// Shared by the two torch binding files (never by kernel files): input checks that raise
// clear errors, M-bucket kernel choice, and the launch of a C-ABI kernel on torch's stream.
//
// Written against PyTorch's stable C ABI only (torch/csrc/stable, torch/headeronly; target
// version set by TORCH_TARGET_VERSION in setup.py), so that one build loads under every torch
// from that version on: no ATen/c10 C++ symbols, tensors are torch::stable::Tensor handles.
#pragma once

#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>  // aoti_torch_get_current_cuda_stream (USE_CUDA)
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <array>
#include <atomic>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "sparseq/launchers.h"
#include "sparseq/tensor_text.h"  // Tensor, ScalarType, dtype_name, shape_of

namespace sparseq {

inline std::string device_of(const Tensor& t) {
  if (t.is_cuda()) return "cuda:" + std::to_string(t.get_device_index());
  return t.is_cpu() ? std::string("cpu") : std::string("a non-CUDA device");
}

inline void check_cuda_call(cudaError_t err, const char* what) {
  STD_TORCH_CHECK(err == cudaSuccess, "sparseq: ", what, " failed: ", cudaGetErrorString(err));
}

// Compute capability and SM count of a device, queried once per device.
struct DeviceInfo {
  int major;
  int minor;
  int sm_count;
};

inline DeviceInfo device_info(int device) {
  static std::array<std::atomic<int>, 64> packed{};  // major * 1e6 + minor * 1e4 + sm_count, 0 = unknown
  STD_TORCH_CHECK(device >= 0 && device < 64, "sparseq: device index ", device, " out of range");
  int v = packed[device].load(std::memory_order_relaxed);
  if (v == 0) {
    int major = 0, minor = 0, sms = 0;
    check_cuda_call(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "compute capability");
    check_cuda_call(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "compute capability");
    check_cuda_call(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "SM count");
    v = major * 1000000 + minor * 10000 + sms;
    packed[device].store(v, std::memory_order_relaxed);
  }
  return {v / 1000000, (v / 10000) % 100, v % 10000};
}

// torch's current CUDA stream on t's device (the C shim of libtorch_cuda).
inline cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream) == AOTI_TORCH_SUCCESS,
                  "sparseq: could not get the current CUDA stream of ", device_of(t));
  return static_cast<cudaStream_t>(stream);
}

inline torch::stable::accelerator::DeviceGuard device_guard(const Tensor& t) {
  return torch::stable::accelerator::DeviceGuard(t.get_device_index());
}

// One kernel instantiation: input/output dtypes, the largest M it is meant for (0 = any).
struct KernelEntry {
  ScalarType input;
  ScalarType output;
  int max_m;
  SparseqGemmLauncher launch;
};

inline ScalarType dtype_of(const char* tag) {
  std::string t(tag);
  if (t == "bf16") return ScalarType::BFloat16;
  if (t == "fp16") return ScalarType::Half;
  return ScalarType::Char;  // int8
}

// The kernel of the smallest M bucket that holds m (buckets in ascending order per dtype pair).
template <size_t N>
SparseqGemmLauncher pick_kernel(const KernelEntry (&table)[N], ScalarType in, ScalarType out, int64_t m,
                                const char* arch) {
  SparseqGemmLauncher fallback = nullptr;
  for (const auto& e : table) {
    if (e.input != in || e.output != out) continue;
    if (e.max_m == 0) {
      fallback = e.launch;
    } else if (m <= e.max_m) {
      return e.launch;
    }
  }
  STD_TORCH_CHECK(fallback != nullptr, "sparseq: no ", arch, " CUTLASS 2:4 kernel for ", dtype_name(in), " -> ",
                  dtype_name(out));
  return fallback;
}

inline void check_cuda(const char* name, const Tensor& t, const Tensor& ref) {
  STD_TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", device_of(t));
  STD_TORCH_CHECK(t.get_device_index() == ref.get_device_index(), name, " is on ", device_of(t), " but x is on ",
                  device_of(ref), "; all inputs must be on the same device");
  STD_TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (call .contiguous() first)");
}

inline void check_aligned16(const char* name, const Tensor& t) {
  STD_TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
                  " must be 16-byte aligned (a fresh tensor is; a slice may not be: call .clone())");
}

// x [M, K], values [N, K/2] and the prepared meta; returns (M, N, K).
inline std::tuple<int64_t, int64_t, int64_t> check_gemm_operands(const Tensor& x, const Tensor& values,
                                                                 const Tensor& meta) {
  STD_TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got device ", device_of(x));
  STD_TORCH_CHECK(x.dim() == 2, "x must be 2-D [M, K], got shape ", shape_of(x));
  STD_TORCH_CHECK(values.dim() == 2, "values must be 2-D [N, K/2], got shape ", shape_of(values));
  check_cuda("x", x, x);
  check_cuda("values", values, x);
  check_cuda("meta", meta, x);
  const int64_t m = x.size(0), k = x.size(1), n = values.size(0);
  STD_TORCH_CHECK(values.size(1) * 2 == k, "x has K=", k, " but values expects K=", values.size(1) * 2);
  STD_TORCH_CHECK(n > 0 && n % 64 == 0,
                  "CUTLASS 2:4 kernels need N (weight rows) to be a positive multiple of 64, got ", n);
  STD_TORCH_CHECK(k > 0 && k % 128 == 0, "CUTLASS 2:4 kernels need K to be a positive multiple of 128, got ", k);
  STD_TORCH_CHECK(n < (int64_t(1) << 31) && m < (int64_t(1) << 31), "sizes must fit in int32");
  check_aligned16("x", x);
  check_aligned16("values", values);
  check_aligned16("meta", meta);
  return {m, n, k};
}

// Prepared metadata shape/dtype for arch 90 or 80 (sparseq/cutlass_layout.py).
inline void check_prepared_meta(const Tensor& meta, int64_t n, int64_t k, int bits, int arch) {
  std::vector<int64_t> shape;
  ScalarType dtype;
  if (arch == 90) {
    shape = {k / 128, n / 64, 1024};
    dtype = ScalarType::Byte;
  } else {
    dtype = bits == 16 ? ScalarType::Short : ScalarType::Int;
    shape = {bits == 16 ? k / 32 : k / 64, n, 2};
  }
  bool same = meta.scalar_type() == dtype && meta.dim() == static_cast<int64_t>(shape.size());
  for (size_t i = 0; same && i < shape.size(); ++i) same = meta.size(static_cast<int64_t>(i)) == shape[i];
  STD_TORCH_CHECK(same, "meta must be the sm", arch, " CUTLASS metadata layout of this weight (", dtype_name(dtype),
                  " ", shape_of(shape), "), got ", dtype_name(meta.scalar_type()), " ", shape_of(meta),
                  ": convert the canonical meta once with sparseq.cuda_ops.prepare_sparse24_cutlass on this GPU");
}

// An optional fp32 vector [n] (bias, scales) on x's device, converted to fp32 contiguous.
inline std::optional<Tensor> as_fp32_vector(const char* name, const std::optional<Tensor>& t, int64_t n,
                                            const Tensor& x, bool allow_float_dtypes) {
  if (!t.has_value()) return std::nullopt;
  const Tensor& v = *t;
  STD_TORCH_CHECK(v.is_cuda() && v.get_device_index() == x.get_device_index(), name, " must be on ", device_of(x),
                  ", got ", device_of(v));
  STD_TORCH_CHECK(v.dim() == 1 && v.size(0) == n, name, " must have shape (", n, "), got ", shape_of(v));
  const ScalarType s = v.scalar_type();
  if (allow_float_dtypes) {
    STD_TORCH_CHECK(s == ScalarType::Float || s == ScalarType::BFloat16 || s == ScalarType::Half, name,
                    " must be float32, bfloat16 or float16, got ", dtype_name(s));
  } else {
    STD_TORCH_CHECK(s == ScalarType::Float, name, " must be float32, got ", dtype_name(s));
  }
  if (s == ScalarType::Float && v.is_contiguous()) return v;
  return torch::stable::contiguous(torch::stable::to(v, ScalarType::Float));
}

// A fresh tensor on x's device (torch's caching allocator).
inline Tensor empty_like_device(const Tensor& x, std::vector<int64_t> shape, ScalarType dtype) {
  return torch::stable::new_empty(x, torch::headeronly::IntHeaderOnlyArrayRef(shape.data(), shape.size()), dtype);
}

// Runs a launcher on the current stream with a workspace from the caching allocator.
inline void launch_gemm(SparseqGemmLauncher fn, SparseqGemmArgs args, const Tensor& like) {
  size_t needed = 0;
  const char* err = fn(&args, &needed);
  STD_TORCH_CHECK(err == nullptr, "sparseq CUTLASS kernel: ", err);
  std::optional<Tensor> workspace;
  if (needed > 0) {
    workspace = empty_like_device(like, {static_cast<int64_t>(needed)}, ScalarType::Byte);
    args.workspace = workspace->data_ptr();
    args.workspace_bytes = needed;
  }
  err = fn(&args, nullptr);
  STD_TORCH_CHECK(err == nullptr, "sparseq CUTLASS kernel: ", err);
}

inline SparseqGemmArgs make_args(const Tensor& x, const Tensor& values, const Tensor& meta, const Tensor& out,
                                 int64_t m, int64_t n, int64_t k) {
  SparseqGemmArgs a{};
  a.a_values = values.data_ptr();
  a.a_meta = meta.data_ptr();
  a.b = x.data_ptr();
  a.d = out.data_ptr();
  a.n = static_cast<int>(n);
  a.m = static_cast<int>(m);
  a.k = static_cast<int>(k);
  a.device_id = x.get_device_index();
  a.sm_count = device_info(a.device_id).sm_count;
  a.stream = current_stream(x);
  return a;
}

// Every check of sparse24_mm for one arch; returns (M, N, K). Run before routing to another
// extension too, so that bad input is reported here, in full.
inline std::tuple<int64_t, int64_t, int64_t> check_sparse24_mm(int arch, const Tensor& x, const Tensor& values,
                                                               const Tensor& meta) {
  auto [m, n, k] = check_gemm_operands(x, values, meta);
  const ScalarType t = x.scalar_type();
  STD_TORCH_CHECK(t == ScalarType::BFloat16 || t == ScalarType::Half, "x must be bfloat16 or float16, got ",
                  dtype_name(t));
  STD_TORCH_CHECK(values.scalar_type() == t, "values dtype ", dtype_name(values.scalar_type()),
                  " must match x dtype ", dtype_name(t));
  check_prepared_meta(meta, n, k, 16, arch);
  return {m, n, k};
}

// The whole of sparse24_mm for one arch: checks, allocation, kernel choice, launch.
template <size_t N>
Tensor sparse24_mm(const KernelEntry (&table)[N], int arch, const Tensor& x, const Tensor& values,
                   const Tensor& meta, const std::optional<Tensor>& bias) {
  auto [m, n, k] = check_sparse24_mm(arch, x, values, meta);
  auto guard = device_guard(x);
  auto bias32 = as_fp32_vector("bias", bias, n, x, true);
  Tensor out = empty_like_device(x, {m, n}, x.scalar_type());
  if (m == 0) return out;
  SparseqGemmArgs a = make_args(x, values, meta, out, m, n, k);
  a.bias = bias32 ? static_cast<const float*>(bias32->data_ptr()) : nullptr;
  launch_gemm(pick_kernel(table, x.scalar_type(), x.scalar_type(), m, arch == 90 ? "sm90a" : "sm80"), a, x);
  return out;
}

// Every check of sparse24_int8_mm for one arch; returns (M, N, K) and the output dtype.
inline std::tuple<int64_t, int64_t, int64_t, ScalarType> check_sparse24_int8_mm(
    int arch, const Tensor& x, const Tensor& values, const Tensor& meta, const std::optional<Tensor>& x_scale,
    std::optional<ScalarType> out_dtype) {
  auto [m, n, k] = check_gemm_operands(x, values, meta);
  STD_TORCH_CHECK(x.scalar_type() == ScalarType::Char,
                  "sparse24_int8_mm_cutlass is W8A8 only: x must be int8 (quantize it first), got ",
                  dtype_name(x.scalar_type()));
  STD_TORCH_CHECK(values.scalar_type() == ScalarType::Char, "values must be int8, got ",
                  dtype_name(values.scalar_type()));
  STD_TORCH_CHECK(k * 127 * 128 < (int64_t(1) << 31), "K=", k, " is too large for an int32 accumulator");
  STD_TORCH_CHECK(x_scale.has_value(), "x_scale is required (per token [M] or per tensor [1], float32)");
  const ScalarType out_t = out_dtype.value_or(ScalarType::BFloat16);
  STD_TORCH_CHECK(out_t == ScalarType::BFloat16 || out_t == ScalarType::Half,
                  "out_dtype must be bfloat16 or float16, got ", dtype_name(out_t));
  check_prepared_meta(meta, n, k, 8, arch);
  const Tensor& xs = *x_scale;
  STD_TORCH_CHECK(xs.dim() == 1 && (xs.size(0) == m || xs.size(0) == 1), "x_scale must have shape (", m,
                  ",) or (1,), got ", shape_of(xs));
  return {m, n, k, out_t};
}

template <size_t N>
Tensor sparse24_int8_mm(const KernelEntry (&table)[N], int arch, const Tensor& x, const Tensor& values,
                        const Tensor& meta, const Tensor& w_scale, const std::optional<Tensor>& x_scale,
                        const std::optional<Tensor>& bias, std::optional<ScalarType> out_dtype) {
  auto [m, n, k, out_t] = check_sparse24_int8_mm(arch, x, values, meta, x_scale, out_dtype);
  auto guard = device_guard(x);
  auto w32 = as_fp32_vector("w_scale", w_scale, n, x, false);
  const Tensor& xs = *x_scale;
  std::optional<Tensor> x32;
  if (xs.size(0) == m) {
    x32 = as_fp32_vector("x_scale", xs, m, x, false);
  } else {  // per tensor: broadcast to one scale per token (copy_ broadcasts, no host sync)
    auto one = as_fp32_vector("x_scale", xs, 1, x, false);
    x32 = empty_like_device(x, {m}, ScalarType::Float);
    torch::stable::copy_(*x32, *one);
  }
  auto bias32 = as_fp32_vector("bias", bias, n, x, true);
  Tensor out = empty_like_device(x, {m, n}, out_t);
  if (m == 0) return out;
  SparseqGemmArgs a = make_args(x, values, meta, out, m, n, k);
  a.row_scale = static_cast<const float*>(w32->data_ptr());
  a.col_scale = static_cast<const float*>(x32->data_ptr());
  a.bias = bias32 ? static_cast<const float*>(bias32->data_ptr()) : nullptr;
  launch_gemm(pick_kernel(table, ScalarType::Char, out_t, m, arch == 90 ? "sm90a" : "sm80"), a, x);
  return out;
}

inline int element_bits(const Tensor& values) {
  auto t = values.scalar_type();
  STD_TORCH_CHECK(t == ScalarType::BFloat16 || t == ScalarType::Half || t == ScalarType::Char,
                  "CUTLASS 2:4 kernels take bfloat16, float16 or int8 values, got ", dtype_name(t));
  return t == ScalarType::Char ? 8 : 16;
}

inline std::tuple<int64_t, int64_t, int> check_canonical(const Tensor& values, const Tensor& meta) {
  STD_TORCH_CHECK(values.is_cuda(), "values must be a CUDA tensor, got device ", device_of(values));
  STD_TORCH_CHECK(values.dim() == 2, "values must be 2-D [N, K/2], got shape ", shape_of(values));
  check_cuda("meta", meta, values);
  const int64_t n = values.size(0), k = values.size(1) * 2;
  STD_TORCH_CHECK(n > 0 && n % 64 == 0,
                  "CUTLASS 2:4 kernels need N (weight rows) to be a positive multiple of 64, got ", n);
  STD_TORCH_CHECK(k > 0 && k % 128 == 0, "CUTLASS 2:4 kernels need K to be a positive multiple of 128, got ", k);
  return {n, k, element_bits(values)};
}

// Canonical uint8 meta [N, K/8] of this weight, checked.
inline void check_canonical_meta(const Tensor& meta, int64_t n, int64_t k) {
  STD_TORCH_CHECK(meta.scalar_type() == ScalarType::Byte && meta.dim() == 2 && meta.size(0) == n &&
                      meta.size(1) == k / 8,
                  "meta must be the canonical uint8 [", n, ", ", k / 8, "], got ", dtype_name(meta.scalar_type()),
                  " ", shape_of(meta));
}

}  // namespace sparseq
