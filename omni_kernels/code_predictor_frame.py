"""One code-predictor frame: codebooks 1..Q-1 of an 80 ms frame from the talker's hidden state and codebook 0.

The predictor is a small dense Qwen3 decoder (1-D RoPE, per-head q/k RMSNorm, GQA, SwiGLU). A frame is Q-1
dependent steps over a cache of at most Q positions that starts empty every frame:

    x = [talker hidden, embed_0(code0)]                  # [2, H]: positions 0, 1 (a 2-token prefill)
    for g in 1..Q-1:
        h      = decoder(x)                              # causal over the frame's positions so far
        code_g = sample(head_g(final_norm(h))[-1])       # greedy when temperature == 0
        x      = embed_g(code_g)                         # [1, H]: the next position
    -> codes [Q-1], sum of the Q code embeddings [H] (the talker's next input before text conditioning)

On a GPU the runtime captures its own module-based frame as one CUDA graph. On a CPU that frame is thousands of tiny
ATen calls, so the ``cpp`` backend runs the whole frame in one C++ call (csrc/cpu/code_predictor_frame.cpp; fp32,
other dtypes take the reference). Weights go in as plain tensors (``PredictorWeights``), built once per runner.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from omni_kernels._extension import has_op
from omni_kernels.attention import attention_ref
from omni_kernels.dispatch import REGISTRY, everywhere
from omni_kernels.qk_norm_rope import qk_norm_rope_ref
from omni_kernels.rms_norm import rms_norm_ref
from omni_kernels.sampling import sample_ref


class PredictorLayer(NamedTuple):
    input_norm: torch.Tensor   # [H]
    q_proj: torch.Tensor       # [Hq * D, H]
    k_proj: torch.Tensor       # [Hkv * D, H]
    v_proj: torch.Tensor       # [Hkv * D, H]
    o_proj: torch.Tensor       # [H, Hq * D]
    q_norm: torch.Tensor       # [D]
    k_norm: torch.Tensor       # [D]
    post_norm: torch.Tensor    # [H]
    gate_proj: torch.Tensor    # [I, H]
    up_proj: torch.Tensor      # [I, H]
    down_proj: torch.Tensor    # [H, I]


@dataclass(frozen=True)
class PredictorWeights:
    layers: tuple[PredictorLayer, ...]
    final_norm: torch.Tensor          # [H]
    embeddings: tuple[torch.Tensor, ...]   # Q-1 x [V, H]: codebooks 1..Q-1
    heads: tuple[torch.Tensor, ...]        # Q-1 x [V, H]
    cos: torch.Tensor                 # [Q, D] rotary table of positions 0..Q-1
    sin: torch.Tensor                 # [Q, D]
    num_heads: int
    num_kv_heads: int
    eps: float

    @functools.cached_property
    def flat_layers(self) -> list[torch.Tensor]:
        """The C++ op's layout: each layer's 11 tensors in PredictorLayer order, layer after layer."""
        return [t for layer in self.layers for t in layer]


def code_predictor_frame_ref(prefix: torch.Tensor, w: PredictorWeights, temperature: float = 0.0, top_k: int = 0,
                             top_p: float = 1.0, generator: torch.Generator | None = None):
    """prefix: [2, H] (talker hidden state, codebook-0 embedding) -> (codes [Q-1] int64, embedding sum [H])."""
    head_dim, slots = w.layers[0].q_norm.numel(), len(w.embeddings) + 1
    caches = [prefix.new_zeros(2, 1, w.num_kv_heads, slots, head_dim) for _ in w.layers]
    x, first, codes, embeds = prefix[None], 0, [], [prefix[1:]]
    for group, (embedding, head) in enumerate(zip(w.embeddings, w.heads)):
        t = x.shape[1]
        positions = torch.arange(first, first + t, device=prefix.device)
        cos, sin = w.cos[positions][None], w.sin[positions][None]                           # [1, t, D]
        for layer, cache in zip(w.layers, caches):
            h = rms_norm_ref(x, layer.input_norm, w.eps)
            q = F.linear(h, layer.q_proj).view(1, t, w.num_heads, head_dim)
            k = F.linear(h, layer.k_proj).view(1, t, w.num_kv_heads, head_dim)
            v = F.linear(h, layer.v_proj).view(1, t, w.num_kv_heads, head_dim)
            q = qk_norm_rope_ref(q, k, v, layer.q_norm, layer.k_norm, w.eps, cos, sin, cache[0], cache[1], positions)
            out = attention_ref(q, cache[0][:, :, :first + t], cache[1][:, :, :first + t], head_dim**-0.5)
            x = x + F.linear(out.transpose(1, 2).reshape(1, t, -1), layer.o_proj)
            h = rms_norm_ref(x, layer.post_norm, w.eps)
            x = x + F.linear(F.silu(F.linear(h, layer.gate_proj)) * F.linear(h, layer.up_proj), layer.down_proj)
        logits = F.linear(rms_norm_ref(x, w.final_norm, w.eps), head)[:, -1].float()         # [1, V]
        codes.append(sample_ref(logits, temperature, top_k, top_p, generator))
        x = F.embedding(codes[-1].view(1, 1), embedding)                                      # [1, 1, H]
        embeds.append(x[0])
        first += t
    return torch.cat(codes), torch.cat(embeds).sum(0)


def _cpp_runs(device: torch.device) -> bool:
    return device.type == "cpu" and has_op("code_predictor_frame")


@REGISTRY.register("code_predictor_frame", "torch", everywhere)
def _frame_torch(prefix, w, temperature, top_k, top_p, generator):
    return code_predictor_frame_ref(prefix, w, temperature, top_k, top_p, generator)


@REGISTRY.register("code_predictor_frame", "cpp", _cpp_runs)
def _frame_cpp(prefix, w, temperature, top_k, top_p, generator):
    if prefix.dtype != torch.float32 or w.heads[0].dtype != torch.float32:
        return code_predictor_frame_ref(prefix, w, temperature, top_k, top_p, generator)
    codes = torch.empty(len(w.embeddings), dtype=torch.int64)
    embed_sum = torch.empty(prefix.shape[-1], dtype=torch.float32)
    torch.ops.omni.code_predictor_frame(prefix, w.flat_layers, w.final_norm, w.embeddings, w.heads, w.cos,
                                        w.sin, w.num_heads, w.num_kv_heads, w.eps, temperature, top_k, top_p,
                                        generator, codes, embed_sum)
    return codes, embed_sum


def code_predictor_frame(prefix: torch.Tensor, weights: PredictorWeights, temperature: float = 0.0, top_k: int = 0,
                         top_p: float = 1.0, generator: torch.Generator | None = None):
    """prefix: [2, H] -> (codes [Q-1] int64, sum of the frame's Q code embeddings [H]). See the module docstring."""
    if prefix.dim() != 2 or prefix.shape[0] != 2:
        raise ValueError(f"code_predictor_frame: prefix must be [2, hidden], got {tuple(prefix.shape)}")
    if temperature < 0:
        raise ValueError(f"code_predictor_frame: temperature must be >= 0, got {temperature}")
    kernel = REGISTRY.select("code_predictor_frame", prefix.device)
    return kernel.fn(prefix, weights, float(temperature), int(top_k), float(top_p), generator)
