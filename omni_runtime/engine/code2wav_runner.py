"""Code2Wav's runner: one static stream whose carried buffers live as long as the model, and a CUDA graph per
(chunk shape, first push of an answer or not) that replays every push once the buffers exist: from the second push
of the first answer on, and for every push of later answers, the first audio packet's included.

Like the thinker's and talker's runners it serves one request at a time; ``start()`` begins the next stream in the
same buffers, so graphs captured for one request replay for the next.
"""
from __future__ import annotations

import torch

from omni_runtime.engine.graphs import Code2WavChunkGraph
from omni_runtime.models.code2wav import Code2Wav, Code2WavStream


class Code2WavRunner:
    def __init__(self, model: Code2Wav, capture: bool = True):
        self.stream = Code2WavStream(model, static=True)
        self.capture = capture
        self.graphs: dict[tuple, Code2WavChunkGraph] = {}   # keyed (B, Q, n, an answer's first push)

    @property
    def frames(self) -> int:
        return self.stream.frames

    def start(self) -> Code2WavRunner:
        self.stream.reset()
        return self

    @torch.inference_mode()
    def push(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [B, Q, n] the next n frames -> fp32 [B, 1, samples], as ``Code2WavStream.push``."""
        stream = self.stream
        carried = next(iter(stream.state.tensors()), None) if stream.state.carried else None
        if carried is not None and codes.dim() == 3 and codes.shape[0] != carried.shape[0]:
            # checked before the stream takes the codes: a refused push leaves it as it was
            raise ValueError(f"Code2WavRunner: its static buffers hold batches of {carried.shape[0]}, got codes "
                             f"{tuple(codes.shape)} (a runner serves one batch size)")
        stream.check(codes)
        if not stream.state.carried:   # the very first push makes the buffers
            wav = stream.decode_checked(codes)
        else:
            key = (*codes.shape, stream.state.fresh)
            if key not in self.graphs:
                self.graphs[key] = Code2WavChunkGraph(stream.decode_checked, (codes,), stream.state.tensors(),
                                                      self.capture)
            wav = self.graphs[key](codes)
        stream.advance(codes.shape[-1])
        return wav

    def flush(self) -> torch.Tensor:
        return self.stream.flush()
