"""How many prompt tokens a tick of the speech engine may prefill without starving the answers already speaking.

A client plays an answer from its first packet on; the answer's slack is the audio it has been sent minus the time
since (``SpokenAnswer.slack``). A prefill of n tokens costs about ``fixed + n * per_token`` seconds (an MoE prefill
reads every expert's weights whatever n is, so ``fixed`` is large), fitted by least squares to the last prefills'
measured times. A speaking answer's next packet is up to ``chunk_frames`` ticks away, each costing up to the longest
of the last ticks' work besides prefill; what its slack leaves beyond that is this tick's prefill time, and the
budget is the n it buys, up to ``max_tokens`` (the thinker's ``prefill_tokens``).

A prompt of up to ``min_tokens`` always prefills at once: the first packet is what users wait for, and such a
prefill costs little more than the fixed cost. With less budget than ``min_tokens`` a longer prompt waits for the
slack to grow (a bigger chunk later pays the fixed cost once), but never more than ``patience`` ticks in a row, so a
prompt always progresses. With nobody speaking, or nothing measured yet, the budget is ``max_tokens``.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class PrefillPacer:
    def __init__(self, min_tokens: int = 256, patience: int = 8, clock: Callable[[], float] = time.perf_counter):
        self.min_tokens, self.patience, self.clock = min_tokens, patience, clock
        self.samples: deque[tuple[int, float]] = deque(maxlen=16)   # (tokens, seconds) of recent prefills
        self.ticks: deque[float] = deque(maxlen=8)                  # seconds of recent ticks besides prefill
        self.waited = 0   # ticks in a row that prefilled nothing while a prompt waited
        self.fit: tuple[float, float] | None = None                 # (fixed, per_token) seconds

    def cost(self) -> tuple[float, float] | None:
        """(fixed, per_token) seconds: None before any prefill; all per token while every prefill had one size
        (which overestimates bigger ones). Fitted when a prefill is recorded, not on every tick."""
        return self.fit

    def budget(self, slacks: list[float], max_tokens: int, ticks_to_packet: int) -> int:
        """Prompt tokens this tick may prefill, given the speaking answers' slacks (seconds)."""
        cost = self.cost()
        if not slacks or cost is None:
            return max_tokens
        fixed, per_token = cost
        spare = min(slacks) - ticks_to_packet * max(self.ticks, default=0.0) - fixed
        tokens = min(max_tokens, int(max(spare, 0.0) / per_token))
        floor = min(self.min_tokens, max_tokens)
        if tokens >= floor:
            return tokens
        return floor if self.waited >= self.patience else 0

    def record_prefill(self, tokens: int, seconds: float) -> None:
        if not tokens:
            return
        self.samples.append((tokens, seconds))
        sizes = [n for n, _ in self.samples]
        if len(set(sizes)) < 2:
            self.fit = 0.0, max(seconds / tokens, 1e-9)
            return
        mean_n = sum(sizes) / len(sizes)
        mean_t = sum(t for _, t in self.samples) / len(sizes)
        slope = sum((n - mean_n) * (t - mean_t) for n, t in self.samples) / sum((n - mean_n) ** 2 for n in sizes)
        per_token = max(slope, 1e-9)
        self.fit = max(mean_t - per_token * mean_n, 0.0), per_token

    def record_tick(self, seconds: float, prompt_waited: bool) -> None:
        """A tick's work besides prefill; ``prompt_waited``: a prompt had tokens to prefill and got none."""
        self.ticks.append(seconds)
        self.waited = self.waited + 1 if prompt_waited else 0
