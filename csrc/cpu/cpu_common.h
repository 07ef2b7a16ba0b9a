// Helpers shared by the sparseq._C_cpu sources (csrc/cpu/*.cpp): the input check of a CPU op and
// the widening of bf16 / fp16 values to fp32 (tensor descriptions for error messages:
// sparseq/tensor_text.h, shared with the CUDA bindings). Stable ABI only.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Half.h>

#include "sparseq/tensor_text.h"

namespace sparseq {

inline void check_cpu_contiguous(const Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.is_cpu(), "sparseq CPU op: ", name, " must be a CPU tensor");
  STD_TORCH_CHECK(t.is_contiguous(), "sparseq CPU op: ", name, " must be contiguous, got strides of shape ",
                  shape_of(t));
}

inline float as_float(float v) { return v; }
inline float as_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float as_float(c10::Half v) { return static_cast<float>(v); }

}  // namespace sparseq
