"""CUDA graphs: the code predictor's frame (15 dependent steps of a small transformer), the thinker's and talker's
decode steps, the talker's whole frame (its step, codebook-0 sampling and the predictor's frame) and Code2Wav's
streaming chunk, each captured once and replayed.

The frame is static by construction: the predictor's cache is rebuilt every frame, so every frame runs the same
kernels on the same shapes (a 2-token prefill, then 14 single-token steps over 3..16 cached positions). Captured once
per talker runner, a frame costs one graph launch instead of ~15 x 150 kernel launches from Python. Greedy frames
need no random state. Sampled frames draw from a generator registered with the graph: each replay then advances it
by what the captured draws consumed, as eager draws would, so a seed gives the same codes either way (checked once
after capture; a mismatch or a capture error leaves the frame eager). CPU runs take the eager path, the same code.
Each capture, with its warm-up and its check, is an NVTX range ("capture ...").
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

import omni_kernels as ok
from omni_runtime.engine.decoder_state import DecoderState
from omni_runtime.layers import StepContext
from omni_runtime.profiling import stage_range


class CodePredictorGraph:
    """``__call__(hidden [1, 1, H], code0 [1])`` -> (codes [Q-1], frame embedding [1, 1, H]), like ``frame``."""

    def __init__(self, frame: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 hidden_size: int, dtype: torch.dtype, device: torch.device, warmup: int = 2,
                 generator: torch.Generator | None = None):
        """``generator``: the one ``frame`` samples from, if any (registered with the graph at capture)."""
        self.frame, self.warmup, self.generator = frame, warmup, generator
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
            with stage_range("capture code predictor frame"):
                self._capture()
            if self.failed:
                return self.frame(hidden, code0)
        self.graph.replay()
        codes, embed = self.outputs
        return codes.clone(), embed.clone()

    def _capture(self) -> None:
        # warm-up, capture and check all draw: the generator restarts from its seed afterwards, where it stood
        seed = None if self.generator is None else self.generator.initial_seed()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):   # warm up outside capture: Triton compiles, allocators settle
                for _ in range(self.warmup):
                    self.frame(self.hidden, self.code0)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self.generator is not None:
                graph.register_generator_state(self.generator)
            with torch.cuda.graph(graph):
                self.outputs = self.frame(self.hidden, self.code0)
            if self.generator is not None:
                self._check_draws(graph)
            self.graph = graph
        except Exception as e:  # a kernel that cannot be captured: stay correct, lose only speed
            warnings.warn(f"code predictor CUDA-graph capture failed, running it eagerly: {e}", stacklevel=3)
            self.failed, self.graph, self.outputs = True, None, None
        if seed is not None:
            self.generator.manual_seed(seed)

    def _check_draws(self, graph: torch.cuda.CUDAGraph) -> None:
        # The same seed must give the same codes replayed as eager, twice in a row (the second frame shows that a
        # replay advanced the generator as the eager frame did).
        self.generator.manual_seed(0)
        eager = [self.frame(self.hidden, self.code0)[0].clone() for _ in range(2)]
        self.generator.manual_seed(0)
        replayed = []
        for _ in range(2):
            graph.replay()
            replayed.append(self.outputs[0].clone())
        if not all(torch.equal(a, b) for a, b in zip(eager, replayed)):
            raise RuntimeError("sampled codes replayed from the graph differ from eager ones with the same seed")


class DecodeStepGraph:
    """One decode step of a decoder over its static KV cache, with the rotary position, the cache slot and the
    sequence length read from device tensors, so that one captured graph serves every step.

    ``step(*inputs, ctx)`` runs the decoder on the step's inputs (token ids or embeddings, copied into static
    buffers) and returns its outputs. Attention reads the whole cache masked by ``ctx.seq_lens``
    (``decode_attention``) instead of a slice, so numerics differ from the eager path in the last bits.
    ``capture=False`` runs the same step eagerly (tests use it on CPU).

    A step may sample and keep state besides the cache (the talker's frame: codebook-0 and 15 predictor draws, the
    codebook-0 history mask). ``generators`` are registered with the graph, so each replay advances them as eager
    draws would; ``buffers`` are the tensors it updates in place. Warm-up and capture run the step without a real
    step behind it: both leave generators and buffers as they found them. With generators, two replays are checked
    against two eager steps from the same state once after capture; a mismatch or a capture error leaves the step
    eager, with a warning."""

    def __init__(self, step: Callable[..., tuple | torch.Tensor], state: DecoderState,
                 input_like: torch.Tensor | tuple[torch.Tensor, ...], capture: bool = True, warmup: int = 2,
                 generators: tuple[torch.Generator, ...] = (), buffers: tuple[torch.Tensor, ...] = ()):
        self.step, self.state, self.warmup = step, state, warmup
        self.generators, self.buffers = generators, buffers
        device = state.device
        like = input_like if isinstance(input_like, tuple) else (input_like,)
        self.inputs = tuple(torch.zeros_like(t) for t in like)
        rows = (3, 1, 1) if state.mrope_section else (1, 1)
        self.position = torch.zeros(rows, dtype=torch.float32, device=device)
        self.slot = torch.zeros(1, dtype=torch.int64, device=device)
        self.seq_len = torch.zeros(1, dtype=torch.int32, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs = None
        self.capture = capture and device.type == "cuda"

    def __call__(self, *xs: torch.Tensor):
        state = self.state
        slot = state.cache.reserve(1)        # bookkeeping on the host; the kernels read the tensors below
        self.position.copy_(state.next_position)
        self.slot.copy_(slot)
        self.seq_len.fill_(state.cache.length)
        state.next_position = state.next_position + 1
        return self.launch(*xs)

    def launch(self, *xs: torch.Tensor):
        """The step on inputs ``xs`` at the position, slot and length the buffers hold: replayed once captured."""
        for buffer, x in zip(self.inputs, xs, strict=True):
            buffer.copy_(x)
        if not self.capture:
            return self._run()
        if self.graph is None:
            with stage_range("capture decode step"):
                self._capture()
            if self.graph is None:
                return self._run()
        self.graph.replay()
        return tuple(t.clone() for t in self.outputs) if isinstance(self.outputs, tuple) else self.outputs.clone()

    def _run(self):
        state = self.state
        cos, sin = ok.mrope_cos_sin_ref(self.position, state.inv_freq, state.mrope_section, state.dtype)
        return self.step(*self.inputs, StepContext(cos, sin, self.slot, state.cache.max_len, self.seq_len))

    def _snapshot(self) -> Callable[[], None]:
        """-> a function that puts generators and buffers back where they stand now."""
        states = [g.get_state() for g in self.generators]
        saved = [t.clone() for t in self.buffers]

        def restore():
            for generator, rng in zip(self.generators, states):
                generator.set_state(rng)
            for buffer, value in zip(self.buffers, saved):
                buffer.copy_(value)

        return restore

    def _capture(self) -> None:
        restore = self._snapshot()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):   # warm-up writes this step's slot again; the real step overwrites it
                for _ in range(self.warmup):
                    self._run()
            torch.cuda.current_stream().wait_stream(side)
            restore()
            graph = torch.cuda.CUDAGraph()
            for generator in self.generators:
                graph.register_generator_state(generator)
            with torch.cuda.graph(graph):
                self.outputs = self._run()
            if self.generators:
                self._check_draws(graph, restore)
            self.graph = graph
        except Exception as e:
            warnings.warn(f"decode-step CUDA-graph capture failed, running eagerly: {e}", stacklevel=3)
            self.capture, self.graph, self.outputs = False, None, None
        restore()

    def _check_draws(self, graph: torch.cuda.CUDAGraph, restore: Callable[[], None]) -> None:
        # Two steps from the same state, eager then replayed: the second shows a replay advanced the generators (and
        # updated the buffers) as the eager step did.
        flat = lambda out: [t.clone() for t in (out if isinstance(out, tuple) else (out,))]  # noqa: E731
        eager = [flat(self._run()) for _ in range(2)]
        restore()
        replayed = []
        for _ in range(2):
            graph.replay()
            replayed.append(flat(self.outputs))
        if not all(torch.equal(a, b) for e, r in zip(eager, replayed) for a, b in zip(e, r)):
            raise RuntimeError("sampled outputs replayed from the graph differ from eager ones from the same state")


class BatchStepGraph(DecodeStepGraph):
    """A decode step over ``batch`` rows of a cache, each row at its own position, slot and length (the caller's:
    ``__call__(x, positions, slots, seq_lens)``); one per batch bucket of the batched thinker and talker (the
    talker's per bucket and sampling settings: its frame draws from per-row generators, ``generators``)."""

    def __init__(self, step: Callable[..., torch.Tensor | tuple], state: DecoderState, input_like: torch.Tensor,
                 batch: int, capture: bool = True, warmup: int = 2, generators: tuple[torch.Generator, ...] = (),
                 buffers: tuple[torch.Tensor, ...] = ()):
        super().__init__(step, state, input_like, capture, warmup, generators, buffers)
        device = state.device
        rows = (3, batch, 1) if state.mrope_section else (batch, 1)
        self.position = torch.zeros(rows, dtype=torch.float32, device=device)
        self.slot = torch.zeros(batch, 1, dtype=torch.int64, device=device)      # (B, T) cache positions
        self.seq_len = torch.zeros(batch, dtype=torch.int32, device=device)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, seq_lens: torch.Tensor):
        self.position.copy_(positions)
        self.slot.copy_(slots)
        self.seq_len.copy_(seq_lens)
        return self.launch(x)


class Code2WavChunkGraph:
    """One push of static Code2Wav state for a fixed chunk shape, captured once and replayed for every later push of
    that shape: ~300 small kernels (8 transformer layers, ~40 convs) in one launch. ``push(*inputs)`` decodes the
    inputs (copied into static buffers: the codes, and the rows they belong to for batched rows) and updates
    ``buffers``, the carried state, in place; warm-up and capture leave the buffers as they were. ``capture=False``
    (or a failed capture) runs the same push eagerly."""

    def __init__(self, push: Callable[..., torch.Tensor], inputs_like: tuple[torch.Tensor, ...],
                 buffers: list[torch.Tensor], capture: bool = True, warmup: int = 2):
        self.push, self.buffers, self.warmup = push, buffers, warmup
        self.inputs = tuple(torch.zeros_like(t) for t in inputs_like)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None
        self.capture = capture and inputs_like[0].device.type == "cuda"

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """inputs: checked, shaped as ``inputs_like`` -> the push's samples (the caller advances the positions)."""
        if not self.capture:
            return self.push(*inputs)
        for buffer, x in zip(self.inputs, inputs, strict=True):
            buffer.copy_(x)
        if self.graph is None:
            with stage_range("capture code2wav push"):
                self._capture()
            if self.graph is None:
                return self.push(*inputs)
        self.graph.replay()
        return self.output.clone()

    def _capture(self) -> None:
        saved = [t.clone() for t in self.buffers]

        def restore():
            for buffer, value in zip(self.buffers, saved):
                buffer.copy_(value)

        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):   # warm up outside capture: Triton compiles, allocators settle
                for _ in range(self.warmup):
                    self.push(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            restore()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.output = self.push(*self.inputs)
            self.graph = graph
        except Exception as e:
            warnings.warn(f"Code2Wav chunk CUDA-graph capture failed, running eagerly: {e}", stacklevel=3)
            self.capture, self.graph, self.output = False, None, None
        restore()
