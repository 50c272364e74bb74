// Torch launcher for omni::CausalConv1d (dense or depthwise, optional streaming state and fused SnakeBeta): checks
// every argument and passes strides (no copies), on the current stream so CUDA-graph capture sees both kernels.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <optional>

#include "conv_launch.h"
#include "launch_check.h"

#include <omni/causal_conv.cuh>

namespace {

constexpr char const* kOp = "omni::causal_conv1d: ";

using omni::conv_launch::CheckLike;
using omni::conv_launch::FillShared;

template <typename T>
void Launch(at::Tensor const& x, at::Tensor const& weight, std::optional<at::Tensor> const& bias, int64_t dilation,
            bool depthwise, std::optional<at::Tensor> const& state, std::optional<at::Tensor> const& alpha,
            std::optional<at::Tensor> const& beta, at::Tensor& out, at::Tensor& new_state) {
  omni::CausalConv1dArgs<T> p;
  FillShared<T>(p, x, weight, bias, state, alpha, beta, out, new_state);
  p.c_out = static_cast<int>(weight.size(0));
  p.taps = static_cast<int>(weight.size(2));
  p.dilation = static_cast<int>(dilation);
  p.depthwise = depthwise;
  p.swo = weight.stride(0), p.swi = weight.stride(1);
  cudaError_t const err = omni::CausalConv1d<T>(p, c10::cuda::getCurrentCUDAStream().stream());
  omni::CheckLaunch(err, kOp);
}

}  // namespace

// x: (B, C_in, L); weight: (C_out, C_in / groups, K) with groups 1 (dense) or C_in (depthwise, C_out a multiple of
// C_in); bias: (C_out,); state: (B, C_in, (K - 1) * dilation) or None (zeros: the start of a stream); snake_alpha /
// snake_beta: (C_in,) both or neither. out: (B, C_out, L), new_state: (B, C_in, (K - 1) * dilation). All one dtype
// (float32, float16, bfloat16) on one device, any strides. new_state may be the state tensor itself (in-place
// streaming update); out must not overlap x.
void causal_conv1d(at::Tensor const& x, at::Tensor const& weight, std::optional<at::Tensor> const& bias,
                   int64_t dilation, int64_t groups, std::optional<at::Tensor> const& state,
                   std::optional<at::Tensor> const& snake_alpha, std::optional<at::Tensor> const& snake_beta,
                   at::Tensor& out, at::Tensor& new_state) {
  TORCH_CHECK(x.is_cuda(), kOp, "x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 3, kOp, "x must be (B, C_in, L), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              kOp, "dtype must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 3, kOp, "weight must be (C_out, C_in / groups, K), got shape ", weight.sizes());
  int64_t const B = x.size(0), C_in = x.size(1), L = x.size(2), C_out = weight.size(0), K = weight.size(2);
  TORCH_CHECK(dilation >= 1, kOp, "dilation must be >= 1, got ", dilation);
  TORCH_CHECK(K >= 1, kOp, "weight must have at least one tap, got shape ", weight.sizes());
  bool const depthwise = groups == C_in && C_in > 1;
  TORCH_CHECK(groups == 1 || depthwise, kOp, "groups must be 1 (dense) or C_in = ", C_in,
              " (depthwise); other group counts are not implemented, got ", groups);
  TORCH_CHECK(weight.size(1) == C_in / groups, kOp, "weight ", weight.sizes(), " does not take ", C_in,
              " input channels in ", groups, " groups");
  TORCH_CHECK(!depthwise || C_out % C_in == 0, kOp, "depthwise C_out ", C_out, " must be a multiple of C_in ", C_in);
  CheckLike(kOp, weight, "weight", x, weight.sizes());
  if (bias.has_value()) CheckLike(kOp, *bias, "bias", x, {C_out});
  int64_t const ctx = (K - 1) * dilation;
  TORCH_CHECK(ctx <= (1 << 20), kOp, "context (K - 1) * dilation = ", ctx, " exceeds the limit 2^20");
  if (state.has_value()) CheckLike(kOp, *state, "state", x, {B, C_in, ctx});
  TORCH_CHECK(snake_alpha.has_value() == snake_beta.has_value(), kOp,
              "snake_alpha and snake_beta must be given together");
  if (snake_alpha.has_value()) {
    CheckLike(kOp, *snake_alpha, "snake_alpha", x, {C_in});
    CheckLike(kOp, *snake_beta, "snake_beta", x, {C_in});
  }
  CheckLike(kOp, out, "out", x, {B, C_out, L});
  CheckLike(kOp, new_state, "new_state", x, {B, C_in, ctx});
  omni::CheckNoOverlap(kOp, out, "out", x, "x");
  TORCH_CHECK(!state.has_value() || new_state.data_ptr() != state->data_ptr() ||
                  new_state.strides() == state->strides(),
              kOp, "new_state may be state itself, but then with the same strides");
  TORCH_CHECK(!state.has_value() || at::get_overlap_status(new_state, *state) != at::MemOverlapStatus::Partial, kOp,
              "new_state may be state itself, not part of it");
  // B * C_in: the state kernel's rows, one thread each in 128-thread blocks, indexed in int (rows + 127 < 2^31)
  TORCH_CHECK(B <= INT32_MAX && C_in <= INT32_MAX && L <= 2000000 && B * C_in <= INT32_MAX - 127 && C_out <= 500000,
              kOp, "sizes out of range (B * C_in < 2^31 - 128, C_out <= 500000, L <= 2000000), got x ", x.sizes(),
              ", weight ", weight.sizes());
  size_t const smem = omni::CausalConv1dSmemBytes(depthwise, static_cast<int>(K), static_cast<int>(dilation),
                                                  static_cast<int>(L));
  TORCH_CHECK(L == 0 || smem <= omni::kCausalConv1dSmemLimit, kOp, "the input window needs ", smem,
              " bytes of shared memory, over the 48 KiB limit: taps K = ", K, " x dilation ", dilation,
              " is too long (context ", ctx, ")");

  c10::cuda::CUDAGuard const guard(x.device());
  switch (x.scalar_type()) {
    case at::kFloat:
      return Launch<float>(x, weight, bias, dilation, depthwise, state, snake_alpha, snake_beta, out, new_state);
    case at::kHalf:
      return Launch<__half>(x, weight, bias, dilation, depthwise, state, snake_alpha, snake_beta, out, new_state);
    default:
      return Launch<__nv_bfloat16>(x, weight, bias, dilation, depthwise, state, snake_alpha, snake_beta, out,
                                   new_state);
  }
}
