"""How much prompt work a tick of the speech engine may do without starving the answers already speaking.

A client plays an answer from its first packet on; the answer's slack is the audio it has been sent minus the time
since (``SpokenAnswer.slack``). A speaking answer's next packet is up to ``chunk_frames`` ticks away, each costing up
to the longest of the last ticks' work besides prompt work; what its slack leaves beyond that is this tick's
``spare`` seconds. Two kinds of prompt work spend it:

- **Thinker prefill.** n tokens cost about ``fixed + n * per_token`` seconds (an MoE prefill reads every expert's
  weights whatever n is, so ``fixed`` is large). The budget is the n the spare seconds buy, up to ``max_tokens``
  (the thinker's ``prefill_tokens``). A prompt of up to ``min_tokens`` always prefills at once: the first packet is
  what users wait for, and such a prefill costs little more than the fixed cost. With less budget than
  ``min_tokens`` a longer prompt waits for the slack to grow (a bigger chunk later pays the fixed cost once), but
  never more than ``patience`` ticks in a row, so a prompt always progresses.
- **Encoders.** A request's audio and vision encoders run whole when it is admitted; m media tokens (its
  ``<|audio_pad|>``, ``<|image_pad|>`` and ``<|video_pad|>`` placeholders) cost about ``fixed + m * per_token``
  seconds on a fit of their own. A request whose encoders do not fit in what is left of the spare seconds waits,
  at most ``patience`` ticks; requests behind it that fit are admitted meanwhile.

Both costs are least-squares lines through the last measurements, fitted when one is recorded. With nobody
speaking, or nothing measured yet, nothing is held back.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class LinearCost:
    """seconds ~ fixed + n * per_unit, fitted to the last ``window`` (n, seconds) measurements."""

    def __init__(self, window: int = 16):
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)
        self.fit: tuple[float, float] | None = None   # (fixed, per_unit) seconds

    def record(self, n: int, seconds: float) -> None:
        if not n:
            return
        self.samples.append((n, seconds))
        sizes = [m for m, _ in self.samples]
        if len(set(sizes)) < 2:   # one size: all of it per unit (which overestimates bigger ones)
            self.fit = 0.0, max(seconds / n, 1e-9)
            return
        mean_n = sum(sizes) / len(sizes)
        mean_t = sum(t for _, t in self.samples) / len(sizes)
        slope = sum((m - mean_n) * (t - mean_t) for m, t in self.samples) / sum((m - mean_n) ** 2 for m in sizes)
        per_unit = max(slope, 1e-9)
        self.fit = max(mean_t - per_unit * mean_n, 0.0), per_unit

    def seconds(self, n: int) -> float | None:
        return None if self.fit is None else self.fit[0] + n * self.fit[1]


class PrefillPacer:
    def __init__(self, min_tokens: int = 256, patience: int = 8, clock: Callable[[], float] = time.perf_counter):
        self.min_tokens, self.patience, self.clock = min_tokens, patience, clock
        self.prefill = LinearCost()                                 # thinker prefill seconds per prompt token
        self.encoders = LinearCost()                                # encoder seconds per media token
        self.ticks: deque[float] = deque(maxlen=8)                  # seconds of recent ticks besides prompt work
        self.waited = 0   # ticks in a row that prefilled nothing while a prompt waited

    def cost(self) -> tuple[float, float] | None:
        """(fixed, per_token) seconds of a thinker prefill; None before any."""
        return self.prefill.fit

    def spare(self, slacks: list[float], ticks_to_packet: int) -> float | None:
        """Seconds of prompt work this tick allows, given the speaking answers' slacks; None: no limit."""
        if not slacks:
            return None
        return min(slacks) - ticks_to_packet * max(self.ticks, default=0.0)

    def budget(self, slacks: list[float], max_tokens: int, ticks_to_packet: int, spent: float = 0.0) -> int:
        """Prompt tokens this tick may prefill, given the speaking answers' slacks (seconds) and the seconds of
        prompt work (encoders) this tick already ``spent``."""
        spare, cost = self.spare(slacks, ticks_to_packet), self.cost()
        if spare is None or cost is None:
            return max_tokens
        fixed, per_token = cost
        tokens = min(max_tokens, int(max(spare - spent - fixed, 0.0) / per_token))
        floor = min(self.min_tokens, max_tokens)
        if tokens >= floor:
            return tokens
        return floor if self.waited >= self.patience else 0

    def admits_encoders(self, media_tokens: int, slacks: list[float], ticks_to_packet: int, spent: float,
                        waited: int) -> bool:
        """Whether a request's encoders (``media_tokens`` placeholders) may run in this tick, which already spent
        ``spent`` seconds on encoders; ``waited``: ticks this request has been held back so far."""
        spare, estimate = self.spare(slacks, ticks_to_packet), self.encoders.seconds(media_tokens)
        return (not media_tokens or spare is None or estimate is None or waited >= self.patience
                or estimate <= spare - spent)

    def record_prefill(self, tokens: int, seconds: float) -> None:
        self.prefill.record(tokens, seconds)

    def record_encoders(self, media_tokens: int, seconds: float) -> None:
        self.encoders.record(media_tokens, seconds)

    def record_tick(self, seconds: float, prompt_waited: bool) -> None:
        """A tick's work besides prompt work; ``prompt_waited``: a prompt had tokens to prefill and got none."""
        self.ticks.append(seconds)
        self.waited = self.waited + 1 if prompt_waited else 0
