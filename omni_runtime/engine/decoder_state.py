"""What a decoder runner keeps between steps: its KV cache and where its rotary positions stand.

Positions are TM-RoPE rows ``[3, B, T]`` (t, h, w), or ``[B, T]`` for 1-D RoPE. Each decode step sits one past
the previous step's position on every row, the reference generate's rule (prompts end in text, where this equals
``cache_len + rope_delta``). Video positions can be fractional (seconds x position_id_per_seconds), so positions
stay in their dtype.
"""
from __future__ import annotations

import torch

import omni_kernels as ok
from omni_runtime.config import MoeTextConfig
from omni_runtime.kv_cache import StaticKVCache
from omni_runtime.layers import DecoderLayer, StepContext


class DecoderState:
    def __init__(self, cfg: MoeTextConfig, max_len: int, device: torch.device, dtype: torch.dtype,
                 multimodal_rope: bool = True, batch: int = 1):
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.cache = StaticKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, max_len, dtype,
                                   device, batch)
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

    def step_in_one_call(self, x: torch.Tensor, weights: ok.DecoderWeights) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step through ``ok.decoder_step`` (the C++ twin on a CPU): x [1, H] ->
        (post-norm hidden [1, H], logits fp32 [1, V])."""
        ctx = self.next_context()
        return ok.decoder_step(x, weights, self.cache.kv, ctx.kv_len - 1, ctx.cos.view(-1), ctx.sin.view(-1))

    def rows_in_one_call(self, x: torch.Tensor, weights: ok.DecoderWeights,
                         ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step of cache rows 0..b-1 through ``ok.decoder_step``, at the slots and rotary rows of a
        batched step's ``ctx``: x [b, H] -> (post-norm hidden [b, H], logits fp32 [b, V])."""
        rows = x.shape[0]
        return ok.decoder_step(x, weights, self.cache.kv, ctx.cache_positions.view(rows), ctx.cos.view(rows, -1),
                               ctx.sin.view(rows, -1))

    def one_call_weights(self, layers: list[DecoderLayer], norm: torch.Tensor,
                         head: torch.Tensor) -> ok.DecoderWeights | None:
        """The weights ``step_in_one_call``/``rows_in_one_call`` take, where their C++ twin applies (fp32 on a
        CPU); else None."""
        if self.device.type != "cpu" or self.dtype != torch.float32:
            return None
        cfg = self.cfg
        return ok.DecoderWeights(tuple(layer.step_weights() for layer in layers), norm, head,
                                 cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_experts_per_tok,
                                 cfg.norm_topk_prob, cfg.rms_norm_eps)

    def steps_in_one_call(self, weights: ok.DecoderWeights | None) -> bool:
        return weights is not None and ok.selected_backend("decoder_step", self.device) == "cpp"
