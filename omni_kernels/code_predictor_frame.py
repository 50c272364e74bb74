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

import torch
import torch.nn.functional as F

from omni_kernels._extension import cpu_runs
from omni_kernels.decoder_step import DecoderLayerWeights, decoder_layer_ref
from omni_kernels.dispatch import REGISTRY, everywhere
from omni_kernels.rms_norm import rms_norm_ref
from omni_kernels.sampling import sample_ref


@dataclass(frozen=True)
class PredictorWeights:
    layers: tuple[DecoderLayerWeights, ...]   # dense layers
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
        """The C++ op's layout: each layer's attention and dense MLP (its first 11 entries), layer after layer."""
        return [t for layer in self.layers for t in layer[:11]]


def code_predictor_frame_ref(prefix: torch.Tensor, w: PredictorWeights, temperature: float = 0.0, top_k: int = 0,
                             top_p: float = 1.0, generator: torch.Generator | None = None):
    """prefix: [2, H] (talker hidden state, codebook-0 embedding) -> (codes [Q-1] int64, embedding sum [H])."""
    head_dim, slots = w.layers[0].q_norm.numel(), len(w.embeddings) + 1
    caches = [prefix.new_zeros(2, 1, w.num_kv_heads, slots, head_dim) for _ in w.layers]
    x, first, codes, embeds = prefix[None], 0, [], [prefix[1:]]
    for group, (embedding, head) in enumerate(zip(w.embeddings, w.heads)):
        t = x.shape[1]
        cos, sin = w.cos[first:first + t][None], w.sin[first:first + t][None]                # [1, t, D]
        for layer, cache in zip(w.layers, caches):
            x = decoder_layer_ref(x, layer, w, cache[0], cache[1], first, cos, sin)
        logits = F.linear(rms_norm_ref(x, w.final_norm, w.eps), head)[:, -1].float()         # [1, V]
        codes.append(sample_ref(logits, temperature, top_k, top_p, generator))
        x = F.embedding(codes[-1].view(1, 1), embedding)                                      # [1, 1, H]
        embeds.append(x[0])
        first += t
    return torch.cat(codes), torch.cat(embeds).sum(0)


REGISTRY.register("code_predictor_frame", "torch", everywhere)(code_predictor_frame_ref)


@REGISTRY.register("code_predictor_frame", "cpp", cpu_runs("code_predictor_frame"))
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
