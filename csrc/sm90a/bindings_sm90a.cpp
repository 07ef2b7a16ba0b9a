// torch bindings of sparseq._C_sm90a: the Hopper (wgmma.sp) 2:4 GEMMs and the sm90 metadata
// converters. Schemas live in sparseq/cuda_ops.py; the public sparseq::sparse24_mm_cutlass and
// sparse24_int8_mm_cutlass (registered by sparseq._C) route here on sm90 GPUs.
#include <torch/library.h>

#include "sparseq/binding_utils.h"
#include "sparseq/sm90_kernels.h"

namespace {

using sparseq::KernelEntry;

const KernelEntry kSm90Kernels[] = {
#define SPARSEQ_ENTRY(name, in, out, bucket) \
  {sparseq::dtype_of(#in), sparseq::dtype_of(#out), bucket, &sparseq_sm90_##name},
    SPARSEQ_SM90_KERNELS(SPARSEQ_ENTRY)
#undef SPARSEQ_ENTRY
};

void check_sm90(const at::Tensor& x) {
  auto props = sparseq::device_info(x.device().index());
  TORCH_CHECK(props.major == 9 && props.minor == 0, "sparseq sm90a kernels need an sm90 (Hopper) GPU, got sm",
              props.major, props.minor);
}

at::Tensor mm_sm90a(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                    const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got device ", x.device());
  check_sm90(x);
  return sparseq::sparse24_mm(kSm90Kernels, 90, x, values, meta, bias);
}

at::Tensor int8_mm_sm90a(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                         const at::Tensor& w_scale, const std::optional<at::Tensor>& x_scale,
                         const std::optional<at::Tensor>& bias, std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got device ", x.device());
  check_sm90(x);
  return sparseq::sparse24_int8_mm(kSm90Kernels, 90, x, values, meta, w_scale, x_scale, bias, out_dtype);
}

at::Tensor meta_to_cutlass_sm90(const at::Tensor& values, const at::Tensor& meta) {
  auto [n, k, bits] = sparseq::check_canonical(values, meta);
  TORCH_CHECK(meta.scalar_type() == at::kByte && meta.dim() == 2 && meta.size(0) == n && meta.size(1) == k / 8,
              "meta must be the canonical uint8 [", n, ", ", k / 8, "], got ", meta.scalar_type(), " ", meta.sizes());
  c10::cuda::CUDAGuard guard(values.device());
  at::Tensor out = at::empty({k / 128, n / 64, 1024}, meta.options());
  const char* err = sparseq_meta_to_cutlass_sm90(meta.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), int(n), int(k),
                                                 bits, sparseq::current_stream(values));
  TORCH_CHECK(err == nullptr, "sparseq: ", err);
  return out;
}

at::Tensor meta_from_cutlass_sm90(const at::Tensor& values, const at::Tensor& meta_cutlass) {
  auto [n, k, bits] = sparseq::check_canonical(values, meta_cutlass);
  sparseq::check_prepared_meta(meta_cutlass, n, k, bits, 90);
  c10::cuda::CUDAGuard guard(values.device());
  at::Tensor out = at::empty({n, k / 8}, meta_cutlass.options());
  const char* err = sparseq_meta_from_cutlass_sm90(meta_cutlass.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), int(n),
                                                   int(k), bits, sparseq::current_stream(values));
  TORCH_CHECK(err == nullptr, "sparseq: ", err);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseq, CUDA, m) {
  m.impl("_sparse24_mm_cutlass_sm90a", &mm_sm90a);
  m.impl("_sparse24_int8_mm_cutlass_sm90a", &int8_mm_sm90a);
  m.impl("sparse24_meta_to_cutlass_sm90", &meta_to_cutlass_sm90);
  m.impl("sparse24_meta_from_cutlass_sm90", &meta_from_cutlass_sm90);
}

// A Python module so that `import sparseq._C_sm90a` works; importing it registers the kernels.
#include <Python.h>
static struct PyModuleDef sparseq_sm90a_module = {PyModuleDef_HEAD_INIT, "_C_sm90a", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C_sm90a(void) { return PyModule_Create(&sparseq_sm90a_module); }
