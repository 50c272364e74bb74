"""CUDA-graph capture of the code predictor's frame: 15 dependent steps of a small transformer, replayed as one graph.

The frame is static by construction: the predictor's cache is rebuilt every frame, so every frame runs the same
kernels on the same shapes (a 2-token prefill, then 14 single-token steps over 3..16 cached positions). Captured once
per talker runner, a frame costs one graph launch instead of ~15 x 150 kernel launches from Python. Only greedy
frames are captured (argmax needs no random state); sampled frames and CPU runs go through the eager path, which is
the same code.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


class CodePredictorGraph:
    """``__call__(hidden [1, 1, H], code0 [1])`` -> (codes [Q-1], frame embedding [1, 1, H]), like ``frame``."""

    def __init__(self, frame: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 hidden_size: int, dtype: torch.dtype, device: torch.device, warmup: int = 2):
        self.frame, self.warmup = frame, warmup
        self.hidden = torch.zeros(1, 1, hidden_size, dtype=dtype, device=device)
        self.code0 = torch.zeros(1, dtype=torch.int64, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.failed = device.type != "cuda"   # eager everywhere but on a GPU

    def __call__(self, hidden: torch.Tensor, code0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.failed:
            return self.frame(hidden, code0)
        self.hidden.copy_(hidden)
        self.code0.copy_(code0)
        if self.graph is None:
            self._capture()
            if self.failed:
                return self.frame(hidden, code0)
        self.graph.replay()
        codes, embed = self.outputs
        return codes.clone(), embed.clone()

    def _capture(self) -> None:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):   # warm up outside capture: Triton compiles, allocators settle
                for _ in range(self.warmup):
                    self.frame(self.hidden, self.code0)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.outputs = self.frame(self.hidden, self.code0)
            self.graph = graph
        except Exception as e:  # a kernel that cannot be captured: stay correct, lose only speed
            warnings.warn(f"code predictor CUDA-graph capture failed, running it eagerly: {e}", stacklevel=3)
            self.failed, self.graph, self.outputs = True, None, None
