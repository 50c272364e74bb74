"""The talker (speaks codebook 0 of each 80 ms frame) and its code predictor (codebooks 1..15 of the frame).

Shape legend: B batch, T new tokens, H talker hidden, Ht thinker hidden, V codec vocabulary, Q code groups (16).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omni_runtime.config import MoeTextConfig, TalkerConfig
from omni_runtime.kv_cache import StaticKVCache
from omni_runtime.layers import DecoderLayer, RMSNorm, StepContext, decoder_stack


class ResizeMLP(nn.Module):
    """Thinker width -> talker width: Linear -> SiLU -> Linear, with biases."""

    def __init__(self, d_in: int, d_mid: int, d_out: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(d_in, d_mid)
        self.linear_fc2 = nn.Linear(d_mid, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.silu(self.linear_fc1(x)))


class Decoder(nn.Module):
    """Decoder layers and final norm over a static KV cache; MoE or dense layers as the config says."""

    def __init__(self, cfg: MoeTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: StepContext, cache: StaticKVCache) -> torch.Tensor:
        return decoder_stack(self.layers, self.norm, x, ctx, cache)                    # [B, T, H]


class TalkerModel(Decoder):
    def __init__(self, cfg: MoeTextConfig):
        super().__init__(cfg)
        self.codec_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)   # codebook 0 + codec specials


class CodePredictorModel(Decoder):
    def __init__(self, cfg: MoeTextConfig, num_code_groups: int):
        super().__init__(cfg)
        self.codec_embedding = nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.hidden_size)
                                             for _ in range(num_code_groups - 1))   # codebooks 1..Q-1


class CodePredictor(nn.Module):
    def __init__(self, cfg: MoeTextConfig, num_code_groups: int):
        super().__init__()
        self.model = CodePredictorModel(cfg, num_code_groups)
        self.lm_head = nn.ModuleList(nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
                                     for _ in range(num_code_groups - 1))


class Talker(nn.Module):
    checkpoint_prefix = "talker."
    tied_weights = {"codec_head.weight": "model.codec_embedding.weight"}   # with talker_config.tie_word_embeddings

    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        hidden = cfg.text.hidden_size
        self.model = TalkerModel(cfg.text)
        self.codec_head = nn.Linear(hidden, cfg.text.vocab_size, bias=False)
        self.text_projection = ResizeMLP(cfg.thinker_hidden_size, cfg.projection_size, hidden)
        self.hidden_projection = ResizeMLP(cfg.thinker_hidden_size, cfg.projection_size, hidden)
        self.code_predictor = CodePredictor(cfg.code_predictor, cfg.num_code_groups)
