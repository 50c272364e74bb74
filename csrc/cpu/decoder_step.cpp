// The CPU twin of a graph-captured decode step: one token of each of B sequences through every layer of a Qwen3
// decoder (the talker's MoE with its shared expert, the thinker's MoE or dense layers) over its static KV cache, the
// final norm and the head. Each sequence's attention and experts run on its own row, as a step of batch 1 does; the
// final head is one GEMM over the B rows (its weights, the largest, read once).
//
// From Python a talker step on a CPU is ~700 small ATen calls (~1.3 ms on the test model, ~0.1 ms of arithmetic);
// here it is the layer pieces of decoder_rows.h plus the MoE: the router's softmax and top-k are ATen calls (the
// reference's routing decisions, bit for bit), each chosen expert a pair of at::mm calls on its own weights, the
// weighted rows summed in rank order as the reference's sum over top-k does. fp32 only.
//
// Layout: x [B, H] (the step's input embeddings); 18 optional weights per layer (see omni_kernels/decoder_step.py):
// attention (8), dense MLP (3) or MoE (router, experts' gate_up [E, 2I, H], down [E, H, I]) and shared expert (4);
// kv_cache [2, layers, Bc >= B, kv_heads, S, D] (k then v): row b's token goes to slots[b] of cache row b and attends
// to its slots [0, slots[b]]; cos/sin [B, D] are the rows' rotary rows. Writes the post-norm hidden states [B, H] and
// the head's logits [B, V].
#include <ATen/core/List.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/topk.h>
#include <ATen/ops/zeros.h>

#include <optional>

#include "decoder_rows.h"

namespace {

using namespace omni::cpu;

constexpr const char* kOp = "decoder_step";
constexpr int kWeightsPerLayer = 18;
enum LayerWeight {
  kInputNorm, kQ, kK, kV, kO, kQNorm, kKNorm, kPostNorm,
  kDenseGate, kDenseUp, kDenseDown,
  kRouter, kExpertsGateUp, kExpertsDown,
  kSharedGate, kSharedUp, kSharedDown, kSharedExpertGate,
};

const at::Tensor& need(const std::optional<at::Tensor>& t, int64_t layer, const char* what) {
  TORCH_CHECK(t.has_value(), kOp, ": layer ", layer, " lacks ", what);
  return *t;
}

// Routed experts for one token h [1, H]: softmax(h Wr^T) in fp32, top-k (renormalised when asked), then
// sum_k w_k * down_e(silu(gate_e h) * up_e h) in rank order.
at::Tensor routed_experts(const at::Tensor& h, const at::Tensor& router, const at::Tensor& gate_up,
                          const at::Tensor& down, int64_t top_k, bool renormalize) {
  auto [weights, ids] = at::topk(at::softmax(project(h, router), -1, at::kFloat), top_k, -1);
  if (renormalize) weights = weights / at::sum(weights, {-1}, /*keepdim=*/true);
  const int64_t inter = down.size(2), hidden = h.size(1);
  at::Tensor out = at::zeros({1, hidden}, h.options());
  float* acc = out.data_ptr<float>();
  for (int64_t k = 0; k < top_k; ++k) {
    const int64_t e = ids.select(1, k).item<int64_t>();
    const float w = weights.select(1, k).item<float>();
    at::Tensor gu = project(h, gate_up.select(0, e));                                   // [1, 2I]: gate, up
    silu_mul(gu.data_ptr<float>(), gu.data_ptr<float>() + inter, inter);
    at::Tensor row = project(gu.narrow(1, 0, inter), down.select(0, e));                 // [1, H]
    const float* r = row.data_ptr<float>();
    for (int64_t i = 0; i < hidden; ++i) acc[i] += r[i] * w;
  }
  return out;
}

void check_layer(at::ArrayRef<std::optional<at::Tensor>> w, int64_t l, int64_t hidden, int64_t heads,
                 int64_t kv_heads, int64_t head_dim, int64_t top_k) {
  check_fp32(kOp, need(w[kInputNorm], l, "input_norm"), {hidden}, "input_norm");
  check_fp32(kOp, need(w[kQ], l, "q_proj"), {heads * head_dim, hidden}, "q_proj");
  check_fp32(kOp, need(w[kK], l, "k_proj"), {kv_heads * head_dim, hidden}, "k_proj");
  check_fp32(kOp, need(w[kV], l, "v_proj"), {kv_heads * head_dim, hidden}, "v_proj");
  check_fp32(kOp, need(w[kO], l, "o_proj"), {hidden, heads * head_dim}, "o_proj");
  check_fp32(kOp, need(w[kQNorm], l, "q_norm"), {head_dim}, "q_norm");
  check_fp32(kOp, need(w[kKNorm], l, "k_norm"), {head_dim}, "k_norm");
  check_fp32(kOp, need(w[kPostNorm], l, "post_attention_norm"), {hidden}, "post_attention_norm");
  const bool dense = w[kDenseGate].has_value(), moe = w[kRouter].has_value();
  TORCH_CHECK(dense != moe, kOp, ": layer ", l, " must have either a dense MLP or a router");
  if (dense) {
    const int64_t inter = need(w[kDenseGate], l, "gate_proj").size(0);
    check_fp32(kOp, *w[kDenseGate], {inter, hidden}, "gate_proj");
    check_fp32(kOp, need(w[kDenseUp], l, "up_proj"), {inter, hidden}, "up_proj");
    check_fp32(kOp, need(w[kDenseDown], l, "down_proj"), {hidden, inter}, "down_proj");
    return;
  }
  const int64_t experts = w[kRouter]->size(0);
  const int64_t inter = need(w[kExpertsDown], l, "experts.down_proj").size(-1);
  check_fp32(kOp, *w[kRouter], {experts, hidden}, "router");
  check_fp32(kOp, need(w[kExpertsGateUp], l, "experts.gate_up_proj"), {experts, 2 * inter, hidden},
             "experts.gate_up_proj");
  check_fp32(kOp, *w[kExpertsDown], {experts, hidden, inter}, "experts.down_proj");
  TORCH_CHECK(top_k >= 1 && top_k <= experts, kOp, ": top_k ", top_k, " outside [1, ", experts, "]");
  if (w[kSharedGate].has_value()) {
    const int64_t shared = w[kSharedGate]->size(0);
    check_fp32(kOp, *w[kSharedGate], {shared, hidden}, "shared_expert.gate_proj");
    check_fp32(kOp, need(w[kSharedUp], l, "shared_expert.up_proj"), {shared, hidden}, "shared_expert.up_proj");
    check_fp32(kOp, need(w[kSharedDown], l, "shared_expert.down_proj"), {hidden, shared},
               "shared_expert.down_proj");
    check_fp32(kOp, need(w[kSharedExpertGate], l, "shared_expert_gate"), {1, hidden}, "shared_expert_gate");
  }
}

}  // namespace

void decoder_step(at::Tensor const& x, c10::List<std::optional<at::Tensor>> const& layer_list,
                  at::Tensor const& final_norm, at::Tensor const& head, at::Tensor& kv_cache,
                  at::Tensor const& slots, at::Tensor const& cos, at::Tensor const& sin, int64_t num_heads,
                  int64_t num_kv_heads, int64_t top_k, bool renormalize, double eps, at::Tensor& hidden_out,
                  at::Tensor& logits_out) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1, kOp, ": x must be [rows, hidden], got ", x.sizes());
  const std::vector<std::optional<at::Tensor>> layer_vec(layer_list.begin(), layer_list.end());
  const at::ArrayRef<std::optional<at::Tensor>> layers(layer_vec);
  TORCH_CHECK(!layers.empty() && layers.size() % kWeightsPerLayer == 0, kOp, ": layers must hold ",
              kWeightsPerLayer, " entries per layer, got ", layers.size());
  TORCH_CHECK(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0, kOp, ": heads (", num_heads,
              ") must be a multiple of kv heads (", num_kv_heads, ")");
  const int64_t rows = x.size(0), hidden = x.size(1);
  const int64_t num_layers = static_cast<int64_t>(layers.size()) / kWeightsPerLayer;
  TORCH_CHECK(kv_cache.dim() == 6 && kv_cache.size(0) == 2 && kv_cache.size(1) == num_layers &&
                  kv_cache.size(2) >= rows && kv_cache.size(3) == num_kv_heads && kv_cache.is_contiguous() &&
                  kv_cache.scalar_type() == at::kFloat && kv_cache.device().is_cpu(),
              kOp, ": kv_cache must be a contiguous float32 CPU [2, ", num_layers, ", >= ", rows, ", ", num_kv_heads,
              ", S, D], got ", kv_cache.sizes(), " ", kv_cache.scalar_type());
  const int64_t cache_rows = kv_cache.size(2), positions = kv_cache.size(4), head_dim = kv_cache.size(5);
  const int64_t vocab = head.size(0);
  TORCH_CHECK(head_dim % 2 == 0, kOp, ": head_dim must be even, got ", head_dim);
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == rows && slots.scalar_type() == at::kLong && slots.device().is_cpu(),
              kOp, ": slots must be an int64 CPU [", rows, "] tensor, got ", slots.scalar_type(), " ", slots.sizes());
  const at::Tensor slots_c = slots.contiguous();
  const int64_t* slot = slots_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < rows; ++b)
    TORCH_CHECK(slot[b] >= 0 && slot[b] < positions, kOp, ": slot ", slot[b], " of row ", b, " outside the cache's ",
                positions, " positions");
  check_fp32(kOp, x, {rows, hidden}, "x");
  check_fp32(kOp, cos, {rows, head_dim}, "cos");
  check_fp32(kOp, sin, {rows, head_dim}, "sin");
  check_fp32(kOp, final_norm, {hidden}, "final_norm");
  check_fp32(kOp, head, {vocab, hidden}, "head");
  for (int64_t l = 0; l < num_layers; ++l)
    check_layer(layers.slice(l * kWeightsPerLayer, kWeightsPerLayer), l, hidden, num_heads, num_kv_heads, head_dim,
                top_k);
  check_fp32(kOp, hidden_out, {rows, hidden}, "hidden_out");
  check_fp32(kOp, logits_out, {rows, vocab}, "logits_out");
  TORCH_CHECK(hidden_out.is_contiguous() && logits_out.is_contiguous(), kOp, ": outputs must be contiguous");

  const AttentionShape shape{num_heads, num_kv_heads, head_dim, positions};
  const int64_t cache_size = num_kv_heads * positions * head_dim;   // one row of one layer
  float* k_base = kv_cache.data_ptr<float>();
  float* v_base = k_base + num_layers * cache_rows * cache_size;
  const float feps = static_cast<float>(eps);
  const at::Tensor cos_c = cos.contiguous(), sin_c = sin.contiguous();
  at::Tensor residual = x.contiguous().clone();                                       // [B, H]
  at::Tensor h = at::empty({rows, hidden}, x.options()), attn = at::empty({1, num_heads * head_dim}, x.options());
  at::Tensor h_row = at::empty({1, hidden}, x.options());
  for (int64_t l = 0; l < num_layers; ++l) {
    const auto w = layers.slice(l * kWeightsPerLayer, kWeightsPerLayer);
    const AttentionWeights attention{w[kInputNorm]->contiguous(), *w[kQ], *w[kK], *w[kV], *w[kO],
                                     w[kQNorm]->contiguous(), w[kKNorm]->contiguous()};
    for (int64_t b = 0; b < rows; ++b) {   // each row over its own cache row, at its own slot
      at::Tensor row = residual.narrow(0, b, 1);
      const int64_t offset = (l * cache_rows + b) * cache_size;
      attention_block(row, attention, k_base + offset, v_base + offset, shape, slot[b],
                      cos_c.data_ptr<float>() + b * head_dim, sin_c.data_ptr<float>() + b * head_dim, feps, h_row,
                      attn);
    }
    rms_norm_rows(residual, w[kPostNorm]->contiguous(), feps, h);
    if (w[kDenseGate].has_value()) {
      for (int64_t b = 0; b < rows; ++b)
        residual.narrow(0, b, 1).add_(dense_mlp(h.narrow(0, b, 1), *w[kDenseGate], *w[kDenseUp], *w[kDenseDown]));
      continue;
    }
    for (int64_t b = 0; b < rows; ++b) {
      const at::Tensor hb = h.narrow(0, b, 1);
      at::Tensor mlp = routed_experts(hb, *w[kRouter], *w[kExpertsGateUp], *w[kExpertsDown], top_k, renormalize);
      if (w[kSharedGate].has_value()) {   // + sigmoid(h w_g^T) * shared(h)
        at::Tensor shared = dense_mlp(hb, *w[kSharedGate], *w[kSharedUp], *w[kSharedDown]);
        const float gate = project(hb, *w[kSharedExpertGate]).item<float>();
        const float scale = 1.f / (1.f + std::exp(-gate));
        float *m = mlp.data_ptr<float>(), *s = shared.data_ptr<float>();
        for (int64_t i = 0; i < hidden; ++i) m[i] += scale * s[i];
      }
      residual.narrow(0, b, 1).add_(mlp);
    }
  }
  rms_norm_rows(residual, final_norm.contiguous(), feps, hidden_out);
  at::mm_out(logits_out, hidden_out, head.t());
}
