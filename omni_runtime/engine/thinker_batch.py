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
from omni_runtime.multimodal import Deepstack, PromptInputs



class BatchedThinkerRunner(BatchedRows):
    name = "batched thinker"

    def __init__(self, thinker: Thinker, cfg: MoeTextConfig, max_batch: int, max_len: int, device: torch.device,
                 dtype: torch.dtype, capture: bool = True):
        super().__init__(cfg, max_batch, max_len, device, dtype, capture)
        self.thinker = thinker
        self.step_weights = self.state.one_call_weights(thinker.model.layers, thinker.model.norm.weight,
                                                        thinker.lm_head.weight)
        self.steps: dict[int, BatchStepGraph] = {}

    @torch.inference_mode()
    def prefill(self, row: int, prompt: PromptInputs,
                capture_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt of the sequence in ``row`` -> (logits [1, V] of its last token, the hidden state number
        ``capture_layer`` [1, P, H] when asked), as ``ThinkerRunner.prefill``."""
        ctx, cache = self.prefill_context(row, prompt.positions)                       # [3, 1, P] (or [1, P])
        return self.thinker(prompt.embeds, ctx, cache, capture_layer, prompt.deepstack)

    @torch.inference_mode()
    def prefill_part(self, row: int, prompt: PromptInputs, start: int, end: int,
                     capture_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens ``start:end`` of the prompt in ``row``, whose first ``start`` tokens it holds already -> (logits
        [1, V] of token ``end - 1``, the hidden state number ``capture_layer`` of these tokens [1, end - start, H]
        when asked). Attention reads the row's cached keys before ``start``, so chunks in order give ``prefill``'s
        cache and last logits, up to the rounding of GEMMs over fewer rows."""
        ctx, cache = self.prefill_context(row, prompt.positions[..., start:end], start)
        return self.thinker(prompt.embeds[:, start:end], ctx, cache, capture_layer,
                            deepstack_part(prompt.deepstack, start, end))

    @torch.inference_mode()
    def prefill_many(self, rows: list[int], prompts: list[PromptInputs], capture_layer: int | None = None,
                     forward_tokens: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The prompts of the sequences in ``rows`` -> what ``prefill`` returns for each, in their order. Prompts
        are prefilled together (``prefill_padded``), ``forward_tokens`` (default ``prefill_tokens``) padded tokens
        at most per forward (a longer prompt alone; the engines give those a ``ChunkedPrefill`` instead,
        pipeline.py): an MoE prefill reads every expert's weights whatever its token count, so n prompts in one
        forward cost little more than one. Prompts with DeepStack features (images, video) prefill alone."""
        alone = {i for i, p in enumerate(prompts) if p.deepstack is not None}
        out: dict[int, tuple] = {}
        for group in self.prefill_groups([p.positions.shape[-1] for p in prompts], alone, forward_tokens):
            if len(group) == 1:
                out[group[0]] = self.prefill(rows[group[0]], prompts[group[0]], capture_layer)
                continue
            (hidden, captured), lengths = self.prefill_padded(
                [rows[j] for j in group], [prompts[j].embeds for j in group], [prompts[j].positions for j in group],
                lambda embeds, ctx, cache: self.thinker.model(embeds, ctx, cache, capture_layer))   # [n, L, H]
            last = torch.tensor(lengths, device=hidden.device) - 1
            logits = self.thinker.lm_head(hidden[torch.arange(len(group), device=hidden.device), last]).float()
            for i, (j, length) in enumerate(zip(group, lengths)):
                out[j] = logits[i:i + 1], None if captured is None else captured[i:i + 1, :length]
        return [out[i] for i in range(len(prompts))]

    @torch.inference_mode()
    def decode(self, rows: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """One step of the live sequences in ``rows`` on their tokens [n] -> next-token logits fp32 [n, V]."""
        return self.step_rows(rows, tokens.view(-1, 1))

    def _step(self, batch: int) -> BatchStepGraph:
        if batch not in self.steps:
            kv = self.state.cache.kv

            def step(ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
                embeds = self.thinker.model.embed_tokens(ids)                               # [b, 1, H]
                if self.state.steps_in_one_call(self.step_weights):   # CPU: the C++ twin over the rows
                    return self.state.rows_in_one_call(embeds.view(batch, -1), self.step_weights, ctx)[1]
                return self.thinker(embeds, ctx, CacheRows(kv, slice(0, batch)))[0]           # [b, V]

            like = torch.zeros(batch, 1, dtype=torch.int64, device=self.state.device)
            self.steps[batch] = BatchStepGraph(step, self.state, like, batch, self.capture)
        return self.steps[batch]


def deepstack_part(deepstack: Deepstack | None, start: int, end: int) -> Deepstack | None:
    """The DeepStack features of prompt tokens ``start:end``: their visual positions and those positions' rows."""
    if deepstack is None:
        return None
    first = int(deepstack.mask[:start].sum())
    count = int(deepstack.mask[start:end].sum())
    return Deepstack(deepstack.mask[start:end], [f[first:first + count] for f in deepstack.features])
