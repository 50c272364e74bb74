// The one place that registers ops. Schemas are explicit: `Tensor(a!) out` tells the dispatcher (and
// torch.compile) that the op writes `out` in place and returns nothing.
#include <Python.h>
#include <torch/library.h>

#include <optional>

// CPU twins (csrc/cpu/), built into every extension.
void code_predictor_frame(at::Tensor const& prefix, at::TensorList layers, at::Tensor const& final_norm,
                          at::TensorList embeddings, at::TensorList heads, at::Tensor const& cos,
                          at::Tensor const& sin, int64_t num_heads, int64_t num_kv_heads, double eps,
                          double temperature, int64_t top_k, double top_p,
                          std::optional<at::Generator> generator, at::Tensor& codes, at::Tensor& embed_sum);
void decoder_step(at::Tensor const& x, c10::List<std::optional<at::Tensor>> const& layer_list,
                  at::Tensor const& final_norm, at::Tensor const& head, at::Tensor& kv_cache,
                  at::Tensor const& slots, at::Tensor const& cos, at::Tensor const& sin, int64_t num_heads,
                  int64_t num_kv_heads, int64_t top_k, bool renormalize, double eps, at::Tensor& hidden_out,
                  at::Tensor& logits_out);

#ifdef OMNI_WITH_CUDA
void rms_norm(at::Tensor const& x, at::Tensor const& weight, double eps, at::Tensor& out);
void add_rms_norm(at::Tensor const& x, at::Tensor const& residual, at::Tensor const& weight, double eps,
                  at::Tensor& sum, at::Tensor& out);
void silu_mul(at::Tensor const& x, at::Tensor& out);
void qk_norm_rope(at::Tensor const& q, at::Tensor const& k, at::Tensor const& v,
                  std::optional<at::Tensor> const& q_norm_weight, std::optional<at::Tensor> const& k_norm_weight,
                  double eps, at::Tensor const& cos, at::Tensor const& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                  at::Tensor const& cache_positions, at::Tensor& q_out);
void decode_attention(at::Tensor const& q, at::Tensor const& k_cache, at::Tensor const& v_cache,
                      at::Tensor const& seq_lens, double scale, std::optional<int64_t> window,
                      at::Tensor& partial_out, at::Tensor& partial_lse, at::Tensor& out);
void rvq_embed_mean(at::Tensor const& codes, at::Tensor const& table, int64_t codebook_size, at::Tensor& out);
void causal_conv1d(at::Tensor const& x, at::Tensor const& weight, std::optional<at::Tensor> const& bias,
                   int64_t dilation, int64_t groups, std::optional<at::Tensor> const& state,
                   std::optional<at::Tensor> const& snake_alpha, std::optional<at::Tensor> const& snake_beta,
                   at::Tensor& out, at::Tensor& new_state);
void causal_conv_transpose1d(at::Tensor const& x, at::Tensor const& weight, std::optional<at::Tensor> const& bias,
                             int64_t stride, std::optional<at::Tensor> const& state,
                             std::optional<at::Tensor> const& snake_alpha,
                             std::optional<at::Tensor> const& snake_beta, at::Tensor& out, at::Tensor& new_state);
void moe_route(at::Tensor const& logits, int64_t top_k, bool renormalize, at::Tensor& weights, at::Tensor& ids);
void fused_moe(at::Tensor const& x, at::Tensor const& router_logits, at::Tensor const& w_gate_up,
               at::Tensor const& w_down, int64_t top_k, bool renormalize, at::Tensor& out);
void moe_combine(at::Tensor const& rows, std::optional<at::Tensor> const& gate,
                 std::optional<at::Tensor> const& shared, at::Tensor& out);
#endif

TORCH_LIBRARY(omni, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, Tensor(a!) sum, Tensor(b!) out) -> ()");
  m.def("silu_mul(Tensor x, Tensor(a!) out) -> ()");
  m.def("qk_norm_rope(Tensor q, Tensor k, Tensor v, Tensor? q_norm_weight, Tensor? k_norm_weight, float eps, "
        "Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_positions, "
        "Tensor(c!) q_out) -> ()");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, float scale, int? window, "
        "Tensor(a!) partial_out, Tensor(b!) partial_lse, Tensor(c!) out) -> ()");
  m.def("rvq_embed_mean(Tensor codes, Tensor table, int codebook_size, Tensor(a!) out) -> ()");
  m.def("causal_conv1d(Tensor x, Tensor weight, Tensor? bias, int dilation, int groups, Tensor? state, "
        "Tensor? snake_alpha, Tensor? snake_beta, Tensor(a!) out, Tensor(b!) new_state) -> ()");
  m.def("causal_conv_transpose1d(Tensor x, Tensor weight, Tensor? bias, int stride, Tensor? state, "
        "Tensor? snake_alpha, Tensor? snake_beta, Tensor(a!) out, Tensor(b!) new_state) -> ()");
  m.def("moe_route(Tensor logits, int top_k, bool renormalize, Tensor(a!) weights, Tensor(b!) ids) -> ()");
  m.def("fused_moe(Tensor x, Tensor router_logits, Tensor w_gate_up, Tensor w_down, int top_k, bool renormalize, "
        "Tensor(a!) out) -> ()");
  m.def("moe_combine(Tensor rows, Tensor? gate, Tensor? shared, Tensor(a!) out) -> ()");
  m.def("code_predictor_frame(Tensor prefix, Tensor[] layers, Tensor final_norm, Tensor[] embeddings, "
        "Tensor[] heads, Tensor cos, Tensor sin, int num_heads, int num_kv_heads, float eps, float temperature, "
        "int top_k, float top_p, Generator? generator, Tensor(a!) codes, Tensor(b!) embed_sum) -> ()");
  m.def("decoder_step(Tensor x, Tensor?[] layers, Tensor final_norm, Tensor head, Tensor(a!) kv_cache, "
        "Tensor slots, Tensor cos, Tensor sin, int num_heads, int num_kv_heads, int top_k, bool renormalize, "
        "float eps, Tensor(b!) hidden_out, Tensor(c!) logits_out) -> ()");
}

TORCH_LIBRARY_IMPL(omni, CPU, m) {
  m.impl("code_predictor_frame", &code_predictor_frame);
  m.impl("decoder_step", &decoder_step);
}

#ifdef OMNI_WITH_CUDA

TORCH_LIBRARY_IMPL(omni, CUDA, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("qk_norm_rope", &qk_norm_rope);
  m.impl("decode_attention", &decode_attention);
  m.impl("rvq_embed_mean", &rvq_embed_mean);
  m.impl("causal_conv1d", &causal_conv1d);
  m.impl("causal_conv_transpose1d", &causal_conv_transpose1d);
  m.impl("moe_route", &moe_route);
  m.impl("fused_moe", &fused_moe);
  m.impl("moe_combine", &moe_combine);
}
#endif

// `import omni_kernels._C` only has to load this library (running the registrations above); the ops are then
// reached through torch.ops.omni. An empty module, no pybind11.
PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "omni_kernels._C", nullptr, 0, nullptr};
  return PyModule_Create(&module);
}
