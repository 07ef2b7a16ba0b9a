// torch bindings of sparseq._C, the core extension: registers the public CUTLASS 2:4 ops
// (schemas in sparseq/cuda_ops.py) and runs the Ampere (mma.sp) kernels; on sm90 GPUs the GEMMs
// route through the dispatcher to the sm90a kernels registered by sparseq._C_sm90a.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "sparseq/binding_utils.h"
#include "sparseq/sm80_kernels.h"

namespace {

using sparseq::KernelEntry;

const KernelEntry kSm80Kernels[] = {
#define SPARSEQ_ENTRY(name, in, out, bucket) \
  {sparseq::dtype_of(#in), sparseq::dtype_of(#out), bucket, &sparseq_sm80_##name},
    SPARSEQ_SM80_KERNELS(SPARSEQ_ENTRY)
#undef SPARSEQ_ENTRY
};

// 90 for sm90 (the sm90a kernels), 80 for sm80-sm89, an error otherwise.
int arch_of(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got device ", x.device());
  auto props = sparseq::device_info(x.device().index());
  if (props.major == 9 && props.minor == 0) return 90;
  TORCH_CHECK(props.major == 8, "sparseq's CUTLASS 2:4 kernels run on sm80-sm89 and sm90 GPUs, not sm",
              props.major, props.minor);
  return 80;
}

c10::OperatorHandle sm90a_op(const char* name) {
  auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  TORCH_CHECK(handle.hasKernelForDispatchKey(c10::DispatchKey::CUDA), name,
              " has no CUDA kernel: sparseq._C_sm90a is not built or not imported "
              "(see sparseq.kernels_available())");
  return handle;
}

at::Tensor sparse24_mm_cutlass(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                               const std::optional<at::Tensor>& bias) {
  if (arch_of(x) == 90) {
    static auto op = sm90a_op("sparseq::_sparse24_mm_cutlass_sm90a")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const std::optional<at::Tensor>&)>();
    return op.call(x, values, meta, bias);
  }
  return sparseq::sparse24_mm(kSm80Kernels, 80, x, values, meta, bias);
}

at::Tensor sparse24_int8_mm_cutlass(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                    const at::Tensor& w_scale, const std::optional<at::Tensor>& x_scale,
                                    const std::optional<at::Tensor>& bias, std::optional<at::ScalarType> out_dtype) {
  if (arch_of(x) == 90) {
    static auto op = sm90a_op("sparseq::_sparse24_int8_mm_cutlass_sm90a")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                           std::optional<at::ScalarType>)>();
    return op.call(x, values, meta, w_scale, x_scale, bias, out_dtype);
  }
  return sparseq::sparse24_int8_mm(kSm80Kernels, 80, x, values, meta, w_scale, x_scale, bias, out_dtype);
}

at::Tensor meta_to_cutlass_sm80(const at::Tensor& values, const at::Tensor& meta) {
  auto [n, k, bits] = sparseq::check_canonical(values, meta);
  TORCH_CHECK(meta.scalar_type() == at::kByte && meta.dim() == 2 && meta.size(0) == n && meta.size(1) == k / 8,
              "meta must be the canonical uint8 [", n, ", ", k / 8, "], got ", meta.scalar_type(), " ", meta.sizes());
  c10::cuda::CUDAGuard guard(values.device());
  at::Tensor out = bits == 16 ? at::empty({k / 32, n, 2}, meta.options().dtype(at::kShort))
                              : at::empty({k / 64, n, 2}, meta.options().dtype(at::kInt));
  const char* err = sparseq_meta_to_cutlass_sm80(meta.data_ptr<uint8_t>(), out.data_ptr(), int(n), int(k), bits,
                                                 sparseq::current_stream(values));
  TORCH_CHECK(err == nullptr, "sparseq: ", err);
  return out;
}

at::Tensor meta_from_cutlass_sm80(const at::Tensor& values, const at::Tensor& meta_cutlass) {
  auto [n, k, bits] = sparseq::check_canonical(values, meta_cutlass);
  sparseq::check_prepared_meta(meta_cutlass, n, k, bits, 80);
  c10::cuda::CUDAGuard guard(values.device());
  at::Tensor out = at::empty({n, k / 8}, meta_cutlass.options().dtype(at::kByte));
  const char* err = sparseq_meta_from_cutlass_sm80(meta_cutlass.data_ptr(), out.data_ptr<uint8_t>(), int(n), int(k),
                                                   bits, sparseq::current_stream(values));
  TORCH_CHECK(err == nullptr, "sparseq: ", err);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseq, CUDA, m) {
  m.impl("sparse24_mm_cutlass", &sparse24_mm_cutlass);
  m.impl("sparse24_int8_mm_cutlass", &sparse24_int8_mm_cutlass);
  m.impl("sparse24_meta_to_cutlass_sm80", &meta_to_cutlass_sm80);
  m.impl("sparse24_meta_from_cutlass_sm80", &meta_from_cutlass_sm80);
}

// A Python module so that `import sparseq._C` works; importing it registers the kernels.
#include <Python.h>
static struct PyModuleDef sparseq_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sparseq_c_module); }
