// What the CPU twins share: a Qwen3 decoder layer's pieces on a few fp32 rows.
//
// Projections are at::mm calls on the model's own weights: the reference's GEMMs, bit for bit, at BLAS speed.
// Between them everything runs as loops over rows, rounding as the reference does where an element sees one
// operation (products, sums of two, the rotation, 1 / sqrt); reductions (norm statistics, attention scores, softmax
// sums) run sequentially where ATen vectorises, so results agree with the reference to a few fp32 ulps.
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace omni::cpu {

// y = w * (x * (1 / sqrt(mean(x^2) + eps))) over one row of n (the reference's rms_norm at fp32).
inline void rms_norm_row(const float* x, const float* w, int64_t n, float eps, float* y) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  const float rstd = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * rstd);
}

inline void rms_norm_rows(const at::Tensor& x, const at::Tensor& w, float eps, at::Tensor& y) {
  const int64_t n = x.size(1);
  for (int64_t i = 0; i < x.size(0); ++i)
    rms_norm_row(x.data_ptr<float>() + i * n, w.data_ptr<float>(), n, eps, y.data_ptr<float>() + i * n);
}

// In place: per-head RMSNorm, then rotate-half RoPE: x[d] cos[d] + rot(x)[d] sin[d].
inline void norm_rope_head(float* x, const float* w, const float* cos, const float* sin, int64_t d, float eps,
                           float* scratch) {
  rms_norm_row(x, w, d, eps, scratch);
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) {
    const float rotated = i < half ? -scratch[i + half] : scratch[i - half];
    x[i] = scratch[i] * cos[i] + rotated * sin[i];
  }
}

// x @ w^T for x [t, in], w [out, in]: the reference's F.linear on the same operands.
inline at::Tensor project(const at::Tensor& x, const at::Tensor& w) { return at::mm(x, w.t()); }

// In place over n elements: gate = silu(gate) * up.
inline void silu_mul(float* gate, const float* up, int64_t n) {
  for (int64_t e = 0; e < n; ++e) gate[e] = gate[e] / (1.f + std::exp(-gate[e])) * up[e];
}

inline int64_t argmax_row(const float* x, int64_t n) {
  int64_t best = 0;  // first maximum; a NaN wins, as in torch.argmax
  for (int64_t i = 1; i < n && !std::isnan(x[best]); ++i)
    if (x[i] > x[best] || std::isnan(x[i])) best = i;
  return best;
}

struct AttentionShape {
  int64_t heads, kv_heads, head_dim, slots;  // slots: the cache's length axis (its stride in positions)
};

// From this many cached keys on, a decode step's attention runs its two products through at::mm.
constexpr int64_t kLongContext = 128;

// One query row per head (q [1, heads * D], rotated) over `keys` cached slots: per KV head, the scores of its query
// group [group, keys] = Q K^T, a softmax per row, and P V [group, D] into attn [1, heads * D].
inline void attend_long(const at::Tensor& q, float* k_cache, float* v_cache, const AttentionShape& s, int64_t keys,
                        float scale, at::Tensor& attn) {
  const int64_t group = s.heads / s.kv_heads, d = s.head_dim;
  const auto options = q.options();
  for (int64_t hk = 0; hk < s.kv_heads; ++hk) {
    const at::Tensor k = at::from_blob(k_cache + hk * s.slots * d, {keys, d}, options);
    const at::Tensor v = at::from_blob(v_cache + hk * s.slots * d, {keys, d}, options);
    at::Tensor scores = at::mm(q.view({s.heads, d}).narrow(0, hk * group, group), k.t());   // [group, keys]
    float* rows = scores.data_ptr<float>();
    for (int64_t r = 0; r < group; ++r) {
      float* row = rows + r * keys;
      float best = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < keys; ++j) best = std::max(best, row[j] *= scale);
      float total = 0.f;
      for (int64_t j = 0; j < keys; ++j) total += (row[j] = std::exp(row[j] - best));
      for (int64_t j = 0; j < keys; ++j) row[j] /= total;
    }
    at::Tensor out = attn.view({s.heads, d}).narrow(0, hk * group, group);
    at::mm_out(out, scores, v);
  }
}

// The attention half of a layer, the weights in checkpoint order (norms contiguous).
struct AttentionWeights {
  at::Tensor input_norm, q, k, v, o, q_norm, k_norm;
};

// x [t, H] += o_proj(attention(input_norm(x))) for t new tokens in cache slots [first, first + t); each attends
// causally to slots [0, its own]. Caches: [kv_heads, slots, D] fp32; cos/sin: [t, D] rows of the new tokens.
// h: [t, H] and attn: [t, heads * D] scratch.
inline void attention_block(at::Tensor& x, const AttentionWeights& w, float* k_cache, float* v_cache,
                            const AttentionShape& s, int64_t first, const float* cos, const float* sin, float eps,
                            at::Tensor& h, at::Tensor& attn) {
  const int64_t t = x.size(0), d = s.head_dim, group = s.heads / s.kv_heads;
  rms_norm_rows(x, w.input_norm, eps, h);
  at::Tensor q = project(h, w.q), k = project(h, w.k), v = project(h, w.v);   // [t, heads * D]
  std::vector<float> scratch(d), scores(first + t);
  for (int64_t i = 0; i < t; ++i) {
    const int64_t slot = first + i;
    for (int64_t hq = 0; hq < s.heads; ++hq)
      norm_rope_head(q.data_ptr<float>() + (i * s.heads + hq) * d, w.q_norm.data_ptr<float>(), cos + i * d,
                     sin + i * d, d, eps, scratch.data());
    for (int64_t hk = 0; hk < s.kv_heads; ++hk) {
      float* kr = k.data_ptr<float>() + (i * s.kv_heads + hk) * d;
      norm_rope_head(kr, w.k_norm.data_ptr<float>(), cos + i * d, sin + i * d, d, eps, scratch.data());
      std::copy_n(kr, d, k_cache + (hk * s.slots + slot) * d);
      std::copy_n(v.data_ptr<float>() + (i * s.kv_heads + hk) * d, d, v_cache + (hk * s.slots + slot) * d);
    }
  }
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  if (t == 1 && first + 1 >= kLongContext) {   // a long cache: scores and the weighted sum as GEMMs per KV head
    attend_long(q, k_cache, v_cache, s, first + 1, scale, attn);
    x.add_(project(attn, w.o));
    return;
  }
  for (int64_t i = 0; i < t; ++i) {
    const int64_t keys = first + i + 1;
    for (int64_t hq = 0; hq < s.heads; ++hq) {
      const float* qh = q.data_ptr<float>() + (i * s.heads + hq) * d;
      const float* kh = k_cache + (hq / group) * s.slots * d;
      const float* vh = v_cache + (hq / group) * s.slots * d;
      float best = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < keys; ++j) {
        float dot = 0.f;
        for (int64_t e = 0; e < d; ++e) dot += qh[e] * kh[j * d + e];
        scores[j] = dot * scale;
        best = std::max(best, scores[j]);
      }
      float total = 0.f;
      for (int64_t j = 0; j < keys; ++j) total += (scores[j] = std::exp(scores[j] - best));
      float* oh = attn.data_ptr<float>() + (i * s.heads + hq) * d;
      std::fill(oh, oh + d, 0.f);
      for (int64_t j = 0; j < keys; ++j) {
        const float p = scores[j] / total;
        for (int64_t e = 0; e < d; ++e) oh[e] += p * vh[j * d + e];
      }
    }
  }
  x.add_(project(attn, w.o));
}

// out [t, H] = down(silu(gate(h)) * up(h)).
inline at::Tensor dense_mlp(const at::Tensor& h, const at::Tensor& gate, const at::Tensor& up,
                            const at::Tensor& down) {
  at::Tensor g = project(h, gate), u = project(h, up);
  silu_mul(g.data_ptr<float>(), u.data_ptr<float>(), g.numel());
  return project(g, down);
}

inline void check_fp32(const char* op, const at::Tensor& t, at::IntArrayRef shape, const char* what) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", what, " must be ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), op, ": ", what,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

}  // namespace omni::cpu
