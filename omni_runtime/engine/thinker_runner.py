"""The thinker's runner: owns its KV cache and rotary state, runs prefill and decode steps.

Positions are TM-RoPE rows ``[3, B, T]`` (t, h, w). After a prefill whose largest position is ``m`` over ``P``
tokens, decode step positions are ``cache_len + rope_delta`` with ``rope_delta = m + 1 - P`` on all three rows.
"""
from __future__ import annotations

import torch

import omni_kernels as ok
from omni_runtime.config import MoeTextConfig
from omni_runtime.kv_cache import StaticKVCache
from omni_runtime.layers import StepContext
from omni_runtime.models.thinker import Thinker


class ThinkerRunner:
    def __init__(self, thinker: Thinker, cfg: MoeTextConfig, max_len: int, device: torch.device, dtype: torch.dtype):
        self.thinker, self.cfg, self.dtype = thinker, cfg, dtype
        self.cache = StaticKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, max_len, dtype, device)
        self.inv_freq = ok.rope_inv_freq(cfg.head_dim, cfg.rope_theta).to(device)
        self.rope_delta = 0

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.thinker.model.embed_tokens(token_ids)

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """embeds: [1, P, H], positions: [3, 1, P] -> logits [1, V] of the last prompt token."""
        self.cache.reset()
        self.rope_delta = int(positions.max()) + 1 - embeds.shape[1]
        return self._step(embeds, positions)

    @torch.inference_mode()
    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids: [1, 1] -> logits [1, V] of the next token."""
        position = self.cache.length + self.rope_delta
        positions = torch.full((3, 1, 1), position, dtype=torch.int64, device=token_ids.device)
        return self._step(self.embed(token_ids), positions)

    def _step(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        slots = self.cache.reserve(embeds.shape[1])
        cos, sin = ok.mrope_cos_sin_ref(positions, self.inv_freq, self.cfg.mrope_section, self.dtype)
        ctx = StepContext(cos, sin, slots, self.cache.length)
        return self.thinker(embeds, ctx, self.cache)
