"""Token sampling: greedy, temperature, top-k, top-p and repetition penalty, seeded, all on the logits' device.

The order is the reference's (transformers logits processors): repetition penalty, suppressed tokens, temperature,
top-k, top-p, then a draw from the softmax. Temperature 0 means greedy (argmax) and skips every warper.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0                  # 0 = off
    top_p: float = 1.0              # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    seed: int | None = None

    def __post_init__(self):
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

    def __call__(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """logits: [B, V] fp32, history: [B, N] token ids seen so far -> next tokens [B] int64."""
        p = self.params
        if p.repetition_penalty != 1.0 and history is not None and history.numel():
            logits = apply_repetition_penalty(logits, history, p.repetition_penalty)
        if self.suppress is not None:
            logits = logits.masked_fill(self.suppress, float("-inf"))
        if p.greedy:
            return logits.argmax(dim=-1)
        logits = logits / p.temperature
        if p.top_k:
            logits = apply_top_k(logits, p.top_k)
        if p.top_p < 1.0:
            logits = apply_top_p(logits, p.top_p)
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    # CTRL-style: seen tokens' positive logits are divided by the penalty, negative ones multiplied.
    seen = logits.gather(-1, history)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(-1, history, seen)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    # Drop the lowest-probability tokens whose cumulative mass stays within 1 - top_p; always keep the best one.
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
