"""One decode step of a Qwen3 decoder (thinker or talker): a token through every layer over the static KV cache,
then the final norm and the head.

    x = embedding                                        # [1, H]
    for each layer:
        x = x + attention(input_norm(x))                 # q/k RMSNorm, RoPE row (cos, sin), cache slot `slot`
        x = x + mlp(post_norm(x))                        # dense SwiGLU, or routed experts (+ gated shared expert)
    -> hidden = final_norm(x) [1, H], logits = hidden @ head^T [1, V] (fp32)

On a GPU the runtime captures its module-based step as a CUDA graph. On a CPU the step is hundreds of tiny ATen
calls (the talker's, ~1.3 ms on the test model for ~0.1 ms of arithmetic), so the ``cpp`` backend runs it in one C++
call (csrc/cpu/decoder_step.cpp; fp32, other dtypes take the reference). Weights go in as plain tensors
(``DecoderWeights``), built once per runner.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from omni_kernels._extension import cpu_runs
from omni_kernels.attention import attention_ref
from omni_kernels.dispatch import REGISTRY, everywhere
from omni_kernels.moe import SharedExpert, fused_moe_ref
from omni_kernels.qk_norm_rope import qk_norm_rope_ref
from omni_kernels.rms_norm import rms_norm_ref


class DecoderLayerWeights(NamedTuple):
    """One layer: attention, then a dense MLP or routed experts (with the talker's gated shared expert)."""
    input_norm: torch.Tensor                            # [H]
    q_proj: torch.Tensor                                # [Hq * D, H]
    k_proj: torch.Tensor                                # [Hkv * D, H]
    v_proj: torch.Tensor                                # [Hkv * D, H]
    o_proj: torch.Tensor                                # [H, Hq * D]
    q_norm: torch.Tensor                                # [D]
    k_norm: torch.Tensor                                # [D]
    post_norm: torch.Tensor                             # [H]
    gate_proj: torch.Tensor | None = None               # dense: [I, H]
    up_proj: torch.Tensor | None = None                 # dense: [I, H]
    down_proj: torch.Tensor | None = None               # dense: [H, I]
    router: torch.Tensor | None = None                  # MoE: [E, H]
    experts_gate_up: torch.Tensor | None = None         # MoE: [E, 2I, H]
    experts_down: torch.Tensor | None = None            # MoE: [E, H, I]
    shared_gate_proj: torch.Tensor | None = None        # [Is, H]
    shared_up_proj: torch.Tensor | None = None          # [Is, H]
    shared_down_proj: torch.Tensor | None = None        # [H, Is]
    shared_expert_gate: torch.Tensor | None = None      # [1, H]


@dataclass(frozen=True)
class DecoderWeights:
    layers: tuple[DecoderLayerWeights, ...]
    final_norm: torch.Tensor     # [H]
    head: torch.Tensor           # [V, H]
    num_heads: int
    num_kv_heads: int
    top_k: int                   # experts per token (MoE layers)
    renormalize: bool            # top-k weights renormalised to sum 1
    eps: float

    @functools.cached_property
    def flat_layers(self) -> list[torch.Tensor | None]:
        """The C++ op's layout: each layer's 18 entries in DecoderLayerWeights order, layer after layer."""
        return [t for layer in self.layers for t in layer]


def decoder_layer_ref(x: torch.Tensor, layer: DecoderLayerWeights, w: DecoderWeights, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, first: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [1, t, H] new tokens for cache slots [first, first + t), each attending causally to the slots up to its
    own; caches [1, Hkv, S, D] (written), cos/sin [1, t, D] -> [1, t, H]. The model's DecoderLayer, op for op.
    ``w`` gives num_heads, num_kv_heads and eps (and top_k, renormalize for MoE layers): a ``DecoderWeights``, or
    the code predictor's ``PredictorWeights`` (dense layers)."""
    t, head_dim = x.shape[1], k_cache.shape[-1]
    h = rms_norm_ref(x, layer.input_norm, w.eps)
    q = F.linear(h, layer.q_proj).view(1, t, w.num_heads, head_dim)
    k = F.linear(h, layer.k_proj).view(1, t, w.num_kv_heads, head_dim)
    v = F.linear(h, layer.v_proj).view(1, t, w.num_kv_heads, head_dim)
    slots = torch.arange(first, first + t, device=x.device)
    q = qk_norm_rope_ref(q, k, v, layer.q_norm, layer.k_norm, w.eps, cos, sin, k_cache, v_cache, slots)
    out = attention_ref(q, k_cache[:, :, :first + t], v_cache[:, :, :first + t], head_dim**-0.5)
    x = x + F.linear(out.transpose(1, 2).reshape(1, t, -1), layer.o_proj)
    return x + _mlp_ref(rms_norm_ref(x, layer.post_norm, w.eps), layer, w)


def decoder_step_ref(x: torch.Tensor, w: DecoderWeights, kv_cache: torch.Tensor, slot: int, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [1, H], kv_cache: [2, layers, 1, Hkv, S, D] (written at ``slot``), cos/sin: [D]
    -> (post-norm hidden [1, H], logits fp32 [1, V])."""
    x = x[None]                                                                             # [1, 1, H]
    for index, layer in enumerate(w.layers):
        x = decoder_layer_ref(x, layer, w, kv_cache[0, index], kv_cache[1, index], slot, cos.view(1, 1, -1),
                              sin.view(1, 1, -1))
    hidden = rms_norm_ref(x, w.final_norm, w.eps)
    return hidden[0], F.linear(hidden[:, -1], w.head).float()


def _mlp_ref(h: torch.Tensor, layer: DecoderLayerWeights, w: DecoderWeights) -> torch.Tensor:
    if layer.router is None:
        return F.linear(F.silu(F.linear(h, layer.gate_proj)) * F.linear(h, layer.up_proj), layer.down_proj)
    shared = None if layer.shared_gate_proj is None else SharedExpert(
        layer.shared_gate_proj, layer.shared_up_proj, layer.shared_down_proj, layer.shared_expert_gate)
    return fused_moe_ref(h.reshape(-1, h.shape[-1]), layer.router, layer.experts_gate_up, layer.experts_down,
                         w.top_k, w.renormalize, shared).view_as(h)


REGISTRY.register("decoder_step", "torch", everywhere)(decoder_step_ref)


@REGISTRY.register("decoder_step", "cpp", cpu_runs("decoder_step"))
def _step_cpp(x, w, kv_cache, slot, cos, sin):
    if x.dtype != torch.float32 or kv_cache.dtype != torch.float32 or w.head.dtype != torch.float32:
        return decoder_step_ref(x, w, kv_cache, slot, cos, sin)
    hidden = torch.empty(1, x.shape[-1], dtype=torch.float32)
    logits = torch.empty(1, w.head.shape[0], dtype=torch.float32)
    torch.ops.omni.decoder_step(x, w.flat_layers, w.final_norm, w.head, kv_cache, slot, cos, sin, w.num_heads,
                                w.num_kv_heads, w.top_k, w.renormalize, w.eps, hidden.view(-1), logits.view(-1))
    return hidden, logits


def decoder_step(x: torch.Tensor, weights: DecoderWeights, kv_cache: torch.Tensor, slot: int, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [1, H] -> (post-norm hidden [1, H], logits fp32 [1, V]); writes the token's keys and values into
    ``kv_cache`` [2, layers, 1, Hkv, S, D] at ``slot``. See the module docstring."""
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"decoder_step: x must be [1, hidden], got {tuple(x.shape)}")
    if not 0 <= slot < kv_cache.shape[-2]:
        raise ValueError(f"decoder_step: slot {slot} outside the cache's {kv_cache.shape[-2]} positions")
    return REGISTRY.select("decoder_step", x.device).fn(x, weights, kv_cache, int(slot), cos, sin)
