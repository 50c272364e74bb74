"""Building blocks of the Qwen3 decoders (thinker and talker): norm, attention, MoE and dense SwiGLU MLPs.

Parameter names follow the checkpoint's so that the loader maps names one to one (experts fused, see loader.py).
Shape legend: B batch, T new tokens, S cached tokens, H hidden, D head_dim, E experts, I expert width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import omni_kernels as ok
from omni_runtime.config import MoeTextConfig


@dataclass(slots=True)
class StepContext:
    """What every layer needs for one forward step: rotary tables and where the new tokens go in the cache."""
    cos: torch.Tensor              # [B, T, D]
    sin: torch.Tensor              # [B, T, D]
    cache_positions: torch.Tensor  # [T] slots of the new tokens, or [B, T]: each sequence its own
    kv_len: int                    # cached tokens after this step, new ones included
    seq_lens: torch.Tensor | None = None   # [B] the same, as a tensor: graph-safe decode over the whole cache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ok.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """GQA attention with per-head q/k RMSNorm and rotary embeddings, over a static KV cache."""

    def __init__(self, cfg: MoeTextConfig):
        super().__init__()
        self.head_dim, self.eps = cfg.head_dim, cfg.rms_norm_eps
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qkv_weight: torch.Tensor | None = None   # fuse_projections(): [(Hq + 2 Hkv) D, H]

    def fuse_projections(self) -> None:
        """One GEMM for q, k and v (GPU decode: two kernels fewer a layer); the three weights become views of the
        fused one, so the loader's names and the CPU paths' separate GEMMs still see them."""
        self.qkv_weight = _fuse(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, T, _ = x.shape
        if self.qkv_weight is not None:
            q, k, v = F.linear(x, self.qkv_weight).split(
                [self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], dim=-1)
            q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))        # strided views of one GEMM
        else:
            q = self.q_proj(x).view(B, T, -1, self.head_dim)                       # [B, T, Hq, D]
            k = self.k_proj(x).view(B, T, -1, self.head_dim)                       # [B, T, Hkv, D]
            v = self.v_proj(x).view(B, T, -1, self.head_dim)
        k_cache, v_cache = cache                                                   # [B, Hkv, S_max, D]
        q = ok.qk_norm_rope(q, k, v, self.q_norm.weight, self.k_norm.weight, self.eps, ctx.cos, ctx.sin,
                            k_cache, v_cache, ctx.cache_positions)                 # [B, Hq, T, D]
        if ctx.seq_lens is None:   # the valid keys as a slice: the reference's exact attention call
            out = ok.attention(q, k_cache[:, :, :ctx.kv_len], v_cache[:, :, :ctx.kv_len], self.head_dim**-0.5)
        else:                      # lengths from a tensor: one captured graph serves every step
            out = ok.decode_attention(q, k_cache, v_cache, ctx.seq_lens, self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))  # [E, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))         # [E, H, I]


class DenseMLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.gate_up_weight: torch.Tensor | None = None   # fuse_projections(): [2I, H]

    def fuse_projections(self) -> None:
        """One GEMM for gate and up, then ``silu_mul``: three kernels fewer per MLP (see Attention's)."""
        self.gate_up_weight = _fuse(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None:
            return self.down_proj(ok.silu_mul(F.linear(x, self.gate_up_weight)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def decoder_stack(layers: nn.ModuleList, final_norm: RMSNorm, x: torch.Tensor, ctx: StepContext, cache) -> torch.Tensor:
    """x: [B, T, H] layer-0 inputs through every layer -> ``final_norm`` of the last layer's output."""
    h = layers[0].input_layernorm(x)
    for index, layer in enumerate(layers):
        following = layers[index + 1].input_layernorm if index + 1 < len(layers) else final_norm
        x, h = layer(x, h, ctx, cache.layer(index), following)
    return h


def _fuse(*projections: nn.Linear) -> torch.Tensor:
    """Concatenates bias-free projections' weights along the output rows and re-points each weight at its rows."""
    fused = torch.cat([p.weight.detach() for p in projections])
    start = 0
    for p in projections:
        rows = p.weight.shape[0]
        p.weight = nn.Parameter(fused[start:start + rows], requires_grad=False)
        start += rows
    return fused


def fuse_projections(model: nn.Module) -> None:
    """Fused q/k/v and gate/up GEMMs in every decoder attention and dense MLP of ``model``, and the shared experts'
    input GEMMs (the GPU runtime's)."""
    shared = {id(m.shared_expert) for m in model.modules() if hasattr(m, "shared_expert")}   # fused by their block
    for module in model.modules():
        if isinstance(module, (Attention, DenseMLP, SparseMoeBlock)) and id(module) not in shared:
            module.fuse_projections()


class SparseMoeBlock(nn.Module):
    """Routed experts, plus (talker) a shared expert scaled by a sigmoid gate."""

    def __init__(self, cfg: MoeTextConfig):
        super().__init__()
        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)       # router [E, H]
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = DenseMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.shared_input_weight: torch.Tensor | None = None   # fuse_projections(): [2 Is + 1, H]

    def fuse_projections(self) -> None:
        """The shared expert's gate and up projections and its sigmoid gate as one GEMM (two launches fewer a
        talker layer at decode); the three weights become views of it, as Attention's."""
        if hasattr(self, "shared_expert"):
            mlp = self.shared_expert
            self.shared_input_weight = _fuse(mlp.gate_proj, mlp.up_proj, self.shared_expert_gate)
            mlp.gate_up_weight = self.shared_input_weight[:2 * mlp.gate_proj.out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = None
        if hasattr(self, "shared_expert"):
            mlp = self.shared_expert
            shared = ok.SharedExpert(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
                                     self.shared_expert_gate.weight, self.shared_input_weight)
        out = ok.fused_moe(x.reshape(-1, x.shape[-1]), self.gate.weight, self.experts.gate_up_proj,
                           self.experts.down_proj, self.top_k, self.renormalize, shared)
        return out.view_as(x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MoeTextConfig, index: int):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = SparseMoeBlock(cfg) if cfg.is_moe_layer(index) else DenseMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, h: torch.Tensor, ctx: StepContext, cache: tuple[torch.Tensor, torch.Tensor],
                next_norm: RMSNorm | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: the residual stream [B, T, H], h: this layer's normed input -> (the stream after the layer, and
        ``next_norm`` of it: the next layer's input norm, or the final one). Each residual add is one kernel with
        the norm that follows it (``add_rms_norm``): the reference's roundings, one launch fewer per add."""
        norm = self.post_attention_layernorm
        x, h = ok.add_rms_norm(x, self.self_attn(h, ctx, cache), norm.weight, norm.eps)
        if next_norm is None:
            return x + self.mlp(h), None
        return ok.add_rms_norm(x, self.mlp(h), next_norm.weight, next_norm.eps)

    def step_weights(self) -> ok.DecoderLayerWeights:
        """This layer's weights as the one-call decode step (``ok.decoder_step``) takes them: views, no copies."""
        attn, mlp = self.self_attn, self.mlp
        weights = ok.DecoderLayerWeights(
            self.input_layernorm.weight, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
            attn.o_proj.weight, attn.q_norm.weight, attn.k_norm.weight, self.post_attention_layernorm.weight)
        if isinstance(mlp, DenseMLP):
            return weights._replace(gate_proj=mlp.gate_proj.weight, up_proj=mlp.up_proj.weight,
                                    down_proj=mlp.down_proj.weight)
        weights = weights._replace(router=mlp.gate.weight, experts_gate_up=mlp.experts.gate_up_proj,
                                   experts_down=mlp.experts.down_proj)
        if hasattr(mlp, "shared_expert"):
            shared = mlp.shared_expert
            weights = weights._replace(shared_gate_proj=shared.gate_proj.weight, shared_up_proj=shared.up_proj.weight,
                                       shared_down_proj=shared.down_proj.weight,
                                       shared_expert_gate=mlp.shared_expert_gate.weight)
        return weights
