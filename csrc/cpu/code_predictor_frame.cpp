// The CPU twin of the code predictor's CUDA-graph frame: the 15 dependent steps that turn the talker's hidden state
// and codebook-0 code into codebooks 1..15, in one call.
//
// On a GPU the frame replays a captured graph; on a CPU the same frame from Python is ~3000 tiny ATen calls
// (hidden 48 in the test model: ~0.75 ms a step of dispatch, microseconds of arithmetic). Here the projections
// stay at::mm calls on the model's own weights (the reference's GEMM, bit for bit), and everything between them runs
// as plain loops over fp32 rows: RMSNorm, per-head q/k norm, rotate-half RoPE, causal attention over at most 16
// cached positions, SiLU-times-up, residual adds, the embedding lookup and greedy argmax. Sampled steps call the
// same ATen ops, in the same order, as omni_kernels.sampling.sample_ref.
//
// The loops round as the reference does where an element sees one operation (products, sums of two, the rotation,
// 1 / sqrt); reductions (norm statistics, attention scores, softmax sums) run sequentially where ATen vectorises,
// so hidden states agree to a few fp32 ulps, not bit for bit. fp32 only: other dtypes take the Python frame.
//
// Layout: prefix [2, H] (talker hidden state, codebook-0 embedding); 11 weights per layer in PredictorLayer order;
// embeddings/heads: Q-1 tables [V, H]; cos/sin [Q, D] for positions 0..Q-1. Writes codes [Q-1] (int64) and the sum
// of the frame's Q code embeddings [H] (the talker's next input before text conditioning).
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/argmax.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/multinomial.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/topk.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

namespace {

constexpr int kWeightsPerLayer = 11;
enum LayerWeight { kInputNorm, kQ, kK, kV, kO, kQNorm, kKNorm, kPostNorm, kGate, kUp, kDown };

// y = w * (x * (1 / sqrt(mean(x^2) + eps))) over one row of n, fp32 (the reference's rms_norm at fp32).
void rms_norm_row(const float* x, const float* w, int64_t n, float eps, float* y) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  const float rstd = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * rstd);
}

// In place: per-head RMSNorm, then rotate-half RoPE at one position: x[d] cos[d] + rot(x)[d] sin[d].
void norm_rope_head(float* x, const float* w, const float* cos, const float* sin, int64_t d, float eps,
                    float* scratch) {
  rms_norm_row(x, w, d, eps, scratch);
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) {
    const float rotated = i < half ? -scratch[i + half] : scratch[i - half];
    x[i] = scratch[i] * cos[i] + rotated * sin[i];
  }
}

struct Shapes {
  int64_t hidden, heads, kv_heads, head_dim, slots;
};

// Causal GQA attention of `t` new queries at positions [first, first + t) over cache slots [0, first + t).
// q: [t, heads * D] (rotated), caches: [kv_heads, slots, D], out: [t, heads * D].
void attend(const float* q, const float* k_cache, const float* v_cache, int64_t first, int64_t t, const Shapes& s,
            float scale, float* out, std::vector<float>& scores) {
  const int64_t group = s.heads / s.kv_heads, d = s.head_dim;
  for (int64_t i = 0; i < t; ++i) {
    const int64_t keys = first + i + 1;
    for (int64_t h = 0; h < s.heads; ++h) {
      const float* qh = q + (i * s.heads + h) * d;
      const float* kh = k_cache + (h / group) * s.slots * d;
      const float* vh = v_cache + (h / group) * s.slots * d;
      float best = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < keys; ++j) {
        float dot = 0.f;
        for (int64_t e = 0; e < d; ++e) dot += qh[e] * kh[j * d + e];
        scores[j] = dot * scale;
        best = std::max(best, scores[j]);
      }
      float total = 0.f;
      for (int64_t j = 0; j < keys; ++j) total += (scores[j] = std::exp(scores[j] - best));
      float* oh = out + (i * s.heads + h) * d;
      std::fill(oh, oh + d, 0.f);
      for (int64_t j = 0; j < keys; ++j) {
        const float p = scores[j] / total;
        for (int64_t e = 0; e < d; ++e) oh[e] += p * vh[j * d + e];
      }
    }
  }
}

// x @ w^T for x [t, in] (a view of `rows`), w [out, in]: the reference's F.linear on the same operands.
at::Tensor project(const at::Tensor& x, const at::Tensor& w) { return at::mm(x, w.t()); }

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

int64_t argmax_row(const float* x, int64_t n) {
  int64_t best = 0;  // first maximum; a NaN wins, as in torch.argmax
  for (int64_t i = 1; i < n && !std::isnan(x[best]); ++i)
    if (x[i] > x[best] || std::isnan(x[i])) best = i;
  return best;
}

void check_fp32_matrix(const at::Tensor& t, int64_t rows, int64_t cols, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "code_predictor_frame: ", what,
              " must be [", rows, ", ", cols, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), "code_predictor_frame: ", what,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

void check_fp32_vector(const at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "code_predictor_frame: ", what, " must be [", n, "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), "code_predictor_frame: ", what,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

}  // namespace

void code_predictor_frame(at::Tensor const& prefix, at::TensorList layers, at::Tensor const& final_norm,
                          at::TensorList embeddings, at::TensorList heads, at::Tensor const& cos,
                          at::Tensor const& sin, int64_t num_heads, int64_t num_kv_heads, double eps,
                          double temperature, int64_t top_k, double top_p,
                          std::optional<at::Generator> generator, at::Tensor& codes, at::Tensor& embed_sum) {
  TORCH_CHECK(prefix.dim() == 2 && prefix.size(0) == 2, "code_predictor_frame: prefix must be [2, hidden], got ",
              prefix.sizes());
  const int64_t hidden = prefix.size(1), groups = static_cast<int64_t>(embeddings.size());
  TORCH_CHECK(!layers.empty() && layers.size() % kWeightsPerLayer == 0, "code_predictor_frame: layers must hold ",
              kWeightsPerLayer, " weights per layer, got ", layers.size());
  TORCH_CHECK(groups >= 1 && static_cast<int64_t>(heads.size()) == groups,
              "code_predictor_frame: one head per embedding table, got ", heads.size(), " heads and ", groups,
              " tables");
  TORCH_CHECK(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0,
              "code_predictor_frame: heads (", num_heads, ") must be a multiple of kv heads (", num_kv_heads, ")");
  const int64_t head_dim = layers[kQNorm].numel(), inter = layers[kGate].size(0);
  const int64_t slots = groups + 1, vocab = embeddings[0].size(0);
  TORCH_CHECK(head_dim % 2 == 0, "code_predictor_frame: head_dim must be even, got ", head_dim);
  TORCH_CHECK(!(temperature < 0.0), "code_predictor_frame: temperature must be >= 0, got ", temperature);
  check_fp32_matrix(prefix, 2, hidden, "prefix");
  check_fp32_matrix(cos, slots, head_dim, "cos");
  check_fp32_matrix(sin, slots, head_dim, "sin");
  check_fp32_vector(final_norm, hidden, "final_norm");
  for (size_t l = 0; l < layers.size(); l += kWeightsPerLayer) {
    const at::TensorList w = layers.slice(l, kWeightsPerLayer);
    check_fp32_vector(w[kInputNorm], hidden, "input_norm");
    check_fp32_matrix(w[kQ], num_heads * head_dim, hidden, "q_proj");
    check_fp32_matrix(w[kK], num_kv_heads * head_dim, hidden, "k_proj");
    check_fp32_matrix(w[kV], num_kv_heads * head_dim, hidden, "v_proj");
    check_fp32_matrix(w[kO], hidden, num_heads * head_dim, "o_proj");
    check_fp32_vector(w[kQNorm], head_dim, "q_norm");
    check_fp32_vector(w[kKNorm], head_dim, "k_norm");
    check_fp32_vector(w[kPostNorm], hidden, "post_attention_norm");
    check_fp32_matrix(w[kGate], inter, hidden, "gate_proj");
    check_fp32_matrix(w[kUp], inter, hidden, "up_proj");
    check_fp32_matrix(w[kDown], hidden, inter, "down_proj");
  }
  for (int64_t g = 0; g < groups; ++g) {
    check_fp32_matrix(embeddings[g], vocab, hidden, "embedding");
    check_fp32_matrix(heads[g], vocab, hidden, "lm_head");
  }
  TORCH_CHECK(codes.dim() == 1 && codes.size(0) == groups && codes.scalar_type() == at::kLong &&
                  codes.is_contiguous() && codes.device().is_cpu(),
              "code_predictor_frame: codes must be a contiguous int64 CPU [", groups, "], got ", codes.sizes(), " ",
              codes.scalar_type());
  check_fp32_vector(embed_sum, hidden, "embed_sum");
  TORCH_CHECK(embed_sum.is_contiguous(), "code_predictor_frame: embed_sum must be contiguous");

  // Rows the loops read through raw pointers, made contiguous once (a no-op for the model's own parameters).
  std::vector<at::Tensor> weights(layers.begin(), layers.end());
  for (size_t l = 0; l < weights.size(); l += kWeightsPerLayer)
    for (const int i : {kInputNorm, kQNorm, kKNorm, kPostNorm}) weights[l + i] = weights[l + i].contiguous();
  const at::Tensor norm_out = final_norm.contiguous(), cos_c = cos.contiguous(), sin_c = sin.contiguous();

  const Shapes s{hidden, num_heads, num_kv_heads, head_dim, slots};
  const int64_t num_layers = static_cast<int64_t>(layers.size()) / kWeightsPerLayer;
  const int64_t q_width = num_heads * head_dim, kv_width = num_kv_heads * head_dim;
  const float feps = static_cast<float>(eps), scale = 1.f / std::sqrt(static_cast<float>(head_dim));
  const auto options = prefix.options();
  // Frame-local state: [layers, kv_heads, slots, D] caches, the residual stream and scratch rows.
  std::vector<float> k_cache(num_layers * kv_width * slots), v_cache(k_cache.size());
  std::vector<float> scores(slots), scratch(std::max(hidden, head_dim));
  at::Tensor x = prefix.contiguous().clone();                       // [t, H] residual stream
  at::Tensor normed = at::empty({2, hidden}, options);
  at::Tensor attn = at::empty({2, q_width}, options);
  float* sum = embed_sum.data_ptr<float>();
  std::copy_n(x.data_ptr<float>() + hidden, hidden, sum);          // codebook 0's embedding
  const float* cos_rows = cos_c.data_ptr<float>();
  const float* sin_rows = sin_c.data_ptr<float>();
  int64_t* out_codes = codes.data_ptr<int64_t>();

  for (int64_t g = 0, first = 0, t = 2; g < groups; ++g, first += t, t = 1) {   // t: new positions this step
    at::Tensor h = normed.narrow(0, 0, t), a = attn.narrow(0, 0, t);
    for (int64_t l = 0; l < num_layers; ++l) {
      const at::TensorList w = at::TensorList(weights).slice(l * kWeightsPerLayer, kWeightsPerLayer);
      float* xs = x.data_ptr<float>();
      for (int64_t i = 0; i < t; ++i)
        rms_norm_row(xs + i * hidden, w[kInputNorm].data_ptr<float>(), hidden, feps, h.data_ptr<float>() + i * hidden);
      at::Tensor q = project(h, w[kQ]), k = project(h, w[kK]), v = project(h, w[kV]);   // [t, heads * D]
      float* kc = k_cache.data() + l * kv_width * slots;
      float* vc = v_cache.data() + l * kv_width * slots;
      for (int64_t i = 0; i < t; ++i) {
        const int64_t pos = first + i;
        const float *c = cos_rows + pos * head_dim, *sn = sin_rows + pos * head_dim;
        for (int64_t hq = 0; hq < num_heads; ++hq)
          norm_rope_head(q.data_ptr<float>() + (i * num_heads + hq) * head_dim, w[kQNorm].data_ptr<float>(), c, sn,
                         head_dim, feps, scratch.data());
        for (int64_t hk = 0; hk < num_kv_heads; ++hk) {
          float* kr = k.data_ptr<float>() + (i * num_kv_heads + hk) * head_dim;
          norm_rope_head(kr, w[kKNorm].data_ptr<float>(), c, sn, head_dim, feps, scratch.data());
          std::copy_n(kr, head_dim, kc + (hk * slots + pos) * head_dim);
          std::copy_n(v.data_ptr<float>() + (i * num_kv_heads + hk) * head_dim, head_dim,
                      vc + (hk * slots + pos) * head_dim);
        }
      }
      attend(q.data_ptr<float>(), kc, vc, first, t, s, scale, a.data_ptr<float>(), scores);
      x.add_(project(a, w[kO]));
      xs = x.data_ptr<float>();
      for (int64_t i = 0; i < t; ++i)
        rms_norm_row(xs + i * hidden, w[kPostNorm].data_ptr<float>(), hidden, feps, h.data_ptr<float>() + i * hidden);
      at::Tensor gate = project(h, w[kGate]), up = project(h, w[kUp]);                  // [t, I]
      float *gp = gate.data_ptr<float>(), *up_ = up.data_ptr<float>();
      for (int64_t e = 0; e < t * inter; ++e) gp[e] = gp[e] / (1.f + std::exp(-gp[e])) * up_[e];
      x.add_(project(gate, w[kDown]));
    }
    // every row through the norm and head, as the reference does (a GEMM's bits depend on its row count)
    for (int64_t i = 0; i < t; ++i)
      rms_norm_row(x.data_ptr<float>() + i * hidden, norm_out.data_ptr<float>(), hidden, feps,
                   h.data_ptr<float>() + i * hidden);
    at::Tensor logits = project(h, heads[g]).narrow(0, t - 1, 1);                     // [1, V]
    const int64_t code = temperature == 0.0 ? argmax_row(logits.data_ptr<float>(), vocab)
                                            : sample(logits, temperature, top_k, top_p, generator);
    TORCH_CHECK(code >= 0 && code < vocab, "code_predictor_frame: sampled code ", code, " outside [0, ", vocab, ")");
    out_codes[g] = code;
    x = embeddings[g].narrow(0, code, 1).clone();                                     // [1, H]
    const float* e = x.data_ptr<float>();
    for (int64_t i = 0; i < hidden; ++i) sum[i] += e[i];
  }
}
