// Torch launcher for omni::MoeCombine: checks every argument, passes strides (no copies), and launches on the current
// stream so CUDA-graph capture sees the kernel.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <omni/moe_combine.cuh>
#include "launch_check.h"

#include <climits>
#include <optional>
#include <vector>

namespace {

// The stride of dim `d`, or 0 where the dim has one element (its stride is then arbitrary and indexes nothing).
int64_t StrideOrZero(at::Tensor const& t, int64_t d) { return t.size(d) > 1 ? t.stride(d) : 0; }

template <typename T>
void Launch(at::Tensor const& rows, std::optional<at::Tensor> const& gate, std::optional<at::Tensor> const& shared,
            at::Tensor& out) {
  omni::MoeCombineArgs<T> const a{
      reinterpret_cast<T const*>(rows.const_data_ptr()),
      gate ? reinterpret_cast<T const*>(gate->const_data_ptr()) : nullptr,
      shared ? reinterpret_cast<T const*>(shared->const_data_ptr()) : nullptr,
      reinterpret_cast<T*>(out.mutable_data_ptr()),
      rows.size(0),
      static_cast<int>(rows.size(1)),
      static_cast<int>(rows.size(2)),
      StrideOrZero(rows, 0),
      StrideOrZero(rows, 1),
      gate ? StrideOrZero(*gate, 0) : 0,
      shared ? StrideOrZero(*shared, 0) : 0};
  omni::CheckLaunch(omni::MoeCombine<T>(a, c10::cuda::getCurrentCUDAStream().stream()), "omni::moe_combine: ");
}

}  // namespace

// rows: (T, K, H), the weighted expert rows of each token; gate: (T, 1) and shared: (T, H), the talker's shared
// expert (gate logits and output), both or neither; out: (T, H), contiguous, overlapping nothing.
void moe_combine(at::Tensor const& rows, std::optional<at::Tensor> const& gate,
                 std::optional<at::Tensor> const& shared, at::Tensor& out) {
  char const* op = "omni::moe_combine: ";
  TORCH_CHECK(rows.is_cuda(), op, "rows must be a CUDA tensor, got ", rows.device());
  TORCH_CHECK(rows.dim() == 3, op, "rows must be (tokens, top_k, hidden), got shape ", rows.sizes());
  int64_t const tokens = rows.size(0), top_k = rows.size(1), hidden = rows.size(2);
  TORCH_CHECK(top_k <= INT_MAX && hidden <= INT_MAX, op, "top_k and hidden must fit 32 bits, got ", rows.sizes());
  TORCH_CHECK(rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kHalf ||
                  rows.scalar_type() == at::kBFloat16,
              op, "dtype must be float32, float16 or bfloat16, got ", rows.scalar_type());
  TORCH_CHECK(gate.has_value() == shared.has_value(), op,
              "the shared expert needs both its gate logits and its output, got one");
  auto const check_like = [&](at::Tensor const& t, char const* name, at::IntArrayRef shape) {
    TORCH_CHECK(t.sizes() == shape, op, name, " must have shape ", shape, ", got ", t.sizes());
    TORCH_CHECK(t.device() == rows.device(), op, name, " must be on rows' device ", rows.device(), ", got ",
                t.device());
    TORCH_CHECK(t.scalar_type() == rows.scalar_type(), op, name, " must have rows' dtype ", rows.scalar_type(),
                ", got ", t.scalar_type());
  };
  std::vector<int64_t> const row_shape{tokens, hidden};
  check_like(out, "out", row_shape);
  TORCH_CHECK(out.is_contiguous(), op, "out must be contiguous, got strides ", out.strides());
  TORCH_CHECK(rows.stride(2) == 1 || hidden <= 1, op, "rows must be contiguous along hidden, got strides ",
              rows.strides());
  omni::CheckNoOverlap(op, out, "out", rows, "rows");
  if (gate) {
    check_like(*gate, "gate", std::vector<int64_t>{tokens, 1});
    check_like(*shared, "shared", row_shape);
    TORCH_CHECK(shared->stride(1) == 1 || hidden <= 1, op, "shared must be contiguous along hidden, got strides ",
                shared->strides());
    omni::CheckNoOverlap(op, out, "out", *gate, "gate");
    omni::CheckNoOverlap(op, out, "out", *shared, "shared");
  }
  if (out.numel() == 0) return;

  c10::cuda::CUDAGuard const guard(rows.device());
  switch (rows.scalar_type()) {
    case at::kFloat: return Launch<float>(rows, gate, shared, out);
    case at::kHalf: return Launch<__half>(rows, gate, shared, out);
    case at::kBFloat16: return Launch<__nv_bfloat16>(rows, gate, shared, out);
    default: TORCH_CHECK(false, op, "dtype must be float32, float16 or bfloat16, got ", rows.scalar_type());
  }
}
