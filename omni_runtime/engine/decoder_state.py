"""What a decoder runner keeps between steps: its KV cache and where its rotary positions stand.

Positions are TM-RoPE rows ``[3, B, T]`` (t, h, w), or ``[B, T]`` for 1-D RoPE. Each decode step sits one past
the previous step's position on every row, the reference generate's rule (prompts end in text, where this equals
``cache_len + rope_delta``). Video positions can be fractional (seconds x 13), so positions stay in their dtype.
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
        self.next_position: torch.Tensor | None = None   # [3, 1, 1] or [1, 1]

    def start(self, positions: torch.Tensor) -> StepContext:
        """A fresh sequence whose prompt sits at ``positions`` ([3, 1, P], or [1, P] for 1-D RoPE)."""
        self.cache.reset()
        return self.context(positions)

    def next_context(self) -> StepContext:
        """The context of one decode step."""
        return self.context(self.next_position)

    def context(self, positions: torch.Tensor) -> StepContext:
        slots = self.cache.reserve(positions.shape[-1])
        cos, sin = ok.mrope_cos_sin_ref(positions, self.inv_freq, self.mrope_section, self.dtype)
        self.next_position = positions[..., -1:] + 1
        return StepContext(cos, sin, slots, self.cache.length)
