"""Token sampling: greedy, temperature, top-k, top-p and repetition penalty, seeded, all on the logits' device.

The order is the reference's (transformers logits processors): repetition penalty, suppressed tokens, temperature,
top-k, top-p, then a draw from the softmax. Temperature 0 means greedy (argmax) and skips every warper.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from omni_kernels.fused_sampling import sample_draw
from omni_kernels.sampling import apply_repetition_penalty, apply_repetition_penalty_seen, apply_top_k, apply_top_p

__all__ = ["Sampler", "SamplingParams", "apply_repetition_penalty", "apply_repetition_penalty_seen", "apply_top_k",
           "apply_top_p"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0                  # 0 = off
    top_p: float = 1.0              # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    seed: int | None = None

    def __post_init__(self):
        # checked here, not at the first draw: a bad setting found mid-answer would fail every row of a batch
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name, value in (("top_k", self.top_k), ("seed", 0 if self.seed is None else self.seed)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def warpers(self) -> tuple[float, int, float, float]:
        """What a draw computes, without the seed: equal warpers share a captured graph."""
        return self.temperature, self.top_k, self.top_p, self.repetition_penalty


class Sampler:
    """Applies one ``SamplingParams`` to a stream of logits; owns the seeded generator of that stream."""

    def __init__(self, params: SamplingParams, device: torch.device, suppress: torch.Tensor | None = None,
                 generator: torch.Generator | None = None):
        """``suppress``: optional bool mask [V] of tokens that may never be drawn (the talker's codec specials).
        ``generator``: draw from this one as it stands (a runner's generator that a CUDA graph registered) instead of
        a new one seeded from ``params.seed``."""
        self.params = params
        self.suppress = suppress
        if not params.greedy and generator is None:
            generator = torch.Generator(device=device)
            if params.seed is not None:
                generator.manual_seed(params.seed)
            else:
                generator.seed()
        self.generator = None if params.greedy else generator

    def __call__(self, logits: torch.Tensor, history: torch.Tensor | None = None,
                 seen: torch.Tensor | None = None) -> torch.Tensor:
        """logits: [B, V] fp32, history: [B, N] token ids seen so far, or ``seen``: the same as a [B, V] bool mask
        (graph-safe) -> next tokens [B] int64."""
        return self._draw(logits, [self.generator], history, seen)

    def draw_rows(self, logits: torch.Tensor, generators: list[torch.Generator | None],
                  seen: torch.Tensor | None = None) -> torch.Tensor:
        """This sampler's setting over the rows of ``logits`` [B, V], row i drawing from ``generators[i]`` (each row
        a stream of its own: the tokens each would draw alone) -> [B]."""
        return self._draw(logits, generators, None, seen)

    def _draw(self, logits, generators, history, seen) -> torch.Tensor:
        p = self.params
        if p.repetition_penalty != 1.0 and seen is None and history is not None and history.numel():
            logits = apply_repetition_penalty(logits, history, p.repetition_penalty)
        return sample_draw(logits, p.temperature, p.top_k, p.top_p, generators, seen, p.repetition_penalty,
                           self.suppress)
