// Human-readable pieces of error messages for tensors (the stable ABI has no printers for
// these), shared by the CUDA bindings (binding_utils.h) and the CPU extension (csrc/cpu/).
// PyTorch's stable C ABI only; no CUDA.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace sparseq {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;

inline std::string dtype_name(ScalarType t) { return torch::headeronly::toString(t); }

inline std::string shape_of(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << "]";
  return s.str();
}

inline std::string shape_of(const Tensor& t) {
  std::vector<int64_t> shape(static_cast<size_t>(t.dim()));
  for (int64_t i = 0; i < t.dim(); ++i) shape[static_cast<size_t>(i)] = t.size(i);
  return shape_of(shape);
}

}  // namespace sparseq
