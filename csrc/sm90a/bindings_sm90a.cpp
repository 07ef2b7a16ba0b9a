// torch bindings of sparseq._C_sm90a: the Hopper (wgmma.sp) 2:4 GEMMs and the sm90 metadata
// converters. Schemas live in sparseq/cuda_ops.py; the public sparseq::sparse24_mm_cutlass and
// sparse24_int8_mm_cutlass (registered by sparseq._C) route here on sm90 GPUs.
// PyTorch's stable C ABI only (see binding_utils.h).
#include "sparseq/binding_utils.h"
#include "sparseq/sm90_kernels.h"

namespace {

using sparseq::KernelEntry;
using sparseq::ScalarType;
using sparseq::Tensor;

const KernelEntry kSm90Kernels[] = {
#define SPARSEQ_ENTRY(name, in, out, bucket) \
  {sparseq::dtype_of(#in), sparseq::dtype_of(#out), bucket, &sparseq_sm90_##name},
    SPARSEQ_SM90_KERNELS(SPARSEQ_ENTRY)
#undef SPARSEQ_ENTRY
};

void check_sm90(const Tensor& x) {
  STD_TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got device ", sparseq::device_of(x));
  auto props = sparseq::device_info(x.get_device_index());
  STD_TORCH_CHECK(props.major == 9 && props.minor == 0, "sparseq sm90a kernels need an sm90 (Hopper) GPU, got sm",
                  props.major, props.minor);
}

Tensor mm_sm90a(Tensor x, Tensor values, Tensor meta, std::optional<Tensor> bias) {
  check_sm90(x);
  return sparseq::sparse24_mm(kSm90Kernels, 90, x, values, meta, bias);
}

Tensor int8_mm_sm90a(Tensor x, Tensor values, Tensor meta, Tensor w_scale, std::optional<Tensor> x_scale,
                     std::optional<Tensor> bias, std::optional<ScalarType> out_dtype) {
  check_sm90(x);
  return sparseq::sparse24_int8_mm(kSm90Kernels, 90, x, values, meta, w_scale, x_scale, bias, out_dtype);
}

Tensor meta_to_cutlass_sm90(Tensor values, Tensor meta) {
  auto [n, k, bits] = sparseq::check_canonical(values, meta);
  sparseq::check_canonical_meta(meta, n, k);
  auto guard = sparseq::device_guard(values);
  Tensor out = sparseq::empty_like_device(meta, {k / 128, n / 64, 1024}, ScalarType::Byte);
  const char* err = sparseq_meta_to_cutlass_sm90(static_cast<const uint8_t*>(meta.data_ptr()),
                                                 static_cast<uint8_t*>(out.data_ptr()), int(n), int(k), bits,
                                                 sparseq::current_stream(values));
  STD_TORCH_CHECK(err == nullptr, "sparseq: ", err);
  return out;
}

Tensor meta_from_cutlass_sm90(Tensor values, Tensor meta_cutlass) {
  auto [n, k, bits] = sparseq::check_canonical(values, meta_cutlass);
  sparseq::check_prepared_meta(meta_cutlass, n, k, bits, 90);
  auto guard = sparseq::device_guard(values);
  Tensor out = sparseq::empty_like_device(meta_cutlass, {n, k / 8}, ScalarType::Byte);
  const char* err = sparseq_meta_from_cutlass_sm90(static_cast<const uint8_t*>(meta_cutlass.data_ptr()),
                                                   static_cast<uint8_t*>(out.data_ptr()), int(n), int(k), bits,
                                                   sparseq::current_stream(values));
  STD_TORCH_CHECK(err == nullptr, "sparseq: ", err);
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(sparseq, CUDA, m) {
  m.impl("_sparse24_mm_cutlass_sm90a", TORCH_BOX(&mm_sm90a));
  m.impl("_sparse24_int8_mm_cutlass_sm90a", TORCH_BOX(&int8_mm_sm90a));
  m.impl("sparse24_meta_to_cutlass_sm90", TORCH_BOX(&meta_to_cutlass_sm90));
  m.impl("sparse24_meta_from_cutlass_sm90", TORCH_BOX(&meta_from_cutlass_sm90));
}

// A Python module (limited API, any CPython >= 3.10) so that `import sparseq._C_sm90a` works;
// importing it registers the kernels.
#include <Python.h>
static struct PyModuleDef sparseq_sm90a_module = {PyModuleDef_HEAD_INIT, "_C_sm90a", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C_sm90a(void) { return PyModule_Create(&sparseq_sm90a_module); }
