"""Static KV cache: one allocation per model, sized once, handed to the layers as views.

Layout ``[2, layers, batch, kv_heads, max_len, head_dim]`` (k then v). Token slot s of a sequence holds its s-th
token, so a decode step writes slot ``length`` and attends over slots ``[0, length]``. The cache belongs to one
runner (thinker and talker each own theirs); it never grows, and writing past ``max_len`` is refused before any
work starts.
"""
from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype,
                 device: torch.device, batch: int = 1):
        self.max_len = max_len
        self.kv = torch.zeros(2, layers, batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.length = 0  # tokens held

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[0, index], self.kv[1, index]

    def reset(self) -> None:
        self.length = 0

    def reserve(self, new_tokens: int) -> torch.Tensor:
        """Slots for the next ``new_tokens`` tokens, as a (T,) int64 tensor on the cache's device."""
        if self.length + new_tokens > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.length} used, {new_tokens} more asked")
        slots = torch.arange(self.length, self.length + new_tokens, device=self.kv.device)
        self.length += new_tokens
        return slots
