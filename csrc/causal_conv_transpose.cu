// Torch launcher for omni::CausalConvTranspose1d (Code2Wav's causal transposed conv, optional streaming state and
// fused SnakeBeta): checks every argument and passes strides (no copies), on the current stream so CUDA-graph capture
// sees both kernels.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <optional>

#include "conv_launch.h"
#include "launch_check.h"

#include <omni/causal_conv_transpose.cuh>

namespace {

constexpr char const* kOp = "omni::causal_conv_transpose1d: ";

using omni::conv_launch::CheckLike;
using omni::conv_launch::FillShared;

template <typename T>
void Launch(at::Tensor const& x, at::Tensor const& weight, std::optional<at::Tensor> const& bias, int64_t stride,
            std::optional<at::Tensor> const& state, std::optional<at::Tensor> const& alpha,
            std::optional<at::Tensor> const& beta, at::Tensor& out, at::Tensor& new_state) {
  omni::CausalConvTranspose1dArgs<T> p;
  FillShared<T>(p, x, weight, bias, state, alpha, beta, out, new_state);
  p.c_out = static_cast<int>(weight.size(1));
  p.stride = static_cast<int>(stride);
  p.taps = static_cast<int>(weight.size(2) / stride);
  p.state_len = state.has_value() ? static_cast<int>(state->size(2)) : 0;
  p.swi = weight.stride(0), p.swo = weight.stride(1);
  cudaError_t const err = omni::CausalConvTranspose1d<T>(p, c10::cuda::getCurrentCUDAStream().stream());
  omni::CheckLaunch(err, kOp);
}

}  // namespace

// x: (B, C_in, L); weight: (C_in, C_out, K) with K = m * stride, 1 <= m <= 4; bias: (C_out,); state: (B, C_in, S),
// S <= m - 1, the previous chunk's last inputs (after the snake), or None (the start of a stream); snake_alpha /
// snake_beta: (C_in,) both or neither. out: (B, C_out, n * stride) with n = max(S + L - (m - 1), 0), new_state:
// (B, C_in, min(m - 1, S + L)). All one dtype (float32, float16, bfloat16) on one device, any strides. new_state
// may be the state tensor itself (in-place streaming update); out must not overlap x.
void causal_conv_transpose1d(at::Tensor const& x, at::Tensor const& weight, std::optional<at::Tensor> const& bias,
                             int64_t stride, std::optional<at::Tensor> const& state,
                             std::optional<at::Tensor> const& snake_alpha,
                             std::optional<at::Tensor> const& snake_beta, at::Tensor& out, at::Tensor& new_state) {
  TORCH_CHECK(x.is_cuda(), kOp, "x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, kOp, "x must be (B, C_in, L), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              kOp, "dtype must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 3, kOp, "weight must be (C_in, C_out, K), got shape ", weight.sizes());
  int64_t const B = x.size(0), C_in = x.size(1), L = x.size(2), C_out = weight.size(1), K = weight.size(2);
  TORCH_CHECK(weight.size(0) == C_in, kOp, "weight ", weight.sizes(), " does not take the ", C_in,
              " input channels of x");
  TORCH_CHECK(stride >= 1, kOp, "stride must be >= 1, got ", stride);
  TORCH_CHECK(K >= stride && K % stride == 0, kOp, "kernel K = ", K, " must be a positive multiple m * stride of ",
              "stride ", stride);
  int64_t const m = K / stride;
  TORCH_CHECK(m <= omni::kCausalConvTranspose1dMaxTaps, kOp, "K / stride = ", m, " taps per phase; the kernel takes ",
              "at most ", omni::kCausalConvTranspose1dMaxTaps);
  CheckLike(kOp, weight, "weight", x, weight.sizes());
  if (bias.has_value()) CheckLike(kOp, *bias, "bias", x, {C_out});
  int64_t S = 0;
  if (state.has_value()) {
    TORCH_CHECK(state->dim() == 3 && state->size(2) <= m - 1, kOp, "state must be (B, C_in, <= ", m - 1,
                ") for K / stride = ", m, ", got shape ", state->sizes());
    S = state->size(2);
    CheckLike(kOp, *state, "state", x, {B, C_in, S});
  }
  TORCH_CHECK(snake_alpha.has_value() == snake_beta.has_value(), kOp,
              "snake_alpha and snake_beta must be given together");
  if (snake_alpha.has_value()) {
    CheckLike(kOp, *snake_alpha, "snake_alpha", x, {C_in});
    CheckLike(kOp, *snake_beta, "snake_beta", x, {C_in});
  }
  int64_t const window = S + L;
  int64_t const frames = window > m - 1 ? window - (m - 1) : 0;
  CheckLike(kOp, out, "out", x, {B, C_out, frames * stride});
  CheckLike(kOp, new_state, "new_state", x, {B, C_in, window < m - 1 ? window : m - 1});
  omni::CheckNoOverlap(kOp, out, "out", x, "x");
  TORCH_CHECK(!state.has_value() || new_state.numel() == 0 || new_state.data_ptr() != state->data_ptr() ||
                  new_state.strides() == state->strides(),
              kOp, "new_state may be state itself, but then with the same strides");
  TORCH_CHECK(!state.has_value() || at::get_overlap_status(new_state, *state) != at::MemOverlapStatus::Partial, kOp,
              "new_state may be state itself, not part of it");
  TORCH_CHECK(B <= 65535 && C_out <= 500000 && stride <= INT32_MAX && window * stride <= INT32_MAX &&
                  B * C_in <= INT32_MAX - 127,   // the state kernel's rows, indexed in int in 128-thread blocks
              kOp, "sizes out of range (B <= 65535, C_out <= 500000, (S + L) * stride <= 2^31 - 1, ",
              "B * C_in < 2^31 - 128), ",
              "got x ", x.sizes(), ", weight ", weight.sizes(), ", stride ", stride);

  c10::cuda::CUDAGuard const guard(x.device());
  switch (x.scalar_type()) {
    case at::kFloat:
      return Launch<float>(x, weight, bias, stride, state, snake_alpha, snake_beta, out, new_state);
    case at::kHalf:
      return Launch<__half>(x, weight, bias, stride, state, snake_alpha, snake_beta, out, new_state);
    default:
      return Launch<__nv_bfloat16>(x, weight, bias, stride, state, snake_alpha, snake_beta, out, new_state);
  }
}
