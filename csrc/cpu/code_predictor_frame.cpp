// The CPU twin of the code predictor's CUDA-graph frame: the 15 dependent steps that turn the talker's hidden state
// and codebook-0 code into codebooks 1..15, in one call.
//
// On a GPU the frame replays a captured graph; on a CPU the same frame from Python is ~3000 tiny ATen calls
// (hidden 48 in the test model: ~0.75 ms a step of dispatch, microseconds of arithmetic). Here it is the layer
// pieces of decoder_rows.h over a frame-local cache; sampled steps call the same ATen ops, in the same order, as
// omni_kernels.sampling.sample_ref. fp32 only: other dtypes take the Python frame.
//
// Layout: prefix [2, H] (talker hidden state, codebook-0 embedding); 11 weights per layer (DecoderLayerWeights'
// first 11: attention, dense MLP); embeddings/heads: Q-1 tables [V, H]; cos/sin [Q, D] for positions 0..Q-1.
// Writes codes [Q-1] (int64) and the sum of the frame's Q code embeddings [H] (the talker's next input before text
// conditioning).
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/multinomial.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/topk.h>

#include <optional>

#include "decoder_rows.h"

namespace {

using namespace omni::cpu;

constexpr const char* kOp = "code_predictor_frame";

constexpr int kWeightsPerLayer = 11;
enum LayerWeight { kInputNorm, kQ, kK, kV, kO, kQNorm, kKNorm, kPostNorm, kGate, kUp, kDown };

// The reference sampler's order: temperature, top-k, top-p, then a draw (logits [1, V]).
int64_t sample(at::Tensor logits, double temperature, int64_t top_k, double top_p,
               const std::optional<at::Generator>& generator) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  logits = logits / temperature;
  if (top_k > 0) {
    const int64_t k = std::min<int64_t>(top_k, logits.size(-1));
    const at::Tensor kth = std::get<0>(at::topk(logits, k, -1)).narrow(-1, k - 1, 1);
    logits = logits.masked_fill(logits < kth, kNegInf);
  }
  if (top_p < 1.0) {
    auto [sorted, order] = at::sort(logits, -1, /*descending=*/false);
    at::Tensor drop = at::cumsum(at::softmax(sorted, -1), -1) <= (1.0 - top_p);
    drop.narrow(-1, drop.size(-1) - 1, 1).fill_(false);
    logits = logits.masked_fill(drop.scatter(-1, order, drop), kNegInf);
  }
  return at::multinomial(at::softmax(logits, -1), 1, false, generator).item<int64_t>();
}

}  // namespace

void code_predictor_frame(at::Tensor const& prefix, at::TensorList layers, at::Tensor const& final_norm,
                          at::TensorList embeddings, at::TensorList heads, at::Tensor const& cos,
                          at::Tensor const& sin, int64_t num_heads, int64_t num_kv_heads, double eps,
                          double temperature, int64_t top_k, double top_p,
                          std::optional<at::Generator> generator, at::Tensor& codes, at::Tensor& embed_sum) {
  TORCH_CHECK(prefix.dim() == 2 && prefix.size(0) == 2, kOp, ": prefix must be [2, hidden], got ",
              prefix.sizes());
  const int64_t hidden = prefix.size(1), groups = static_cast<int64_t>(embeddings.size());
  TORCH_CHECK(!layers.empty() && layers.size() % kWeightsPerLayer == 0, kOp, ": layers must hold ",
              kWeightsPerLayer, " weights per layer, got ", layers.size());
  TORCH_CHECK(groups >= 1 && static_cast<int64_t>(heads.size()) == groups,
              kOp, ": one head per embedding table, got ", heads.size(), " heads and ", groups,
              " tables");
  TORCH_CHECK(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0,
              kOp, ": heads (", num_heads, ") must be a multiple of kv heads (", num_kv_heads, ")");
  const int64_t head_dim = layers[kQNorm].numel(), inter = layers[kGate].size(0);
  const int64_t slots = groups + 1, vocab = embeddings[0].size(0);
  TORCH_CHECK(head_dim % 2 == 0, kOp, ": head_dim must be even, got ", head_dim);
  TORCH_CHECK(!(temperature < 0.0), kOp, ": temperature must be >= 0, got ", temperature);
  check_fp32(kOp, prefix, {2, hidden}, "prefix");
  check_fp32(kOp, cos, {slots, head_dim}, "cos");
  check_fp32(kOp, sin, {slots, head_dim}, "sin");
  check_fp32(kOp, final_norm, {hidden}, "final_norm");
  for (size_t l = 0; l < layers.size(); l += kWeightsPerLayer) {
    const at::TensorList w = layers.slice(l, kWeightsPerLayer);
    check_fp32(kOp, w[kInputNorm], {hidden}, "input_norm");
    check_fp32(kOp, w[kQ], {num_heads * head_dim, hidden}, "q_proj");
    check_fp32(kOp, w[kK], {num_kv_heads * head_dim, hidden}, "k_proj");
    check_fp32(kOp, w[kV], {num_kv_heads * head_dim, hidden}, "v_proj");
    check_fp32(kOp, w[kO], {hidden, num_heads * head_dim}, "o_proj");
    check_fp32(kOp, w[kQNorm], {head_dim}, "q_norm");
    check_fp32(kOp, w[kKNorm], {head_dim}, "k_norm");
    check_fp32(kOp, w[kPostNorm], {hidden}, "post_attention_norm");
    check_fp32(kOp, w[kGate], {inter, hidden}, "gate_proj");
    check_fp32(kOp, w[kUp], {inter, hidden}, "up_proj");
    check_fp32(kOp, w[kDown], {hidden, inter}, "down_proj");
  }
  for (int64_t g = 0; g < groups; ++g) {
    check_fp32(kOp, embeddings[g], {vocab, hidden}, "embedding");
    check_fp32(kOp, heads[g], {vocab, hidden}, "lm_head");
  }
  TORCH_CHECK(codes.dim() == 1 && codes.size(0) == groups && codes.scalar_type() == at::kLong &&
                  codes.is_contiguous() && codes.device().is_cpu(),
              kOp, ": codes must be a contiguous int64 CPU [", groups, "], got ", codes.sizes(), " ",
              codes.scalar_type());
  check_fp32(kOp, embed_sum, {hidden}, "embed_sum");
  TORCH_CHECK(embed_sum.is_contiguous(), kOp, ": embed_sum must be contiguous");

  // Rows the loops read through raw pointers, made contiguous once (a no-op for the model's own parameters).
  const int64_t num_layers = static_cast<int64_t>(layers.size()) / kWeightsPerLayer;
  std::vector<AttentionWeights> attention;
  std::vector<at::Tensor> post_norms;
  for (int64_t l = 0; l < num_layers; ++l) {
    const at::TensorList w = layers.slice(l * kWeightsPerLayer, kWeightsPerLayer);
    attention.push_back({w[kInputNorm].contiguous(), w[kQ], w[kK], w[kV], w[kO], w[kQNorm].contiguous(),
                         w[kKNorm].contiguous()});
    post_norms.push_back(w[kPostNorm].contiguous());
  }
  const at::Tensor norm_out = final_norm.contiguous(), cos_c = cos.contiguous(), sin_c = sin.contiguous();

  // Frame-local state: [layers, kv_heads, slots, D] caches, the residual stream and scratch rows.
  const AttentionShape shape{num_heads, num_kv_heads, head_dim, slots};
  const int64_t cache_size = num_kv_heads * slots * head_dim;
  std::vector<float> k_cache(num_layers * cache_size), v_cache(k_cache.size());
  const float feps = static_cast<float>(eps);
  at::Tensor x = prefix.contiguous().clone();                       // [t, H] residual stream
  at::Tensor normed = at::empty({2, hidden}, prefix.options());
  at::Tensor attn = at::empty({2, num_heads * head_dim}, prefix.options());
  float* sum = embed_sum.data_ptr<float>();
  std::copy_n(x.data_ptr<float>() + hidden, hidden, sum);          // codebook 0's embedding
  int64_t* out_codes = codes.data_ptr<int64_t>();

  for (int64_t g = 0, first = 0, t = 2; g < groups; ++g, first += t, t = 1) {   // t: new positions this step
    at::Tensor h = normed.narrow(0, 0, t), a = attn.narrow(0, 0, t);
    for (int64_t l = 0; l < num_layers; ++l) {
      const at::TensorList w = layers.slice(l * kWeightsPerLayer, kWeightsPerLayer);
      attention_block(x, attention[l], k_cache.data() + l * cache_size, v_cache.data() + l * cache_size, shape,
                      first, cos_c.data_ptr<float>() + first * head_dim, sin_c.data_ptr<float>() + first * head_dim,
                      feps, h, a);
      rms_norm_rows(x, post_norms[l], feps, h);
      x.add_(dense_mlp(h, w[kGate], w[kUp], w[kDown]));
    }
    // every row through the norm and head, as the reference does (a GEMM's bits depend on its row count)
    rms_norm_rows(x, norm_out, feps, h);
    at::Tensor logits = project(h, heads[g]).narrow(0, t - 1, 1);                     // [1, V]
    const int64_t code = temperature == 0.0 ? argmax_row(logits.data_ptr<float>(), vocab)
                                            : sample(logits, temperature, top_k, top_p, generator);
    TORCH_CHECK(code >= 0 && code < vocab, kOp, ": sampled code ", code, " outside [0, ", vocab, ")");
    out_codes[g] = code;
    x = embeddings[g].narrow(0, code, 1).clone();                                     // [1, H]
    const float* e = x.data_ptr<float>();
    for (int64_t i = 0; i < hidden; ++i) sum[i] += e[i];
  }
}
