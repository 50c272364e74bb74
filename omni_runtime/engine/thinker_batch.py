"""The thinker's batched runner: up to ``max_batch`` sequences decode together, each in its own row of one static
KV cache, at its own length and rotary position (rows, buckets and padding: engine/batch_rows.py).

It owns its cache apart from the single-sequence ``ThinkerRunner`` (``max_batch`` rows of ``max_len`` slots).
"""
from __future__ import annotations

import torch

from omni_runtime.config import MoeTextConfig
from omni_runtime.engine.batch_rows import BatchedRows, CacheRows
from omni_runtime.engine.graphs import BatchStepGraph
from omni_runtime.layers import StepContext
from omni_runtime.models.thinker import Thinker
from omni_runtime.multimodal import PromptInputs


class BatchedThinkerRunner(BatchedRows):
    name = "batched thinker"

    def __init__(self, thinker: Thinker, cfg: MoeTextConfig, max_batch: int, max_len: int, device: torch.device,
                 dtype: torch.dtype, capture: bool = True):
        super().__init__(cfg, max_batch, max_len, device, dtype, capture)
        self.thinker = thinker
        self.steps: dict[int, BatchStepGraph] = {}

    @torch.inference_mode()
    def prefill(self, row: int, prompt: PromptInputs,
                capture_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt of the sequence in ``row`` -> (logits [1, V] of its last token, the hidden state number
        ``capture_layer`` [1, P, H] when asked), as ``ThinkerRunner.prefill``."""
        ctx, cache = self.prefill_context(row, prompt.positions)                       # [3, 1, P] (or [1, P])
        return self.thinker(prompt.embeds, ctx, cache, capture_layer, prompt.deepstack)

    @torch.inference_mode()
    def decode(self, rows: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """One step of the live sequences in ``rows`` on their tokens [n] -> next-token logits fp32 [n, V]."""
        return self.step_rows(rows, tokens.view(-1, 1))

    def _step(self, batch: int) -> BatchStepGraph:
        if batch not in self.steps:
            kv = self.state.cache.kv

            def step(ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
                embeds = self.thinker.model.embed_tokens(ids)                               # [b, 1, H]
                return self.thinker(embeds, ctx, CacheRows(kv, slice(0, batch)))[0]           # [b, V]

            like = torch.zeros(batch, 1, dtype=torch.int64, device=self.state.device)
            self.steps[batch] = BatchStepGraph(step, self.state, like, batch, self.capture)
        return self.steps[batch]


class RowPrefill:
    """One row of a batched runner behind the single-sequence runner's ``prefill`` (what ``ThinkerStream`` calls)."""

    def __init__(self, runner: BatchedThinkerRunner, row: int):
        self.runner, self.row = runner, row

    def prefill(self, prompt: PromptInputs, capture_layer: int | None = None):
        return self.runner.prefill(self.row, prompt, capture_layer)
