"""Rows of one static KV cache, each holding its own sequence at its own length and rotary position: what the
batched thinker and the batched talker share.

A step runs rows ``0..b-1``, b the smallest bucket (1, 2, 4, ..., max_batch) that covers every live row. A row of the
bucket without a sequence runs a dummy input into slot 0 of its own (free) row, which the next prefill there
overwrites: padding touches nothing a sequence reads. Each bucket has its own static step (per-row positions, slots
and lengths in device tensors): a CUDA graph on a GPU, captured on first use; eager on a CPU. Rows are taken lowest
first, so a draining batch shrinks its bucket. A prefill runs one sequence alone, over its row of the cache.
"""
from __future__ import annotations

import torch

import omni_kernels as ok
from omni_runtime.config import MoeTextConfig
from omni_runtime.engine.decoder_state import DecoderState
from omni_runtime.engine.graphs import BatchStepGraph
from omni_runtime.kv_cache import StaticKVCache
from omni_runtime.layers import StepContext

DEFAULT_PREFILL_TOKENS = 4096   # prompt tokens per prefill forward (padding included); longer prompts go in chunks


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


class RowPool:
    """Which of ``max_batch`` rows hold a sequence; a new one takes the lowest free row."""

    name = "batched decoder"

    def __init__(self, max_batch: int):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.live = [False] * max_batch
        self.buckets = batch_buckets(max_batch)

    def free_rows(self) -> int:
        return self.live.count(False)

    def acquire(self) -> int:
        """The lowest free row (a new sequence's), or a ValueError when every row is live."""
        if all(self.live):
            raise ValueError(f"all {self.max_batch} rows of the {self.name} are in use")
        row = self.live.index(False)
        self.live[row] = True
        return row

    def release(self, row: int) -> None:
        self.live[row] = False

    def bucket(self, rows: int) -> int:
        """The smallest bucket that holds ``rows`` rows."""
        return next(b for b in self.buckets if b >= rows)


class BatchedRows(RowPool):
    """``max_batch`` rows of ``max_len`` slots. Subclasses say what a step computes (``_step``: the static step of
    one bucket, taking the bucket's inputs, positions, slots and lengths)."""

    def __init__(self, cfg: MoeTextConfig, max_batch: int, max_len: int, device: torch.device, dtype: torch.dtype,
                 capture: bool = True):
        super().__init__(max_batch)
        self.capture = capture
        self.prefill_tokens = DEFAULT_PREFILL_TOKENS
        self.state = DecoderState(cfg, max_len, device, dtype, batch=max_batch)
        rows = (3, max_batch, 1) if self.state.mrope_section else (max_batch, 1)
        self.next_positions = torch.zeros(rows, dtype=torch.float32, device=device)   # each row's next position
        self.lengths = torch.zeros(max_batch, dtype=torch.int64, device=device)      # cached tokens per row
        self.host_lengths = [0] * max_batch                                            # the same, on the host

    @property
    def max_len(self) -> int:
        return self.state.cache.max_len

    def release(self, row: int) -> None:
        super().release(row)
        self.lengths[row] = self.host_lengths[row] = 0   # padding steps write slot 0 of this row until a prefill

    def prefill_context(self, row: int, positions: torch.Tensor, start: int = 0) -> tuple[StepContext, CacheRows]:
        """The context of prompt tokens at ``positions`` ([3, 1, T] or [1, T]) in ``row``, after the ``start``
        tokens the row holds already (a prompt prefilled in chunks), and that row of the cache; the row's length
        and next position are those after these tokens from now on."""
        state, length = self.state, start + positions.shape[-1]
        if length > self.max_len:
            raise ValueError(f"prompt ({length} tokens) exceeds the {self.max_len} positions of the {self.name}'s "
                             "cache")
        cos, sin = ok.mrope_cos_sin_ref(positions, state.inv_freq, state.mrope_section, state.dtype)
        ctx = StepContext(cos, sin, torch.arange(start, length, device=state.device), length)
        self.next_positions[..., row:row + 1, :] = positions[..., -1:] + 1
        self.lengths[row] = self.host_lengths[row] = length
        return ctx, CacheRows(state.cache.kv, slice(row, row + 1))

    def prefill_groups(self, lengths: list[int], alone: set[int] = frozenset(),
                       forward_tokens: int | None = None) -> list[list[int]]:
        """Indices of prompts of ``lengths`` tokens in groups that prefill as one right-padded forward each, in
        order, ``forward_tokens`` (default ``prefill_tokens``) padded tokens at most a group; those in ``alone``
        each by itself."""
        limit = self.prefill_tokens if forward_tokens is None else forward_tokens
        groups: list[list[int]] = []
        joinable: list[int] = []   # the group the next prompt may join
        for i, length in enumerate(lengths):
            if i in alone:
                groups.append([i])
            elif joinable and (len(joinable) + 1) * max(lengths[j] for j in joinable + [i]) <= limit:
                joinable.append(i)
            else:
                joinable = [i]
                groups.append(joinable)
        return groups

    def prefill_padded(self, rows: list[int], embeds: list[torch.Tensor], positions: list[torch.Tensor], forward):
        """Prompts (``embeds`` [1, L_i, H] at ``positions`` [3, 1, L_i] or [1, L_i]) of the sequences in ``rows``,
        right-padded into one forward over a scratch cache (causal attention never lets a token see the padding
        behind it), then each into its row -> (``forward(embeds [n, L, H], ctx, scratch)``'s outputs, the lengths
        L_i). The row's length and next position are its prompt's from now on."""
        state, n = self.state, len(rows)
        lengths = [e.shape[1] for e in embeds]
        longest = max(lengths)
        if longest > self.max_len:
            raise ValueError(f"prompt ({longest} tokens) exceeds the {self.max_len} positions of the {self.name}'s "
                             "cache")
        padded = embeds[0].new_zeros(n, longest, embeds[0].shape[-1])                           # [n, L, H]
        padded_positions = positions[0].new_zeros(*positions[0].shape[:-2], n, longest)         # [3, n, L]
        for i, (e, p, length) in enumerate(zip(embeds, positions, lengths)):
            padded[i, :length] = e[0]
            padded_positions[..., i, :length] = p[..., 0, :]
            # the padding continues the positions (any finite rotary rows would do: no real token sees them)
            padded_positions[..., i, length:] = p[..., 0, -1:] + torch.arange(1, longest - length + 1,
                                                                             device=state.device)
        cos, sin = ok.mrope_cos_sin_ref(padded_positions, state.inv_freq, state.mrope_section, state.dtype)
        scratch = StaticKVCache(state.cfg.num_hidden_layers, state.cfg.num_key_value_heads, state.cfg.head_dim,
                                longest, state.dtype, state.device, n)
        out = forward(padded, StepContext(cos, sin, torch.arange(longest, device=state.device), longest), scratch)
        for i, (row, length) in enumerate(zip(rows, lengths)):
            state.cache.kv[:, :, row, :, :length] = scratch.kv[:, :, i, :, :length]
            self.next_positions[..., row, :] = padded_positions[..., i, length - 1:length] + 1
            self.lengths[row] = self.host_lengths[row] = length
        return out, lengths

    def step_rows(self, rows: list[int], x: torch.Tensor):
        """One step of the live sequences in ``rows`` on their inputs ``x`` [n, ...] -> the step's outputs (a tensor
        or a tuple of tensors, each [n, ...]) for those rows, in their order."""
        full = [r for r in rows if not self.live[r] or self.host_lengths[r] >= self.max_len]
        if full:
            raise ValueError(f"rows {full} are free or hold all {self.max_len} positions of the {self.name}'s cache")
        batch = self.bucket(max(rows) + 1)
        index = torch.tensor(rows, device=self.state.device)
        padded = x.new_zeros(batch, *x.shape[1:])
        padded[index] = x
        lengths = self.lengths[:batch]
        out = self._step(batch)(padded, self.next_positions[..., :batch, :], lengths.view(batch, 1),
                                (lengths + 1).int())
        self.lengths[index] += 1
        self.next_positions[..., index, :] += 1
        for r in rows:
            self.host_lengths[r] += 1
        return tuple(t[index] for t in out) if isinstance(out, tuple) else out[index]

    def _step(self, batch: int) -> BatchStepGraph:
        raise NotImplementedError
