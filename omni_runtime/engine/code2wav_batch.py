"""Code2Wav for concurrent answers: ``max_batch`` rows, each an answer's own stream at its own frame position, whose
due chunks decode in one batched push.

Row ``r`` carries what a static ``Code2WavStream`` carries (the last window - 1 frames of keys/values of every
transformer layer, every conv's left context, every transposed conv's lookahead) in row ``r`` of buffers
[max_batch + 1, ...], and its frame position in ``positions[r]``. A push of n frames for some rows gathers their
state, runs one decode over the gathered batch (RoPE positions and window masks per row) and scatters the state
back, so each row's samples are those of its own stream. A row's first push runs apart from later ones: it has no
transposed-conv lookahead yet and yields 555 samples fewer. A push is padded to a bucket (1, 2, 4, ..., max_batch)
with the spare last row, whose state nobody reads. On a GPU each (bucket, frames, first push or not) is one CUDA
graph, captured on first use, which replays the gather, the decode and the scatter from the row indices it is given.
"""
from __future__ import annotations

import torch
from torch import nn

from omni_runtime.engine.batch_rows import RowPool
from omni_runtime.engine.graphs import Code2WavChunkGraph
from omni_runtime.models.code2wav import Code2Wav, StreamState, _as_tuple


class Code2WavRows(RowPool):
    name = "batched Code2Wav"

    def __init__(self, model: Code2Wav, max_batch: int, capture: bool = True):
        super().__init__(max_batch)
        self.model, self.capture = model, capture
        self.device = model.code_embedding.weight.device
        self.frames = [0] * max_batch                   # frames pushed per row, on the host
        self.positions = torch.zeros(max_batch + 1, dtype=torch.int64, device=self.device)   # the same, per row
        self.carried: dict[nn.Module, object] = {}   # as a stream carries them, [max_batch + 1, ...]: from the 1st push
        self.graphs: dict[tuple[int, int, bool], Code2WavChunkGraph] = {}   # (bucket, frames, first push)

    def release(self, row: int) -> None:
        """Ends the row's stream: its next owner starts a new one (the stale state is never read)."""
        super().release(row)
        self.frames[row] = 0
        self.positions[row] = 0

    @torch.inference_mode()
    def push(self, rows: list[int], codes: torch.Tensor) -> torch.Tensor:
        """codes: [len(rows), Q, n] the next n frames of each row's stream -> fp32 [len(rows), 1, samples]: 1920 n,
        less 555 when it is the rows' first push (every row of a push is at its first push, or none is)."""
        self._check(rows, codes)
        first = self.frames[rows[0]] == 0
        batch, count = self.bucket(len(rows)), len(rows)
        index = torch.tensor(rows + [self.max_batch] * (batch - count), device=self.device)
        padded = codes.new_zeros(batch, *codes.shape[1:])
        padded[:count] = codes
        if not self.carried:   # the first push makes the row buffers
            wav = self._push(index, padded, first)
        else:
            key = (batch, codes.shape[-1], first)
            if key not in self.graphs:
                self.graphs[key] = Code2WavChunkGraph(lambda i, c: self._push(i, c, first), (index, padded),
                                                      self.buffers(), self.capture)
            wav = self.graphs[key](index, padded)
        for row in rows:
            self.frames[row] += codes.shape[-1]
        return wav[:count]

    def buffers(self) -> list[torch.Tensor]:
        """Every tensor a push reads and writes besides its inputs."""
        return [t for value in self.carried.values() for t in _as_tuple(value)] + [self.positions]

    def _check(self, rows: list[int], codes: torch.Tensor) -> None:
        self.model.check_codes(codes)
        if not rows or len(set(rows)) != len(rows) or codes.shape[0] != len(rows):
            raise ValueError(f"{self.name}: a push takes distinct rows and one row of codes each, got rows {rows} "
                             f"for codes {tuple(codes.shape)}")
        idle = [r for r in rows if not 0 <= r < self.max_batch or not self.live[r]]
        if idle:
            raise ValueError(f"{self.name}: rows {idle} hold no stream (acquire a row first)")
        if len({self.frames[r] == 0 for r in rows}) > 1:
            raise ValueError(f"{self.name}: rows {rows} mix first pushes with later ones; push them apart")

    def _push(self, index: torch.Tensor, codes: torch.Tensor, first: bool) -> torch.Tensor:
        """The rows ``index`` [b] decode ``codes`` [b, Q, n] from their carried state: what a graph captures."""
        gathered = {} if first else {m: _map(value, lambda t: t[index]) for m, value in self.carried.items()}
        work = StreamState(static=True, fresh=first, carried=gathered, position_tensor=self.positions[index])
        wav = self.model.decode(codes, work)
        if not self.carried:
            self.carried = {m: _map(value, lambda t: t.new_zeros(self.max_batch + 1, *t.shape[1:]))
                            for m, value in work.carried.items()}
        for module, value in work.carried.items():
            for rows_buffer, new in zip(_as_tuple(self.carried[module]), _as_tuple(value)):
                rows_buffer.index_copy_(0, index, new)
        self.positions.index_copy_(0, index, work.position_tensor + codes.shape[-1])
        return wav


def _map(value, fn):
    """``fn`` on a carried tensor, or on each of a tuple of them."""
    return tuple(fn(t) for t in value) if isinstance(value, tuple) else fn(value)
