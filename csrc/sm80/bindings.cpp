// torch bindings of sparseq._C, the core extension: registers the public CUTLASS 2:4 ops
// (schemas in sparseq/cuda_ops.py) and runs the Ampere (mma.sp) kernels; on sm90 GPUs the GEMMs
// route through the dispatcher to the sm90a kernels registered by sparseq._C_sm90a.
// PyTorch's stable C ABI only (see binding_utils.h).
#include <array>

#include "sparseq/binding_utils.h"
#include "sparseq/sm80_kernels.h"

namespace {

using sparseq::KernelEntry;
using sparseq::ScalarType;
using sparseq::Tensor;

const KernelEntry kSm80Kernels[] = {
#define SPARSEQ_ENTRY(name, in, out, bucket) \
  {sparseq::dtype_of(#in), sparseq::dtype_of(#out), bucket, &sparseq_sm80_##name},
    SPARSEQ_SM80_KERNELS(SPARSEQ_ENTRY)
#undef SPARSEQ_ENTRY
};

// 90 for sm90 (the sm90a kernels), 80 for sm80-sm89, an error otherwise.
int arch_of(const Tensor& x) {
  STD_TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got device ", sparseq::device_of(x));
  auto props = sparseq::device_info(x.get_device_index());
  if (props.major == 9 && props.minor == 0) return 90;
  STD_TORCH_CHECK(props.major == 8, "sparseq's CUTLASS 2:4 kernels run on sm80-sm89 and sm90 GPUs, not sm",
                  props.major, props.minor);
  return 80;
}

// Calls a private sm90a op of sparseq._C_sm90a through the dispatcher; its result is stack[0].
template <size_t N>
Tensor call_sm90a(const char* op, std::array<StableIValue, N>& stack) {
  const AOTITorchError err = torch_call_dispatcher(op, "", stack.data(), TORCH_ABI_VERSION);
  STD_TORCH_CHECK(err == AOTI_TORCH_SUCCESS, "sparseq: ", op,
                  " failed (torch printed the cause above); if it has no CUDA kernel, sparseq._C_sm90a is not "
                  "built or not imported (see sparseq.kernels_available())");
  return torch::stable::detail::to<Tensor>(stack[0]);
}

Tensor sparse24_mm_cutlass(Tensor x, Tensor values, Tensor meta, std::optional<Tensor> bias) {
  if (arch_of(x) == 90) {
    sparseq::check_sparse24_mm(90, x, values, meta);  // report bad input here, in full
    std::array<StableIValue, 4> stack{torch::stable::detail::from(x), torch::stable::detail::from(values),
                                      torch::stable::detail::from(meta), torch::stable::detail::from(bias)};
    return call_sm90a("sparseq::_sparse24_mm_cutlass_sm90a", stack);
  }
  return sparseq::sparse24_mm(kSm80Kernels, 80, x, values, meta, bias);
}

Tensor sparse24_int8_mm_cutlass(Tensor x, Tensor values, Tensor meta, Tensor w_scale, std::optional<Tensor> x_scale,
                                std::optional<Tensor> bias, std::optional<ScalarType> out_dtype) {
  if (arch_of(x) == 90) {
    sparseq::check_sparse24_int8_mm(90, x, values, meta, x_scale, out_dtype);
    std::array<StableIValue, 7> stack{
        torch::stable::detail::from(x),       torch::stable::detail::from(values),
        torch::stable::detail::from(meta),    torch::stable::detail::from(w_scale),
        torch::stable::detail::from(x_scale), torch::stable::detail::from(bias),
        torch::stable::detail::from(out_dtype)};
    return call_sm90a("sparseq::_sparse24_int8_mm_cutlass_sm90a", stack);
  }
  return sparseq::sparse24_int8_mm(kSm80Kernels, 80, x, values, meta, w_scale, x_scale, bias, out_dtype);
}

Tensor meta_to_cutlass_sm80(Tensor values, Tensor meta) {
  auto [n, k, bits] = sparseq::check_canonical(values, meta);
  sparseq::check_canonical_meta(meta, n, k);
  auto guard = sparseq::device_guard(values);
  Tensor out = bits == 16 ? sparseq::empty_like_device(meta, {k / 32, n, 2}, ScalarType::Short)
                          : sparseq::empty_like_device(meta, {k / 64, n, 2}, ScalarType::Int);
  const char* err = sparseq_meta_to_cutlass_sm80(static_cast<const uint8_t*>(meta.data_ptr()), out.data_ptr(),
                                                 int(n), int(k), bits, sparseq::current_stream(values));
  STD_TORCH_CHECK(err == nullptr, "sparseq: ", err);
  return out;
}

Tensor meta_from_cutlass_sm80(Tensor values, Tensor meta_cutlass) {
  auto [n, k, bits] = sparseq::check_canonical(values, meta_cutlass);
  sparseq::check_prepared_meta(meta_cutlass, n, k, bits, 80);
  auto guard = sparseq::device_guard(values);
  Tensor out = sparseq::empty_like_device(meta_cutlass, {n, k / 8}, ScalarType::Byte);
  const char* err = sparseq_meta_from_cutlass_sm80(meta_cutlass.data_ptr(), static_cast<uint8_t*>(out.data_ptr()),
                                                   int(n), int(k), bits, sparseq::current_stream(values));
  STD_TORCH_CHECK(err == nullptr, "sparseq: ", err);
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(sparseq, CUDA, m) {
  m.impl("sparse24_mm_cutlass", TORCH_BOX(&sparse24_mm_cutlass));
  m.impl("sparse24_int8_mm_cutlass", TORCH_BOX(&sparse24_int8_mm_cutlass));
  m.impl("sparse24_meta_to_cutlass_sm80", TORCH_BOX(&meta_to_cutlass_sm80));
  m.impl("sparse24_meta_from_cutlass_sm80", TORCH_BOX(&meta_from_cutlass_sm80));
}

// A Python module (limited API, any CPython >= 3.10) so that `import sparseq._C` works;
// importing it registers the kernels.
#include <Python.h>
static struct PyModuleDef sparseq_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sparseq_c_module); }
