// Torch launcher for omni::DecodeAttention: checks every argument, passes strides (no copies) and launches on the
// current stream so CUDA-graph capture sees both kernels. The workspaces come from the Python launcher with
// shape-derived sizes; their split dimension sets the split count.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <cstdint>
#include <optional>

#include <omni/decode_attention.cuh>
#include "launch_check.h"

namespace {

constexpr char const* kOp = "omni::decode_attention: ";

template <typename T>
void Launch(at::Tensor const& q, at::Tensor const& k, at::Tensor const& v, at::Tensor const& seq_lens, double scale,
            int window, at::Tensor& partial_out, at::Tensor& partial_lse, at::Tensor& out) {
  omni::DecodeAttentionParams<T> p{};
  p.q = reinterpret_cast<T const*>(q.const_data_ptr());
  p.k = reinterpret_cast<T const*>(k.const_data_ptr());
  p.v = reinterpret_cast<T const*>(v.const_data_ptr());
  p.seq_lens = seq_lens.const_data_ptr();
  p.lens64 = seq_lens.scalar_type() == at::kLong;
  p.out = reinterpret_cast<T*>(out.mutable_data_ptr());
  p.partial_out = partial_out.mutable_data_ptr<float>();
  p.partial_lse = partial_lse.mutable_data_ptr<float>();
  for (int i = 0; i < 4; ++i) p.q_stride[i] = q.stride(i), p.out_stride[i] = out.stride(i);
  for (int i = 0; i < 3; ++i) p.k_stride[i] = k.stride(i), p.v_stride[i] = v.stride(i);
  p.batch = static_cast<int>(q.size(0));
  p.kv_heads = static_cast<int>(k.size(1));
  p.q_len = static_cast<int>(q.size(2));
  p.groups = static_cast<int>(q.size(1) / k.size(1));
  p.cache_len = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(q.size(3));
  p.num_splits = static_cast<int>(partial_lse.size(1));
  p.window = window;
  p.qk_scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  cudaError_t const err = omni::DecodeAttention<T>(p, c10::cuda::getCurrentCUDAStream().stream());
  omni::CheckLaunch(err, kOp);
}

// K/V rows are copied as 16-byte chunks: every row start must be 16-byte aligned.
void CheckCache(at::Tensor const& c, char const* name, int64_t vec) {
  TORCH_CHECK(c.stride(3) == 1, kOp, name, " must be contiguous in head_dim, got strides ", c.strides());
  for (int i = 0; i < 3; ++i)
    TORCH_CHECK(c.stride(i) % vec == 0, kOp, name, " strides must be multiples of ", vec,
                " elements (16-byte rows), got ", c.strides());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 == 0, kOp, name,
              " must start on a 16-byte boundary");
}

}  // namespace

// q: (B, Hq, Tq, D); k_cache, v_cache: (B, Hkv, S, D); seq_lens: (B,) int32/int64; out: like q.
// partial_out: (B * Hkv, splits, Hq / Hkv * Tq, D) fp32, partial_lse: (B * Hkv, splits, Hq / Hkv * Tq) fp32.
void decode_attention(at::Tensor const& q, at::Tensor const& k_cache, at::Tensor const& v_cache,
                      at::Tensor const& seq_lens, double scale, std::optional<int64_t> window,
                      at::Tensor& partial_out, at::Tensor& partial_lse, at::Tensor& out) {
  TORCH_CHECK(q.is_cuda(), kOp, "q must be a CUDA tensor, got ", q.device());
  for (at::Tensor const* t : std::initializer_list<at::Tensor const*>{&k_cache, &v_cache, &seq_lens, &partial_out,
                                                                        &partial_lse, &out})
    TORCH_CHECK(t->device() == q.device(), kOp, "all tensors must be on ", q.device(), ", got ", t->device());
  TORCH_CHECK(q.dim() == 4, kOp, "q must be (B, Hq, Tq, D), got shape ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), kOp,
              "k_cache and v_cache must both be (B, Hkv, S, D), got ", k_cache.sizes(), " and ", v_cache.sizes());
  int64_t const B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3);
  int64_t const Hkv = k_cache.size(1), S = k_cache.size(2);
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(3) == D && Hkv > 0 && Hq % Hkv == 0 && Tq <= S, kOp,
              "q ", q.sizes(), " does not fit the caches ", k_cache.sizes());
  auto const dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, kOp,
              "dtype must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype && out.scalar_type() == dtype, kOp,
              "q, caches and out must have one dtype, got ", dtype, ", ", k_cache.scalar_type(), ", ",
              v_cache.scalar_type(), ", ", out.scalar_type());
  TORCH_CHECK(out.sizes() == q.sizes(), kOp, "out must have the shape of q ", q.sizes(), ", got ", out.sizes());
  int64_t const vec = 16 / q.element_size();
  TORCH_CHECK(D >= 1 && D <= omni::kDecodeMaxHeadDim && D % vec == 0, kOp, "head_dim must be a multiple of ", vec,
              " (16 bytes) and at most ", omni::kDecodeMaxHeadDim, ", got ", D);
  int64_t const rows = Hq / std::max<int64_t>(Hkv, 1) * Tq;
  TORCH_CHECK(rows <= omni::kDecodeMaxRows, kOp, "Hq / Hkv x Tq (query rows per KV head) must be at most ",
              omni::kDecodeMaxRows, ", got ", rows);
  TORCH_CHECK(S <= INT32_MAX && B * Hkv <= INT32_MAX, kOp, "cache ", k_cache.sizes(), " too large");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == B, kOp, "seq_lens must have shape (", B, ",), got ",
              seq_lens.sizes());
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt || seq_lens.scalar_type() == at::kLong, kOp,
              "seq_lens must be int32 or int64, got ", seq_lens.scalar_type());
  TORCH_CHECK(seq_lens.stride(0) == 1 || B == 1, kOp, "seq_lens must be contiguous");
  TORCH_CHECK(!window.has_value() || (*window >= 1 && *window <= INT32_MAX), kOp, "window must be >= 1, got ",
              window.value_or(0));
  TORCH_CHECK(std::isfinite(scale), kOp, "scale must be finite, got ", scale);
  TORCH_CHECK(partial_lse.scalar_type() == at::kFloat && partial_out.scalar_type() == at::kFloat, kOp,
              "partial_out and partial_lse must be float32");
  TORCH_CHECK(partial_lse.dim() == 3 && partial_lse.size(0) == B * Hkv && partial_lse.size(2) == rows, kOp,
              "partial_lse must be (B * Hkv, splits, rows) = (", B * Hkv, ", splits, ", rows, "), got ",
              partial_lse.sizes());
  int64_t const splits = partial_lse.size(1);
  TORCH_CHECK(splits >= 1 && splits <= omni::kDecodeMaxSplits, kOp, "splits must be in [1, ",
              omni::kDecodeMaxSplits, "], got ", splits);
  TORCH_CHECK(partial_out.dim() == 4 && partial_out.size(0) == B * Hkv && partial_out.size(1) == splits &&
                  partial_out.size(2) == rows && partial_out.size(3) == D,
              kOp, "partial_out must be (", B * Hkv, ", ", splits, ", ", rows, ", ", D, "), got ", partial_out.sizes());
  TORCH_CHECK(partial_out.is_contiguous() && partial_lse.is_contiguous(), kOp,
              "partial_out and partial_lse must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(partial_out.const_data_ptr()) % 16 == 0, kOp,
              "partial_out must start on a 16-byte boundary");
  if (q.numel() == 0) return;
  CheckCache(k_cache, "k_cache", vec);
  CheckCache(v_cache, "v_cache", vec);

  c10::cuda::CUDAGuard const guard(q.device());
  int const w = window.has_value() ? static_cast<int>(*window) : 0;
  switch (dtype) {
    case at::kFloat: return Launch<float>(q, k_cache, v_cache, seq_lens, scale, w, partial_out, partial_lse, out);
    case at::kHalf: return Launch<__half>(q, k_cache, v_cache, seq_lens, scale, w, partial_out, partial_lse, out);
    case at::kBFloat16:
      return Launch<__nv_bfloat16>(q, k_cache, v_cache, seq_lens, scale, w, partial_out, partial_lse, out);
    default: TORCH_CHECK(false, kOp, "unreachable dtype ", dtype);
  }
}
