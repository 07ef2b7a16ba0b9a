// Shared by the two torch binding files (never by kernel files): input checks that raise
// clear errors, M-bucket kernel choice, and the launch of a C-ABI kernel on torch's stream.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <optional>
#include <string>

#include "sparseq/launchers.h"

namespace sparseq {

// Compute capability and SM count of a device, queried once per device (no ATen/cuda headers:
// those pull in cuBLAS/cuSPARSE headers that a bare toolkit may lack).
struct DeviceInfo {
  int major;
  int minor;
  int sm_count;
};

inline DeviceInfo device_info(int device) {
  static std::array<std::atomic<int>, 64> packed{};  // major * 1e6 + minor * 1e4 + sm_count, 0 = unknown
  TORCH_CHECK(device >= 0 && device < 64, "sparseq: device index ", device, " out of range");
  int v = packed[device].load(std::memory_order_relaxed);
  if (v == 0) {
    int major = 0, minor = 0, sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    v = major * 1000000 + minor * 10000 + sms;
    packed[device].store(v, std::memory_order_relaxed);
  }
  return {v / 1000000, (v / 10000) % 100, v % 10000};
}

inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// One kernel instantiation: input/output dtypes, the largest M it is meant for (0 = any).
struct KernelEntry {
  at::ScalarType input;
  at::ScalarType output;
  int max_m;
  SparseqGemmLauncher launch;
};

inline at::ScalarType dtype_of(const char* tag) {
  std::string t(tag);
  if (t == "bf16") return at::kBFloat16;
  if (t == "fp16") return at::kHalf;
  return at::kChar;  // int8
}

// The kernel of the smallest M bucket that holds m (buckets in ascending order per dtype pair).
template <size_t N>
SparseqGemmLauncher pick_kernel(const KernelEntry (&table)[N], at::ScalarType in, at::ScalarType out, int64_t m,
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
  TORCH_CHECK(fallback != nullptr, "sparseq: no ", arch, " CUTLASS 2:4 kernel for ", in, " -> ", out);
  return fallback;
}

inline void check_cuda(const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but x is on ", ref.device(),
              "; all inputs must be on the same device");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (call .contiguous() first)");
}

inline void check_aligned16(const char* name, const at::Tensor& t) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
              " must be 16-byte aligned (a fresh tensor is; a slice may not be: call .clone())");
}

// x [M, K], values [N, K/2] and the prepared meta; returns (M, N, K).
inline std::tuple<int64_t, int64_t, int64_t> check_gemm_operands(const at::Tensor& x, const at::Tensor& values,
                                                                 const at::Tensor& meta) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [M, K], got shape ", x.sizes());
  TORCH_CHECK(values.dim() == 2, "values must be 2-D [N, K/2], got shape ", values.sizes());
  check_cuda("x", x, x);
  check_cuda("values", values, x);
  check_cuda("meta", meta, x);
  const int64_t m = x.size(0), k = x.size(1), n = values.size(0);
  TORCH_CHECK(values.size(1) * 2 == k, "x has K=", k, " but values expects K=", values.size(1) * 2);
  TORCH_CHECK(n > 0 && n % 64 == 0, "CUTLASS 2:4 kernels need N (weight rows) to be a positive multiple of 64, got ",
              n);
  TORCH_CHECK(k > 0 && k % 128 == 0, "CUTLASS 2:4 kernels need K to be a positive multiple of 128, got ", k);
  TORCH_CHECK(n < (int64_t(1) << 31) && m < (int64_t(1) << 31), "sizes must fit in int32");
  check_aligned16("x", x);
  check_aligned16("values", values);
  check_aligned16("meta", meta);
  return {m, n, k};
}

// Prepared metadata shape/dtype for arch 90 or 80 (sparseq/cutlass_layout.py).
inline void check_prepared_meta(const at::Tensor& meta, int64_t n, int64_t k, int bits, int arch) {
  std::vector<int64_t> shape;
  at::ScalarType dtype;
  if (arch == 90) {
    shape = {k / 128, n / 64, 1024};
    dtype = at::kByte;
  } else {
    dtype = bits == 16 ? at::kShort : at::kInt;
    shape = {bits == 16 ? k / 32 : k / 64, n, 2};
  }
  TORCH_CHECK(meta.scalar_type() == dtype && meta.sizes() == at::IntArrayRef(shape),
              "meta must be the sm", arch, " CUTLASS metadata layout of this weight (", dtype, " ", at::IntArrayRef(shape),
              "), got ", meta.scalar_type(), " ", meta.sizes(),
              ": convert the canonical meta once with sparseq.cuda_ops.prepare_sparse24_cutlass on this GPU");
}

// An optional fp32 vector [n] (bias, scales) on x's device, converted to fp32 contiguous.
inline std::optional<at::Tensor> as_fp32_vector(const char* name, const std::optional<at::Tensor>& t, int64_t n,
                                                const at::Tensor& x, bool allow_float_dtypes) {
  if (!t.has_value()) return std::nullopt;
  const at::Tensor& v = *t;
  TORCH_CHECK(v.is_cuda() && v.device() == x.device(), name, " must be on ", x.device(), ", got ", v.device());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n, name, " must have shape (", n, "), got ", v.sizes());
  if (allow_float_dtypes) {
    TORCH_CHECK(v.scalar_type() == at::kFloat || v.scalar_type() == at::kBFloat16 || v.scalar_type() == at::kHalf,
                name, " must be float32, bfloat16 or float16, got ", v.scalar_type());
  } else {
    TORCH_CHECK(v.scalar_type() == at::kFloat, name, " must be float32, got ", v.scalar_type());
  }
  return v.to(at::kFloat).contiguous();
}

// Runs a launcher on the current stream with a workspace from the caching allocator.
inline void launch_gemm(SparseqGemmLauncher fn, SparseqGemmArgs args, const at::Tensor& like) {
  size_t needed = 0;
  const char* err = fn(&args, &needed);
  TORCH_CHECK(err == nullptr, "sparseq CUTLASS kernel: ", err);
  at::Tensor workspace;
  if (needed > 0) {
    workspace = at::empty({static_cast<int64_t>(needed)}, like.options().dtype(at::kByte));
    args.workspace = workspace.data_ptr();
    args.workspace_bytes = needed;
  }
  err = fn(&args, nullptr);
  TORCH_CHECK(err == nullptr, "sparseq CUTLASS kernel: ", err);
}

inline SparseqGemmArgs make_args(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                 const at::Tensor& out, int64_t m, int64_t n, int64_t k) {
  SparseqGemmArgs a{};
  a.a_values = values.data_ptr();
  a.a_meta = meta.data_ptr();
  a.b = x.data_ptr();
  a.d = out.data_ptr();
  a.n = static_cast<int>(n);
  a.m = static_cast<int>(m);
  a.k = static_cast<int>(k);
  a.device_id = x.device().index();
  a.sm_count = device_info(a.device_id).sm_count;
  a.stream = current_stream(x);
  return a;
}

// The whole of sparse24_mm for one arch: checks, allocation, kernel choice, launch.
template <size_t N>
at::Tensor sparse24_mm(const KernelEntry (&table)[N], int arch, const at::Tensor& x, const at::Tensor& values,
                       const at::Tensor& meta, const std::optional<at::Tensor>& bias) {
  auto [m, n, k] = check_gemm_operands(x, values, meta);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "x must be bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), "values dtype ", values.scalar_type(), " must match x dtype ",
              x.scalar_type());
  check_prepared_meta(meta, n, k, 16, arch);
  c10::cuda::CUDAGuard guard(x.device());
  auto bias32 = as_fp32_vector("bias", bias, n, x, true);
  at::Tensor out = at::empty({m, n}, x.options());
  if (m == 0) return out;
  SparseqGemmArgs a = make_args(x, values, meta, out, m, n, k);
  a.bias = bias32 ? bias32->data_ptr<float>() : nullptr;
  launch_gemm(pick_kernel(table, x.scalar_type(), x.scalar_type(), m, arch == 90 ? "sm90a" : "sm80"), a, x);
  return out;
}

template <size_t N>
at::Tensor sparse24_int8_mm(const KernelEntry (&table)[N], int arch, const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& meta, const at::Tensor& w_scale,
                            const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& bias,
                            std::optional<at::ScalarType> out_dtype) {
  auto [m, n, k] = check_gemm_operands(x, values, meta);
  TORCH_CHECK(x.scalar_type() == at::kChar,
              "sparse24_int8_mm_cutlass is W8A8 only: x must be int8 (quantize it first), got ", x.scalar_type());
  TORCH_CHECK(values.scalar_type() == at::kChar, "values must be int8, got ", values.scalar_type());
  TORCH_CHECK(k * 127 * 128 < (int64_t(1) << 31), "K=", k, " is too large for an int32 accumulator");
  TORCH_CHECK(x_scale.has_value(), "x_scale is required (per token [M] or per tensor [1], float32)");
  const at::ScalarType out_t = out_dtype.value_or(at::kBFloat16);
  TORCH_CHECK(out_t == at::kBFloat16 || out_t == at::kHalf, "out_dtype must be bfloat16 or float16, got ", out_t);
  check_prepared_meta(meta, n, k, 8, arch);
  c10::cuda::CUDAGuard guard(x.device());
  auto w32 = as_fp32_vector("w_scale", w_scale, n, x, false);
  const at::Tensor& xs = *x_scale;
  TORCH_CHECK(xs.dim() == 1 && (xs.size(0) == m || xs.size(0) == 1), "x_scale must have shape (", m,
              ",) or (1,), got ", xs.sizes());
  auto x32 = as_fp32_vector("x_scale", xs.size(0) == m ? xs : xs.expand({m}), m, x, false);
  auto bias32 = as_fp32_vector("bias", bias, n, x, true);
  at::Tensor out = at::empty({m, n}, x.options().dtype(out_t));
  if (m == 0) return out;
  SparseqGemmArgs a = make_args(x, values, meta, out, m, n, k);
  a.row_scale = w32->data_ptr<float>();
  a.col_scale = x32->data_ptr<float>();
  a.bias = bias32 ? bias32->data_ptr<float>() : nullptr;
  launch_gemm(pick_kernel(table, at::kChar, out_t, m, arch == 90 ? "sm90a" : "sm80"), a, x);
  return out;
}

// Canonical meta [N, K/8] -> prepared layout, with a C-ABI converter.
using MetaConvert = const char* (*)(const uint8_t*, void*, int, int, int, cudaStream_t);

inline int element_bits(const at::Tensor& values) {
  auto t = values.scalar_type();
  TORCH_CHECK(t == at::kBFloat16 || t == at::kHalf || t == at::kChar,
              "CUTLASS 2:4 kernels take bfloat16, float16 or int8 values, got ", t);
  return t == at::kChar ? 8 : 16;
}

inline std::tuple<int64_t, int64_t, int> check_canonical(const at::Tensor& values, const at::Tensor& meta) {
  TORCH_CHECK(values.is_cuda(), "values must be a CUDA tensor, got device ", values.device());
  TORCH_CHECK(values.dim() == 2, "values must be 2-D [N, K/2], got shape ", values.sizes());
  check_cuda("meta", meta, values);
  const int64_t n = values.size(0), k = values.size(1) * 2;
  TORCH_CHECK(n > 0 && n % 64 == 0, "CUTLASS 2:4 kernels need N (weight rows) to be a positive multiple of 64, got ",
              n);
  TORCH_CHECK(k > 0 && k % 128 == 0, "CUTLASS 2:4 kernels need K to be a positive multiple of 128, got ", k);
  return {n, k, element_bits(values)};
}

}  // namespace sparseq
