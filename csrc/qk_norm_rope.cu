// Torch launcher for omni::QKNormRope: checks every argument, passes every tensor through its strides (q/k/v are
// slices of the fused qkv projection, the caches layer views of one allocation) and launches on the current stream
// so CUDA-graph capture sees the kernel. Cache slots come from a device tensor: the launch is the same every step.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <optional>
#include <utility>

#include <omni/qk_norm_rope.cuh>
#include "launch_check.h"

namespace {

void CheckTensor(at::Tensor const& t, char const* name, at::Tensor const& q, at::IntArrayRef shape) {
  TORCH_CHECK(t.device() == q.device(), "omni::qk_norm_rope: ", name, " must be on ", q.device(), " like q, got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "omni::qk_norm_rope: ", name, " must have q's dtype ",
              q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "omni::qk_norm_rope: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.stride(-1) == 1, "omni::qk_norm_rope: ", name, " must be contiguous in its last dim, got strides ",
              t.strides());
}

template <typename T>
void Launch(at::Tensor const& q, at::Tensor const& k, at::Tensor const& v, std::optional<at::Tensor> const& qw,
            std::optional<at::Tensor> const& kw, double eps, at::Tensor const& cos, at::Tensor const& sin,
            at::Tensor& k_cache, at::Tensor& v_cache, at::Tensor const& positions, at::Tensor& q_out) {
  auto ptr = [](at::Tensor const& t) { return reinterpret_cast<T const*>(t.const_data_ptr()); };
  auto mut = [](at::Tensor& t) { return reinterpret_cast<T*>(t.mutable_data_ptr()); };
  // a table of batch 1 is shared by the batch: stride 0
  auto batch_stride = [](at::Tensor const& t) { return t.size(0) == 1 ? int64_t{0} : t.stride(0); };
  omni::QKNormRopeParams<T> p{};
  p.q = ptr(q), p.k = ptr(k), p.v = ptr(v);
  p.q_weight = qw ? ptr(*qw) : nullptr, p.k_weight = kw ? ptr(*kw) : nullptr;
  p.cos = ptr(cos), p.sin = ptr(sin);
  p.cache_positions = positions.const_data_ptr();
  p.positions_int32 = positions.scalar_type() == at::kInt;
  p.pos_sb = positions.dim() == 2 ? positions.stride(0) : 0;
  p.k_cache = mut(k_cache), p.v_cache = mut(v_cache), p.q_out = mut(q_out);
  p.q_sb = q.stride(0), p.q_st = q.stride(1), p.q_sh = q.stride(2);
  p.k_sb = k.stride(0), p.k_st = k.stride(1), p.k_sh = k.stride(2);
  p.v_sb = v.stride(0), p.v_st = v.stride(1), p.v_sh = v.stride(2);
  p.cos_sb = batch_stride(cos), p.cos_st = cos.stride(1);
  p.sin_sb = batch_stride(sin), p.sin_st = sin.stride(1);
  p.kc_sb = k_cache.stride(0), p.kc_sh = k_cache.stride(1), p.kc_ss = k_cache.stride(2);
  p.vc_sb = v_cache.stride(0), p.vc_sh = v_cache.stride(1), p.vc_ss = v_cache.stride(2);
  p.qo_sb = q_out.stride(0), p.qo_sh = q_out.stride(1), p.qo_st = q_out.stride(2);
  p.batch = q.size(0), p.seq_len = q.size(1), p.q_heads = q.size(2), p.kv_heads = k.size(2);
  p.head_dim = q.size(3), p.cache_len = k_cache.size(2);
  p.eps = static_cast<float>(eps);
  cudaError_t const err = omni::QKNormRope<T>(p, c10::cuda::getCurrentCUDAStream().stream());
  omni::CheckLaunch(err, "omni::qk_norm_rope: ");
}

}  // namespace

// q: (B, T, Hq, D), k/v: (B, T, Hkv, D), norm weights: (D,) or both None, cos/sin: (B or 1, T, D),
// k_cache/v_cache: (B, Hkv, S, D), cache_positions: (T,) or (B, T) int32/int64, q_out: (B, Hq, T, D). One dtype for all
// floating tensors. Writes q_out and the cache slots; slots outside [0, S) are skipped.
void qk_norm_rope(at::Tensor const& q, at::Tensor const& k, at::Tensor const& v,
                  std::optional<at::Tensor> const& q_norm_weight, std::optional<at::Tensor> const& k_norm_weight,
                  double eps, at::Tensor const& cos, at::Tensor const& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                  at::Tensor const& cache_positions, at::Tensor& q_out) {
  TORCH_CHECK(q.is_cuda(), "omni::qk_norm_rope: q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "omni::qk_norm_rope: dtype must be float32, float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.dim() == 4, "omni::qk_norm_rope: q must be (B, T, Hq, D), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "omni::qk_norm_rope: k must be (B, T, Hkv, D), got shape ", k.sizes());
  int64_t const B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3), Hkv = k.size(2);
  TORCH_CHECK(D > 0 && D % 2 == 0, "omni::qk_norm_rope: head_dim must be even (rotate-half), got ", D);
  TORCH_CHECK(Hq + Hkv <= 65535, "omni::qk_norm_rope: at most 65535 query + key heads, got ", Hq + Hkv);
  TORCH_CHECK(B * T <= INT_MAX, "omni::qk_norm_rope: at most 2^31 - 1 tokens (B * T), got ", B * T);
  CheckTensor(q, "q", q, {B, T, Hq, D});
  CheckTensor(k, "k", q, {B, T, Hkv, D});
  CheckTensor(v, "v", q, {B, T, Hkv, D});
  TORCH_CHECK(q_norm_weight.has_value() == k_norm_weight.has_value(),
              "omni::qk_norm_rope: pass both norm weights or neither");
  if (q_norm_weight) {
    CheckTensor(*q_norm_weight, "q_norm_weight", q, {D});
    CheckTensor(*k_norm_weight, "k_norm_weight", q, {D});
  }
  TORCH_CHECK(cos.dim() == 3 && (cos.size(0) == B || cos.size(0) == 1),
              "omni::qk_norm_rope: cos must be (B or 1, T, D) = (", B, ", ", T, ", ", D, "), got ", cos.sizes());
  CheckTensor(cos, "cos", q, {cos.size(0), T, D});
  TORCH_CHECK(sin.dim() == 3 && (sin.size(0) == B || sin.size(0) == 1),
              "omni::qk_norm_rope: sin must be (B or 1, T, D) = (", B, ", ", T, ", ", D, "), got ", sin.sizes());
  CheckTensor(sin, "sin", q, {sin.size(0), T, D});
  TORCH_CHECK(k_cache.dim() == 4, "omni::qk_norm_rope: k_cache must be (B, Hkv, S, D), got shape ", k_cache.sizes());
  int64_t const S = k_cache.size(2);
  CheckTensor(k_cache, "k_cache", q, {B, Hkv, S, D});
  CheckTensor(v_cache, "v_cache", q, {B, Hkv, S, D});
  CheckTensor(q_out, "q_out", q, {B, Hq, T, D});
  for (auto const& [in, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}})
    omni::CheckNoOverlap("omni::qk_norm_rope: ", q_out, "q_out", *in, name);
  TORCH_CHECK(cache_positions.device() == q.device(), "omni::qk_norm_rope: cache_positions must be on ", q.device(),
              ", got ", cache_positions.device());
  TORCH_CHECK(cache_positions.scalar_type() == at::kLong || cache_positions.scalar_type() == at::kInt,
              "omni::qk_norm_rope: cache_positions must be int64 or int32, got ", cache_positions.scalar_type());
  TORCH_CHECK((cache_positions.dim() == 1 && cache_positions.size(0) == T) ||
                  (cache_positions.dim() == 2 && cache_positions.size(0) == B && cache_positions.size(1) == T),
              "omni::qk_norm_rope: cache_positions must have shape (", T, ",) or (", B, ", ", T, "), got ",
              cache_positions.sizes());
  TORCH_CHECK(cache_positions.stride(-1) == 1 || T == 1, "omni::qk_norm_rope: cache_positions must be contiguous");
  if (B * T == 0) return;

  c10::cuda::CUDAGuard const guard(q.device());
  switch (q.scalar_type()) {
    case at::kFloat:
      return Launch<float>(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache, cache_positions,
                           q_out);
    case at::kHalf:
      return Launch<__half>(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache, cache_positions,
                            q_out);
    default:
      return Launch<__nv_bfloat16>(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache,
                                   cache_positions, q_out);
  }
}
