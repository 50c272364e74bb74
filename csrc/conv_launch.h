// What the causal-conv launchers (causal_conv.cu, causal_conv_transpose.cu) share: optional tensors as the kernels'
// pointers and strides (null and 0 when absent), the check that a tensor sits on x's device in x's dtype, and the
// argument fields both kernels' structs name alike.
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

// Pointers, batch / C_in / L, and the strides of x, bias, state, SnakeBeta, out, new_state and the weight's taps; the
// caller sets the rest (C_out, the weight's other two strides: the two convs lay their weights out differently).
template <typename T, typename Args>
void FillShared(Args& p, at::Tensor const& x, at::Tensor const& weight, std::optional<at::Tensor> const& bias,
                std::optional<at::Tensor> const& state, std::optional<at::Tensor> const& alpha,
                std::optional<at::Tensor> const& beta, at::Tensor& out, at::Tensor& new_state) {
  p.x = reinterpret_cast<T const*>(x.const_data_ptr());
  p.weight = reinterpret_cast<T const*>(weight.const_data_ptr());
  p.bias = Ptr<T>(bias);
  p.state = Ptr<T>(state);
  p.alpha = Ptr<T>(alpha);
  p.beta = Ptr<T>(beta);
  p.y = reinterpret_cast<T*>(out.mutable_data_ptr());
  p.new_state = reinterpret_cast<T*>(new_state.mutable_data_ptr());
  p.batch = static_cast<int>(x.size(0));
  p.c_in = static_cast<int>(x.size(1));
  p.length = static_cast<int>(x.size(2));
  p.sxb = x.stride(0), p.sxc = x.stride(1), p.sxl = x.stride(2);
  p.swk = weight.stride(2);
  p.sb = Stride(bias, 0), p.sa = Stride(alpha, 0), p.sbe = Stride(beta, 0);
  p.ssb = Stride(state, 0), p.ssc = Stride(state, 1), p.ssl = Stride(state, 2);
  p.syb = out.stride(0), p.syc = out.stride(1), p.syl = out.stride(2);
  p.snb = new_state.stride(0), p.snc = new_state.stride(1), p.snl = new_state.stride(2);
}

}  // namespace omni::conv_launch
