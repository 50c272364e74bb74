"""The thinker's runner: owns its KV cache and rotary state, runs prefill and decode steps."""
from __future__ import annotations

import torch

from omni_runtime.config import MoeTextConfig
from omni_runtime.engine.decoder_state import DecoderState
from omni_runtime.models.thinker import Thinker
from omni_runtime.multimodal import PromptInputs


class ThinkerRunner:
    def __init__(self, thinker: Thinker, cfg: MoeTextConfig, max_len: int, device: torch.device, dtype: torch.dtype):
        self.thinker = thinker
        self.state = DecoderState(cfg, max_len, device, dtype)

    @property
    def max_len(self) -> int:
        return self.state.cache.max_len

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.thinker.model.embed_tokens(token_ids)

    @torch.inference_mode()
    def prefill(self, prompt: PromptInputs,
                capture_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (logits [1, V] of the last prompt token, the hidden state number ``capture_layer`` of every prompt
        position [1, P, H] when asked, for the talker)."""
        return self.thinker(prompt.embeds, self.state.start(prompt.positions), self.state.cache, capture_layer,
                            prompt.deepstack)

    @torch.inference_mode()
    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids: [1, 1] -> logits [1, V] of the next token."""
        return self.thinker(self.embed(token_ids), self.state.next_context(), self.state.cache)[0]
