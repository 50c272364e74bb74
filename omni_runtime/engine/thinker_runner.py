"""The thinker's runner: owns its KV cache and rotary state, runs prefill and decode steps.

A decode step replays a CUDA graph on a GPU; on a CPU (fp32) it is one call of the C++ twin ``ok.decoder_step``.
"""
from __future__ import annotations

import torch

from omni_runtime.config import MoeTextConfig
from omni_runtime.engine.decoder_state import DecoderState
from omni_runtime.engine.graphs import DecodeStepGraph
from omni_runtime.models.thinker import Thinker
from omni_runtime.multimodal import PromptInputs


class ThinkerRunner:
    def __init__(self, thinker: Thinker, cfg: MoeTextConfig, max_len: int, device: torch.device, dtype: torch.dtype):
        self.thinker = thinker
        self.state = DecoderState(cfg, max_len, device, dtype)
        self.decode_graph: DecodeStepGraph | None = None
        self.step_weights = self.state.one_call_weights(thinker.model.layers, thinker.model.norm.weight,
                                                        thinker.lm_head.weight)
        if device.type == "cuda":
            self.use_decode_graph()

    def use_decode_graph(self, capture: bool = True) -> None:
        """Decode through one static step (captured as a CUDA graph on a GPU; eager with ``capture=False``)."""
        token = torch.zeros(1, 1, dtype=torch.int64, device=self.state.device)
        self.decode_graph = DecodeStepGraph(lambda ids, ctx: self.thinker(self.embed(ids), ctx, self.state.cache)[0],
                                            self.state, token, capture)

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
        if self.decode_graph is not None:
            return self.decode_graph(token_ids)
        if self.state.steps_in_one_call(self.step_weights):   # CPU: the C++ twin of the step
            return self.state.step_in_one_call(self.embed(token_ids).view(1, -1), self.step_weights)[1]
        return self.thinker(self.embed(token_ids), self.state.next_context(), self.state.cache)[0]
