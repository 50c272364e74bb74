"""The thinker's batched runner: up to ``max_batch`` sequences decode together, each in its own row of one static
KV cache, at its own length and rotary position.

A step runs rows ``0..b-1``, b the smallest bucket (1, 2, 4, ..., max_batch) that covers every live row. A row of the
bucket without a sequence decodes a dummy token into slot 0 of its own (free) row, which the next prefill there
overwrites: padding touches nothing a sequence reads. Each bucket has its own static step (per-row positions, slots
and lengths in device tensors): a CUDA graph on a GPU, captured on first use; eager on a CPU. Rows are taken lowest
first, so a draining batch shrinks its bucket. A prefill runs one sequence alone, over its row of the cache.

It owns its cache apart from the single-sequence ``ThinkerRunner`` (``max_batch`` rows of ``max_len`` slots).
"""
from __future__ import annotations

import torch

import omni_kernels as ok
from omni_runtime.config import MoeTextConfig
from omni_runtime.engine.decoder_state import DecoderState
from omni_runtime.engine.graphs import BatchStepGraph
from omni_runtime.layers import StepContext
from omni_runtime.models.thinker import Thinker
from omni_runtime.multimodal import PromptInputs


class CacheRows:
    """Rows ``rows`` of a batched static cache, as the decoders take a cache (``layer(i)`` -> (k, v) views)."""

    def __init__(self, kv: torch.Tensor, rows: slice):
        self.kv, self.rows = kv, rows

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[0, index, self.rows], self.kv[1, index, self.rows]


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two below ``max_batch``, then ``max_batch``: one captured step each."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return sizes + [max_batch]


class BatchedThinkerRunner:
    def __init__(self, thinker: Thinker, cfg: MoeTextConfig, max_batch: int, max_len: int, device: torch.device,
                 dtype: torch.dtype, capture: bool = True):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.thinker, self.max_batch, self.capture = thinker, max_batch, capture
        self.state = DecoderState(cfg, max_len, device, dtype, batch=max_batch)
        rows = (3, max_batch, 1) if self.state.mrope_section else (max_batch, 1)
        self.next_positions = torch.zeros(rows, dtype=torch.float32, device=device)   # each row's next position
        self.lengths = torch.zeros(max_batch, dtype=torch.int64, device=device)      # cached tokens per row
        self.host_lengths = [0] * max_batch                                            # the same, on the host
        self.live = [False] * max_batch
        self.buckets = batch_buckets(max_batch)
        self.steps: dict[int, BatchStepGraph] = {}

    @property
    def max_len(self) -> int:
        return self.state.cache.max_len

    def free_rows(self) -> int:
        return self.live.count(False)

    def acquire(self) -> int:
        """The lowest free row (a new sequence's), or a ValueError when every row is live."""
        if all(self.live):
            raise ValueError(f"all {self.max_batch} rows of the batched thinker are in use")
        row = self.live.index(False)
        self.live[row] = True
        return row

    def release(self, row: int) -> None:
        self.live[row] = False
        self.lengths[row] = self.host_lengths[row] = 0   # padding steps write slot 0 of this row until a prefill

    @torch.inference_mode()
    def prefill(self, row: int, prompt: PromptInputs,
                capture_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt of the sequence in ``row`` -> (logits [1, V] of its last token, the hidden state number
        ``capture_layer`` [1, P, H] when asked), as ``ThinkerRunner.prefill``."""
        state, positions = self.state, prompt.positions                               # [3, 1, P] (or [1, P])
        length = positions.shape[-1]
        if length > self.max_len:
            raise ValueError(f"prompt ({length} tokens) exceeds the {self.max_len} positions of the batched cache")
        cos, sin = ok.mrope_cos_sin_ref(positions, state.inv_freq, state.mrope_section, state.dtype)
        ctx = StepContext(cos, sin, torch.arange(length, device=state.device), length)
        out = self.thinker(prompt.embeds, ctx, CacheRows(state.cache.kv, slice(row, row + 1)), capture_layer,
                           prompt.deepstack)
        self.next_positions[..., row:row + 1, :] = positions[..., -1:] + 1
        self.lengths[row] = self.host_lengths[row] = length
        return out

    @torch.inference_mode()
    def decode(self, rows: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """One step of the live sequences in ``rows`` on their tokens [n] -> next-token logits fp32 [n, V]."""
        full = [r for r in rows if not self.live[r] or self.host_lengths[r] >= self.max_len]
        if full:
            raise ValueError(f"rows {full} are free or hold all {self.max_len} positions of the batched cache")
        batch = next(b for b in self.buckets if b > max(rows))
        index = torch.tensor(rows, device=self.state.device)
        ids = torch.zeros(batch, 1, dtype=torch.int64, device=self.state.device)
        ids[index, 0] = tokens.view(-1)
        lengths = self.lengths[:batch]
        logits = self._step(batch)(ids, self.next_positions[..., :batch, :], lengths.view(batch, 1),
                                   (lengths + 1).int())
        self.lengths[index] += 1
        self.next_positions[..., index, :] += 1
        for r in rows:
            self.host_lengths[r] += 1
        return logits[index]

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
