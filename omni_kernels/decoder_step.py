"""One decode step of a Qwen3 decoder (thinker or talker): a token through every layer over the static KV cache,
then the final norm and the head.

    x = embedding                                        # [B, H], one token of each of B sequences
    for each layer:
        x = x + attention(input_norm(x))                 # q/k RMSNorm, RoPE row (cos, sin), each row its own
                                                         # cache row and slot
        x = x + mlp(post_norm(x))                        # dense SwiGLU, or routed experts (+ gated shared expert)
    -> hidden = final_norm(x) [B, H], logits = hidden @ head^T [B, V] (fp32)

On a GPU the runtime captures its module-based step as a CUDA graph. On a CPU the step is hundreds of tiny ATen
calls (the talker's, ~1.3 ms on the test model for ~0.1 ms of arithmetic), so the ``cpp`` backend runs it in one C++
call (csrc/cpu/decoder_step.cpp; fp32, other dtypes take the reference). Weights go in as plain tensors
(``DecoderWeights``), built once per runner. Rows are sequences of a batched runner: each runs its attention and
experts alone, as a step of one sequence does; the head is one GEMM over all rows.
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


def decoder_step_ref(x: torch.Tensor, w: DecoderWeights, kv_cache: torch.Tensor, slots: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [B, H], kv_cache: [2, layers, >= B, Hkv, S, D] (row b written at ``slots[b]``), slots: [B] int64,
    cos/sin: [B, D] (an int and [D] for one sequence) -> (post-norm hidden [B, H], logits fp32 [B, V]). Each row
    runs alone over its cache row."""
    slots, cos, sin = _row_args(x, slots, cos, sin)
    rows = []
    for b in range(x.shape[0]):
        row, slot = x[b:b + 1, None], int(slots[b])                                          # [1, 1, H]
        for index, layer in enumerate(w.layers):
            row = decoder_layer_ref(row, layer, w, kv_cache[0, index, b:b + 1], kv_cache[1, index, b:b + 1], slot,
                                    cos[b].view(1, 1, -1), sin[b].view(1, 1, -1))
        rows.append(row[:, 0])
    hidden = rms_norm_ref(torch.cat(rows), w.final_norm, w.eps)
    return hidden, F.linear(hidden, w.head).float()


def _mlp_ref(h: torch.Tensor, layer: DecoderLayerWeights, w: DecoderWeights) -> torch.Tensor:
    if layer.router is None:
        return F.linear(F.silu(F.linear(h, layer.gate_proj)) * F.linear(h, layer.up_proj), layer.down_proj)
    shared = None if layer.shared_gate_proj is None else SharedExpert(
        layer.shared_gate_proj, layer.shared_up_proj, layer.shared_down_proj, layer.shared_expert_gate)
    return fused_moe_ref(h.reshape(-1, h.shape[-1]), layer.router, layer.experts_gate_up, layer.experts_down,
                         w.top_k, w.renormalize, shared).view_as(h)


REGISTRY.register("decoder_step", "torch", everywhere)(decoder_step_ref)


@REGISTRY.register("decoder_step", "cpp", cpu_runs("decoder_step"))
def _step_cpp(x, w, kv_cache, slots, cos, sin):
    if x.dtype != torch.float32 or kv_cache.dtype != torch.float32 or w.head.dtype != torch.float32:
        return decoder_step_ref(x, w, kv_cache, slots, cos, sin)
    hidden = torch.empty(x.shape[0], x.shape[-1], dtype=torch.float32)
    logits = torch.empty(x.shape[0], w.head.shape[0], dtype=torch.float32)
    torch.ops.omni.decoder_step(x, w.flat_layers, w.final_norm, w.head, kv_cache, slots, cos, sin, w.num_heads,
                                w.num_kv_heads, w.top_k, w.renormalize, w.eps, hidden, logits)
    return hidden, logits


def decoder_step(x: torch.Tensor, weights: DecoderWeights, kv_cache: torch.Tensor, slots: int | torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [B, H], one token of each of B sequences -> (post-norm hidden [B, H], logits fp32 [B, V]); writes row b's
    keys and values into row b of ``kv_cache`` [2, layers, >= B, Hkv, S, D] at ``slots[b]`` ([B] int64, or an int
    for one sequence), rotated by cos/sin ([B, D], or [D] for one sequence). See the module docstring."""
    if x.dim() != 2:
        raise ValueError(f"decoder_step: x must be [rows, hidden], got {tuple(x.shape)}")
    rows = x.shape[0]
    if kv_cache.dim() != 6 or kv_cache.shape[2] < rows:
        raise ValueError(f"decoder_step: kv_cache must be [2, layers, >= {rows}, kv_heads, S, D], got "
                         f"{tuple(kv_cache.shape)}")
    count = 1 if isinstance(slots, int) else slots.numel()
    if count != rows:
        raise ValueError(f"decoder_step: {count} slots for {rows} rows")
    # a CPU decode step is ~0.3 ms: the range is checked on host ints (one sequence's slot is one already)
    low, high = (slots, slots) if isinstance(slots, int) else (int(v) for v in torch.aminmax(slots))
    if low < 0 or high >= kv_cache.shape[-2]:
        raise ValueError(f"decoder_step: slot {low if low < 0 else high} outside the cache's {kv_cache.shape[-2]} "
                         "positions")
    slots, cos, sin = _row_args(x, slots, cos, sin)
    return REGISTRY.select("decoder_step", x.device).fn(x, weights, kv_cache, slots, cos, sin)


def _row_args(x, slots, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """slots as an int64 [B] tensor, cos/sin as [B, D] rows (one sequence may pass an int and [D] rows)."""
    rows = x.shape[0]
    return (torch.as_tensor(slots, dtype=torch.int64).reshape(-1), cos.reshape(rows, -1), sin.reshape(rows, -1))
