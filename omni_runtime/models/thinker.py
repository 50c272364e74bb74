"""The thinker's text decoder: embeddings, 48 (released) MoE decoder layers, final norm and an untied LM head.

Shape legend: B batch, T new tokens, H hidden, V vocabulary.
"""
from __future__ import annotations

import torch
from torch import nn

from omni_runtime.config import MoeTextConfig
from omni_runtime.kv_cache import StaticKVCache
from omni_runtime.layers import DecoderLayer, RMSNorm, StepContext
from omni_runtime.multimodal import Deepstack


class ThinkerTextModel(nn.Module):
    def __init__(self, cfg: MoeTextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: StaticKVCache, capture_layer: int | None = None,
                deepstack: Deepstack | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [B, T, H] layer-0 inputs -> (final-norm hidden [B, T, H], hidden state number ``capture_layer``:
        the output of layer ``capture_layer - 1``, the reference's ``hidden_states[capture_layer]``, taken before
        the DeepStack features of that layer are added; the reference's last hidden state is the final-norm one,
        so capturing after the last layer returns that)."""
        captured = x if capture_layer == 0 else None
        h = self.layers[0].input_layernorm(x)
        for index, layer in enumerate(self.layers):
            following = self.layers[index + 1].input_layernorm if index + 1 < len(self.layers) else self.norm
            stacked = deepstack is not None and index < len(deepstack.features)
            x, h = layer(x, h, ctx, cache.layer(index), None if stacked else following)   # [B, T, H]
            if index + 1 == capture_layer:
                captured = x
            if stacked:   # the next norm sees the stream with this layer's DeepStack features added
                x = x.clone()
                x[:, deepstack.mask] = x[:, deepstack.mask] + deepstack.features[index].to(x.dtype)
                h = following(x)
        return h, h if capture_layer == len(self.layers) else captured   # the last one: post-norm


class Thinker(nn.Module):
    checkpoint_prefix = "thinker."
    tied_weights = {"lm_head.weight": "model.embed_tokens.weight"}   # with thinker_config.tie_word_embeddings

    def __init__(self, cfg: MoeTextConfig):
        super().__init__()
        self.model = ThinkerTextModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, embeds: torch.Tensor, ctx: StepContext, cache: StaticKVCache, capture_layer: int | None = None,
                deepstack: Deepstack | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """embeds: [B, T, H] -> (next-token logits of the last position, fp32 [B, V], captured hidden or None)."""
        hidden, captured = self.model(embeds, ctx, cache, capture_layer, deepstack)
        return self.lm_head(hidden[:, -1]).float(), captured
