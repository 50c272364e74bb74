// What the causal-conv launchers (causal_conv.cu, causal_conv_transpose.cu) share: optional tensors as the kernels'
// pointers and strides (null and 0 when absent), and the check that a tensor sits on x's device in x's dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace omni::conv_launch {

inline void CheckLike(char const* op, at::Tensor const& t, char const* name, at::Tensor const& x,
                      at::IntArrayRef shape) {
  TORCH_CHECK(t.device() == x.device(), op, name, " must be on x's device ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, name, " must have x's dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, name, " must have shape ", shape, ", got ", t.sizes());
}

template <typename T>
T const* Ptr(std::optional<at::Tensor> const& t) {
  return t.has_value() ? reinterpret_cast<T const*>(t->const_data_ptr()) : nullptr;
}

inline int64_t Stride(std::optional<at::Tensor> const& t, int dim) { return t.has_value() ? t->stride(dim) : 0; }

}  // namespace omni::conv_launch
