// Torch launchers for omni::MoeRoute and omni::FusedMoe: check every argument, pass strides (no copies), allocate
// the workspaces from torch's caching allocator (no host synchronisation, fine under CUDA-graph capture) and launch
// on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>

#include <omni/moe.cuh>
#include "launch_check.h"

namespace {

constexpr char const* kRouteOp = "omni::moe_route: ";
constexpr char const* kOp = "omni::fused_moe: ";

bool FloatType(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

void CheckDevice(char const* op, at::Tensor const& first, std::initializer_list<at::Tensor const*> rest) {
  TORCH_CHECK(first.is_cuda(), op, "tensors must be on a CUDA device, got ", first.device());
  for (at::Tensor const* t : rest)
    TORCH_CHECK(t->device() == first.device(), op, "all tensors must be on ", first.device(), ", got ", t->device());
}

template <typename T>
void LaunchRoute(at::Tensor const& logits, int64_t top_k, bool renormalize, at::Tensor& weights, at::Tensor& ids) {
  omni::MoeRouteParams<T> p{};
  p.logits = reinterpret_cast<T const*>(logits.const_data_ptr());
  p.weights = reinterpret_cast<T*>(weights.mutable_data_ptr());
  p.ids = ids.mutable_data_ptr<int32_t>();
  p.logits_stride[0] = logits.stride(0);
  p.logits_stride[1] = logits.stride(1);
  p.num_tokens = static_cast<int>(logits.size(0));
  p.num_experts = static_cast<int>(logits.size(1));
  p.top_k = static_cast<int>(top_k);
  p.renormalize = renormalize;
  cudaError_t const err = omni::MoeRoute<T>(p, c10::cuda::getCurrentCUDAStream().stream());
  omni::CheckLaunch(err, kRouteOp);
}

template <typename T>
void LaunchMoe(at::Tensor const& x, at::Tensor const& logits, at::Tensor const& w_gate_up, at::Tensor const& w_down,
               int64_t top_k, bool renormalize, at::Tensor& out) {
  int64_t const tokens = x.size(0), hidden = x.size(1), experts = w_gate_up.size(0), inter = w_down.size(2);
  int64_t const pairs = tokens * top_k;
  bool const prefill = omni::MoeUsesPrefill(static_cast<int>(tokens));
  int64_t const max_blocks = prefill ? omni::MoeMaxBlocks(pairs, experts) : 0;
  // ids [P], then (prefill) sorted_pairs [max_blocks * BM], block_expert [max_blocks], num_padded [1]
  at::Tensor const ints = at::empty({pairs + (prefill ? max_blocks * (omni::kMoeBlockM + 1) + 1 : 0)},
                                    x.options().dtype(at::kInt));
  at::Tensor const weights = at::empty({pairs}, x.options());
  at::Tensor const h = at::empty({pairs, inter}, x.options());
  at::Tensor const rows = at::empty({pairs, hidden}, x.options());

  omni::MoeParams<T> p{};
  p.x = reinterpret_cast<T const*>(x.const_data_ptr());
  p.logits = reinterpret_cast<T const*>(logits.const_data_ptr());
  p.w_gate_up = reinterpret_cast<T const*>(w_gate_up.const_data_ptr());
  p.w_down = reinterpret_cast<T const*>(w_down.const_data_ptr());
  p.out = reinterpret_cast<T*>(out.mutable_data_ptr());
  for (int i = 0; i < 2; ++i)
    p.x_stride[i] = x.stride(i), p.logits_stride[i] = logits.stride(i), p.out_stride[i] = out.stride(i);
  for (int i = 0; i < 3; ++i) p.w_gate_up_stride[i] = w_gate_up.stride(i), p.w_down_stride[i] = w_down.stride(i);
  int32_t* const ip = ints.mutable_data_ptr<int32_t>();
  p.weights = reinterpret_cast<T*>(weights.mutable_data_ptr());
  p.ids = ip;
  p.h = reinterpret_cast<T*>(h.mutable_data_ptr());
  p.rows = reinterpret_cast<T*>(rows.mutable_data_ptr());
  if (prefill) {
    p.sorted_pairs = ip + pairs;
    p.block_expert = p.sorted_pairs + max_blocks * omni::kMoeBlockM;
    p.num_padded = p.block_expert + max_blocks;
  }
  p.num_tokens = static_cast<int>(tokens);
  p.num_experts = static_cast<int>(experts);
  p.top_k = static_cast<int>(top_k);
  p.hidden = static_cast<int>(hidden);
  p.inter = static_cast<int>(inter);
  p.renormalize = renormalize;
  cudaError_t const err = omni::FusedMoe<T>(p, c10::cuda::getCurrentCUDAStream().stream());
  omni::CheckLaunch(err, kOp);
}

void CheckTopK(char const* op, int64_t top_k, int64_t experts) {
  TORCH_CHECK(experts >= 1 && experts <= omni::kMoeMaxExperts, op, "the number of experts must be in [1, ",
              omni::kMoeMaxExperts, "], got ", experts);
  TORCH_CHECK(top_k >= 1 && top_k <= experts, op, "top_k must be in [1, ", experts, "] (the number of experts), got ",
              top_k);
}

}  // namespace

// logits: (T, E) float32/float16/bfloat16 -> weights (T, K) in logits' dtype, ids (T, K) int32, both contiguous.
void moe_route(at::Tensor const& logits, int64_t top_k, bool renormalize, at::Tensor& weights, at::Tensor& ids) {
  CheckDevice(kRouteOp, logits, {&weights, &ids});
  TORCH_CHECK(logits.dim() == 2, kRouteOp, "logits must be (tokens, experts), got shape ", logits.sizes());
  auto const dtype = logits.scalar_type();
  TORCH_CHECK(FloatType(dtype), kRouteOp, "logits must be float32, float16 or bfloat16, got ", dtype);
  int64_t const tokens = logits.size(0), experts = logits.size(1);
  CheckTopK(kRouteOp, top_k, experts);
  TORCH_CHECK(tokens <= INT32_MAX && tokens * top_k <= INT32_MAX, kRouteOp, "too many tokens: ", tokens);
  TORCH_CHECK(weights.scalar_type() == dtype, kRouteOp, "weights must have the logits' dtype ", dtype, ", got ",
              weights.scalar_type());
  TORCH_CHECK(ids.scalar_type() == at::kInt, kRouteOp, "ids must be int32, got ", ids.scalar_type());
  for (at::Tensor const* t : {&weights, &ids})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == tokens && t->size(1) == top_k && t->is_contiguous(), kRouteOp,
                "weights and ids must be contiguous (", tokens, ", ", top_k, "), got ", t->sizes(), " with strides ",
                t->strides());
  if (tokens == 0) return;
  c10::cuda::CUDAGuard const guard(logits.device());
  switch (dtype) {
    case at::kFloat: return LaunchRoute<float>(logits, top_k, renormalize, weights, ids);
    case at::kHalf: return LaunchRoute<__half>(logits, top_k, renormalize, weights, ids);
    case at::kBFloat16: return LaunchRoute<__nv_bfloat16>(logits, top_k, renormalize, weights, ids);
    default: TORCH_CHECK(false, kRouteOp, "unreachable dtype ", dtype);
  }
}

// x: (T, H); router_logits: (T, E); w_gate_up: (E, 2I, H), gate rows first; w_down: (E, H, I); out: (T, H).
// One dtype for all (float32, float16 or bfloat16); any strides (16-byte aligned rows with unit stride along the
// reduction take the vectorised and tensor-core paths, others the scalar ones).
void fused_moe(at::Tensor const& x, at::Tensor const& router_logits, at::Tensor const& w_gate_up,
               at::Tensor const& w_down, int64_t top_k, bool renormalize, at::Tensor& out) {
  CheckDevice(kOp, x, {&router_logits, &w_gate_up, &w_down, &out});
  TORCH_CHECK(x.dim() == 2, kOp, "x must be (tokens, hidden), got shape ", x.sizes());
  TORCH_CHECK(router_logits.dim() == 2, kOp, "router_logits must be (tokens, experts), got shape ",
              router_logits.sizes());
  TORCH_CHECK(w_gate_up.dim() == 3 && w_down.dim() == 3, kOp,
              "w_gate_up must be (experts, 2 * inter, hidden) and w_down (experts, hidden, inter), got ",
              w_gate_up.sizes(), " and ", w_down.sizes());
  int64_t const tokens = x.size(0), hidden = x.size(1), experts = w_gate_up.size(0), inter = w_down.size(2);
  TORCH_CHECK(hidden >= 1 && inter >= 1 && w_gate_up.size(1) == 2 * inter && w_gate_up.size(2) == hidden &&
                  w_down.size(0) == experts && w_down.size(1) == hidden,
              kOp, "weight shapes disagree with x ", x.sizes(), ": w_gate_up ", w_gate_up.sizes(), ", w_down ",
              w_down.sizes(), " (expected (E, 2I, H) and (E, H, I), H, I >= 1)");
  TORCH_CHECK(router_logits.size(0) == tokens && router_logits.size(1) == experts, kOp, "router_logits must be (",
              tokens, ", ", experts, "), got ", router_logits.sizes());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == tokens && out.size(1) == hidden, kOp, "out must be (", tokens, ", ",
              hidden, "), got ", out.sizes());
  auto const dtype = x.scalar_type();
  TORCH_CHECK(FloatType(dtype), kOp, "dtype must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(router_logits.scalar_type() == dtype && w_gate_up.scalar_type() == dtype &&
                  w_down.scalar_type() == dtype && out.scalar_type() == dtype,
              kOp, "x, router_logits, w_gate_up, w_down and out must have one dtype, got ", dtype, ", ",
              router_logits.scalar_type(), ", ", w_gate_up.scalar_type(), ", ", w_down.scalar_type(), ", ",
              out.scalar_type());
  CheckTopK(kOp, top_k, experts);
  TORCH_CHECK(hidden <= INT32_MAX && inter <= INT32_MAX && tokens * top_k <= INT32_MAX / omni::kMoeBlockM, kOp,
              "sizes too large: tokens ", tokens, " x top_k ", top_k, ", hidden ", hidden, ", inter ", inter);
  if (tokens == 0) return;
  c10::cuda::CUDAGuard const guard(x.device());
  switch (dtype) {
    case at::kFloat: return LaunchMoe<float>(x, router_logits, w_gate_up, w_down, top_k, renormalize, out);
    case at::kHalf: return LaunchMoe<__half>(x, router_logits, w_gate_up, w_down, top_k, renormalize, out);
    case at::kBFloat16:
      return LaunchMoe<__nv_bfloat16>(x, router_logits, w_gate_up, w_down, top_k, renormalize, out);
    default: TORCH_CHECK(false, kOp, "unreachable dtype ", dtype);
  }
}
