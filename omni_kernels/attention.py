"""Scaled dot-product attention over a KV cache with grouped-query heads.

Queries are the last ``Tq`` of ``Tk`` positions (bottom-right causal alignment): prefill has ``Tq == Tk``, decode
``Tq == 1``, chunked prefill anything in between. The reference calls torch SDPA with the same arguments the
reference model uses (``is_causal`` without a mask for prefill, no mask for decode, a boolean mask otherwise),
because those choices change bf16 results.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from omni_kernels.dispatch import REGISTRY, everywhere


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = True) -> torch.Tensor:
    """q: (B, Hq, Tq, D), k/v: (B, Hkv, Tk, D) with Hq % Hkv == 0 and Tq <= Tk -> (B, Hq, Tq, D)."""
    q_len, kv_len = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    if not causal or q_len == 1 or q_len == kv_len:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal and q_len > 1,
                                              enable_gqa=groups > 1)
    query_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
    mask = query_pos[:, None] >= torch.arange(kv_len, device=q.device)[None, :]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


REGISTRY.register("attention", "torch", everywhere)(attention_ref)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = True) -> torch.Tensor:
    """See :func:`attention_ref`."""
    if q.shape[1] % k.shape[1] or q.shape[2] > k.shape[2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: query {tuple(q.shape)} does not fit keys {tuple(k.shape)}")
    return REGISTRY.select("attention", q.device).fn(q, k, v, scale, causal)
