"""What a decoder runner keeps between steps: its KV cache and where its rotary positions stand.

Positions are TM-RoPE rows ``[3, B, T]`` (t, h, w). After a prefill whose largest position is ``m`` over ``P``
tokens, decode steps sit at ``cache_len + rope_delta`` on all three rows, ``rope_delta = m + 1 - P``.
"""
from __future__ import annotations

import torch

import omni_kernels as ok
from omni_runtime.config import MoeTextConfig
from omni_runtime.kv_cache import StaticKVCache
from omni_runtime.layers import StepContext


class DecoderState:
    def __init__(self, cfg: MoeTextConfig, max_len: int, device: torch.device, dtype: torch.dtype,
                 multimodal_rope: bool = True):
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.cache = StaticKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, max_len, dtype,
                                   device)
        self.inv_freq = ok.rope_inv_freq(cfg.head_dim, cfg.rope_theta).to(device)
        self.mrope_section = cfg.mrope_section if multimodal_rope else None
        self.rope_delta = 0

    def start(self, positions: torch.Tensor) -> StepContext:
        """A fresh sequence whose prompt sits at ``positions`` ([3, 1, P], or [1, P] for 1-D RoPE)."""
        self.cache.reset()
        self.rope_delta = int(positions.max()) + 1 - positions.shape[-1]
        return self.context(positions)

    def next_context(self, new_tokens: int = 1) -> StepContext:
        start = self.cache.length + self.rope_delta
        positions = torch.arange(start, start + new_tokens, device=self.device).view(1, -1)
        return self.context(positions.expand(3, 1, -1) if self.mrope_section else positions)

    def context(self, positions: torch.Tensor) -> StepContext:
        slots = self.cache.reserve(positions.shape[-1])
        cos, sin = ok.mrope_cos_sin_ref(positions, self.inv_freq, self.mrope_section, self.dtype)
        return StepContext(cos, sin, slots, self.cache.length)
