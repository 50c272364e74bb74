"""How much prompt work a tick of the speech engine may do without starving the answers already speaking.

A client plays an answer from its first packet on; the answer's slack is the audio it has been sent minus the time
since (``SpokenAnswer.slack``). A speaking answer's next packet is up to ``chunk_frames`` ticks away, each costing up
to the longest of the last ticks' work besides prompt work; what its slack leaves beyond that is this tick's
``spare`` seconds. Two kinds of prompt work spend it:

- **Thinker prefill.** n tokens after ``prefix`` tokens the row holds already cost about ``fixed + n * per_token +
  pairs * per_pair`` seconds (``PrefillCost``): an MoE prefill reads every expert's weights whatever n is, so
  ``fixed`` is large, and causal attention scores ``pairs = n * (prefix + (n + 1) / 2)`` query-key pairs, which make
  a long prompt's late chunks dearer than its first (for the released thinker, attention is about a third of a
  token's FLOPs at 4k tokens of context, four fifths at 30k). The budget is the n the spare seconds buy at the next
  chunk's prefix, up to ``max_tokens`` (the thinker's ``prefill_tokens``). A prompt of up to ``min_tokens`` always
  prefills at once: the first packet is what users wait for, and such a prefill costs little more than the fixed
  cost. With less budget than ``min_tokens`` a longer prompt waits for the slack to grow (a bigger chunk later pays
  the fixed cost once), but never more than ``patience`` ticks in a row, so a prompt always progresses.
- **Encoders.** A request's audio and vision encoders run whole when it is admitted; m media tokens (its
  ``<|audio_pad|>``, ``<|image_pad|>`` and ``<|video_pad|>`` placeholders) cost about ``fixed + m * per_token``
  seconds on a fit of their own. A request whose encoders do not fit in what is left of the spare seconds waits,
  at most ``patience`` ticks; requests behind it that fit are admitted meanwhile.

Both costs are fitted (non-negative least squares) to the last measurements, when one is recorded. With nobody
speaking, or nothing measured yet, nothing is held back.
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

import numpy as np


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


def attention_pairs(tokens: int, prefix: int) -> int:
    """Query-key pairs a causal prefill of ``tokens`` tokens scores after ``prefix`` cached ones."""
    return tokens * prefix + tokens * (tokens + 1) // 2


class PrefillCost:
    """seconds ~ fixed + tokens * per_token + pairs * per_pair (``attention_pairs``), fitted to the last ``window``
    prefills. The fit is the non-negative least-squares one: of the column subsets the samples determine (full column
    rank), the best whose own least-squares solution is non-negative; on a tie the earlier of (fixed, token, pair),
    (fixed, token), (token, pair), (fixed, pair), (token), (pair), (fixed), so one sample is all per token (which
    overestimates bigger prefills, the safe side)."""

    SUBSETS = ((0, 1, 2), (0, 1), (1, 2), (0, 2), (1,), (2,), (0,))

    def __init__(self, window: int = 16):
        self.samples: deque[tuple[int, int, float]] = deque(maxlen=window)
        self.fit: tuple[float, float, float] | None = None   # (fixed, per_token, per_pair) seconds

    def record(self, tokens: int, pairs: int, seconds: float) -> None:
        if not tokens:
            return
        self.samples.append((tokens, pairs, seconds))
        columns = np.array([[1.0, n, p] for n, p, _ in self.samples])
        times = np.array([t for *_, t in self.samples])
        # normal equations on unit-norm columns (1, n and pairs differ by orders of magnitude): 7 solves of <= 3 x 3
        scale = np.linalg.norm(columns, axis=0)
        gram, rhs = (columns / scale).T @ (columns / scale), (columns / scale).T @ times
        best = None
        for subset in self.SUBSETS:
            g = gram[np.ix_(subset, subset)]
            if np.linalg.det(g) < 1e-10:   # the samples do not tell these columns apart
                continue
            x = np.linalg.solve(g, rhs[list(subset)])
            if (x < 0).any():
                continue
            residual = float(times @ times - 2 * x @ rhs[list(subset)] + x @ g @ x)
            x = x / scale[list(subset)]
            if best is None or residual < best[0] - 1e-12 * float(times @ times):
                fit = [0.0, 0.0, 0.0]
                for column, value in zip(subset, x):
                    fit[column] = float(value)
                best = residual, tuple(fit)
        if best is not None:   # (token) alone qualifies unless the seconds are negative (a clock gone back)
            self.fit = best[1]

    def seconds(self, tokens: int, prefix: int = 0) -> float | None:
        if self.fit is None:
            return None
        fixed, per_token, per_pair = self.fit
        return fixed + tokens * per_token + attention_pairs(tokens, prefix) * per_pair

    def tokens_within(self, seconds: float, prefix: int = 0) -> float:
        """The most tokens (not rounded) a prefill after ``prefix`` cached tokens may take in ``seconds``: the
        positive root of fixed + n * per_token + n * (prefix + (n + 1) / 2) * per_pair = seconds."""
        fixed, per_token, per_pair = self.fit
        a, b, left = per_pair / 2, per_token + per_pair * (prefix + 0.5), seconds - fixed
        if left < 0:
            return 0.0
        if b <= 0 and a == 0:
            return math.inf
        # the root 2 left / (b + sqrt(b^2 + 4 a left)): the textbook (-b + sqrt(...)) / 2a cancels to 0 when a is
        # tiny next to b (a fit of linear timings leaves a ~1e-22 per pair)
        return 2 * left / (b + math.sqrt(b * b + 4 * a * left))


class PrefillPacer:
    def __init__(self, min_tokens: int = 256, patience: int = 8, clock: Callable[[], float] = time.perf_counter):
        self.min_tokens, self.patience, self.clock = min_tokens, patience, clock
        self.prefill = PrefillCost()                                # thinker prefill seconds
        self.encoders = LinearCost()                                # encoder seconds per media token
        self.ticks: deque[float] = deque(maxlen=8)                  # seconds of recent ticks besides prompt work
        self.waited = 0   # ticks in a row that prefilled nothing while a prompt waited

    def cost(self) -> tuple[float, float, float] | None:
        """(fixed, per_token, per_pair) seconds of a thinker prefill; None before any."""
        return self.prefill.fit

    def spare(self, slacks: list[float], ticks_to_packet: int) -> float | None:
        """Seconds of prompt work this tick allows, given the speaking answers' slacks; None: no limit."""
        if not slacks:
            return None
        return min(slacks) - ticks_to_packet * max(self.ticks, default=0.0)

    def budget(self, slacks: list[float], max_tokens: int, ticks_to_packet: int, spent: float = 0.0,
               prefix: int = 0) -> int:
        """Prompt tokens this tick may prefill, given the speaking answers' slacks (seconds), the seconds of prompt
        work (encoders) this tick already ``spent`` and the tokens the next prefill's row holds already (``prefix``:
        a long prompt's chunks so far)."""
        spare = self.spare(slacks, ticks_to_packet)
        if spare is None or self.cost() is None:
            return max_tokens
        # + 1e-6: a least-squares fit lands a hair off round budgets; a token more is harmless
        tokens = int(min(max_tokens, self.prefill.tokens_within(spare - spent, prefix) + 1e-6))
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

    def record_prefill(self, tokens: int, seconds: float, pairs: int | None = None) -> None:
        """A prefill of ``tokens`` tokens whose attention scored ``pairs`` query-key pairs (default: one prompt
        from its start)."""
        self.prefill.record(tokens, attention_pairs(tokens, 0) if pairs is None else pairs, seconds)

    def record_encoders(self, media_tokens: int, seconds: float) -> None:
        self.encoders.record(media_tokens, seconds)

    def record_tick(self, seconds: float, prompt_waited: bool) -> None:
        """A tick's work besides prompt work; ``prompt_waited``: a prompt had tokens to prefill and got none."""
        self.ticks.append(seconds)
        self.waited = self.waited + 1 if prompt_waited else 0
