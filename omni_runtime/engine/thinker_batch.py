"""The thinker's batched runner: up to ``max_batch`` sequences decode together, each in its own row of one static
KV cache, at its own length and rotary position (rows, buckets and padding: engine/batch_rows.py).

It owns its cache apart from the single-sequence ``ThinkerRunner`` (``max_batch`` rows of ``max_len`` slots).
"""
from __future__ import annotations

import torch

import omni_kernels as ok
from omni_runtime.config import MoeTextConfig
from omni_runtime.engine.batch_rows import BatchedRows, CacheRows
from omni_runtime.engine.graphs import BatchStepGraph
from omni_runtime.kv_cache import StaticKVCache
from omni_runtime.layers import StepContext
from omni_runtime.models.thinker import Thinker
from omni_runtime.multimodal import Deepstack, PromptInputs

DEFAULT_PREFILL_TOKENS = 4096   # prompt tokens per prefill forward (padding included); longer prompts go in chunks


class BatchedThinkerRunner(BatchedRows):
    name = "batched thinker"

    def __init__(self, thinker: Thinker, cfg: MoeTextConfig, max_batch: int, max_len: int, device: torch.device,
                 dtype: torch.dtype, capture: bool = True):
        super().__init__(cfg, max_batch, max_len, device, dtype, capture)
        self.thinker = thinker
        self.prefill_tokens = DEFAULT_PREFILL_TOKENS
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
    def prefill_many(self, rows: list[int], prompts: list[PromptInputs],
                     capture_layer: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The prompts of the sequences in ``rows`` -> what ``prefill`` returns for each, in their order. Prompts
        are prefilled together, ``prefill_tokens`` padded tokens at most per forward (a longer prompt alone; the
        engines give those a ``ChunkedPrefill`` instead, pipeline.py): an MoE prefill reads every
        expert's weights whatever its token count, so n prompts in one forward cost little more than one. Each
        goes right-padded into a scratch cache (causal attention never lets a token see the padding behind it),
        then into its row. Prompts with DeepStack features (images, video) prefill alone."""
        groups: list[list[int]] = []
        joinable: list[int] = []   # the group the next prompt without DeepStack may join
        for i, prompt in enumerate(prompts):
            if prompt.deepstack is not None:
                groups.append([i])
            elif joinable and (len(joinable) + 1) * max(prompts[j].positions.shape[-1] for j in joinable + [i]) \
                    <= self.prefill_tokens:
                joinable.append(i)
            else:
                joinable = [i]
                groups.append(joinable)
        out: dict[int, tuple] = {}
        for group in groups:
            if len(group) == 1:
                out[group[0]] = self.prefill(rows[group[0]], prompts[group[0]], capture_layer)
            else:
                out.update(zip(group, self._prefill_together([rows[j] for j in group], [prompts[j] for j in group],
                                                             capture_layer)))
        return [out[i] for i in range(len(prompts))]

    def _prefill_together(self, rows: list[int], prompts: list[PromptInputs], capture_layer: int | None):
        state, n = self.state, len(prompts)
        lengths = [p.positions.shape[-1] for p in prompts]
        longest = max(lengths)
        if longest > self.max_len:
            raise ValueError(f"prompt ({longest} tokens) exceeds the {self.max_len} positions of the {self.name}'s "
                             "cache")
        embeds = prompts[0].embeds.new_zeros(n, longest, prompts[0].embeds.shape[-1])            # [n, L, H]
        positions = prompts[0].positions.new_zeros(*prompts[0].positions.shape[:-2], n, longest)  # [3, n, L]
        for i, (prompt, length) in enumerate(zip(prompts, lengths)):
            embeds[i, :length] = prompt.embeds[0]
            positions[..., i, :length] = prompt.positions[..., 0, :]
            # the padding continues the positions (any finite rotary rows would do: no real token sees them)
            positions[..., i, length:] = prompt.positions[..., 0, -1:] + torch.arange(1, longest - length + 1,
                                                                                     device=state.device)
        cos, sin = ok.mrope_cos_sin_ref(positions, state.inv_freq, state.mrope_section, state.dtype)
        scratch = StaticKVCache(state.cfg.num_hidden_layers, state.cfg.num_key_value_heads, state.cfg.head_dim,
                                longest, state.dtype, state.device, n)
        ctx = StepContext(cos, sin, torch.arange(longest, device=state.device), longest)
        hidden, captured = self.thinker.model(embeds, ctx, scratch, capture_layer)                 # [n, L, H]
        last = torch.tensor(lengths, device=state.device) - 1
        logits = self.thinker.lm_head(hidden[torch.arange(n, device=state.device), last]).float()  # [n, V]
        results = []
        for i, (row, length) in enumerate(zip(rows, lengths)):
            self.state.cache.kv[:, :, row, :, :length] = scratch.kv[:, :, i, :, :length]
            self.next_positions[..., row, :] = positions[..., i, length - 1:length] + 1
            self.lengths[row] = self.host_lengths[row] = length
            results.append((logits[i:i + 1], None if captured is None else captured[i:i + 1, :length]))
        return results

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
