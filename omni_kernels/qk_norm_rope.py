"""Per-head q/k RMSNorm, rotary embedding and KV-cache write: the attention prologue of every Qwen3 layer.

One op because a kernel does all of it in one pass over q/k/v (read once, write q and the cache slots once).
The cache layout is (B, kv_heads, max_len, head_dim); ``cache_positions`` are the slots the T new tokens occupy.
"""
from __future__ import annotations

import torch

from omni_kernels.dispatch import REGISTRY, everywhere
from omni_kernels.rms_norm import rms_norm_ref
from omni_kernels.rope import apply_rope_ref


def qk_norm_rope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_positions: torch.Tensor,
) -> torch.Tensor:
    """q: (B, T, Hq, D), k/v: (B, T, Hkv, D), cos/sin: (B, T, D), caches: (B, Hkv, S, D), cache_positions: (T,).

    Returns the rotated queries (B, Hq, T, D); writes the rotated keys and the values into the caches.
    A norm weight of None skips that norm (Code2Wav's attention has none).
    """
    if q_norm_weight is not None:
        q, k = rms_norm_ref(q, q_norm_weight, eps), rms_norm_ref(k, k_norm_weight, eps)
    q = apply_rope_ref(q.transpose(1, 2), cos, sin)
    k = apply_rope_ref(k.transpose(1, 2), cos, sin)
    k_cache.index_copy_(2, cache_positions, k)
    v_cache.index_copy_(2, cache_positions, v.transpose(1, 2))
    return q


REGISTRY.register("qk_norm_rope", "torch", everywhere)(qk_norm_rope_ref)


def qk_norm_rope(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache, cache_positions):
    """See :func:`qk_norm_rope_ref`."""
    if k_cache.shape[1] != k.shape[2] or k_cache.shape[3] != k.shape[3]:
        raise ValueError(f"qk_norm_rope: cache {tuple(k_cache.shape)} does not fit keys {tuple(k.shape)}")
    return REGISTRY.select("qk_norm_rope", q.device).fn(
        q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache, cache_positions)
