"""Sampling warpers as the reference applies them (transformers logits processors), on any device.

``sample_ref`` is the draw of one step without history: temperature, top-k, top-p, then a multinomial draw from the
softmax; temperature 0 is greedy (argmax). The runtime's ``Sampler`` adds the repetition penalty and suppressed
tokens in front; the C++ code-predictor frame calls the same ATen ops in the same order, so equal logits give equal
draws from equal generator states.
"""
from __future__ import annotations

import torch


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    # CTRL-style: seen tokens' positive logits are divided by the penalty, negative ones multiplied.
    seen = logits.gather(-1, history)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(-1, history, seen)


def apply_repetition_penalty_seen(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """``apply_repetition_penalty`` with the history given as a mask: seen [B, V] bool, True for every token in it.
    The same bits (the same two elementwise ops on the same entries), but static shapes and no host read, so a
    CUDA graph can hold it while the history grows."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def penalised_logits(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float,
                     suppress: torch.Tensor | None) -> torch.Tensor:
    """The processors in front of the warpers: the penalty on the ``seen`` [B, V] tokens, ``suppress`` [V] to -inf."""
    if seen is not None and penalty != 1.0:
        logits = apply_repetition_penalty_seen(logits, seen, penalty)
    return logits if suppress is None else logits.masked_fill(suppress, float("-inf"))


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


def sample_ref(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: [B, V] fp32 -> tokens [B] int64. top_k 0 and top_p 1.0 are off."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    return torch.multinomial(warped_probs(logits, temperature, top_k, top_p), 1, generator=generator).squeeze(-1)


def sample_rows_ref(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                    generators: list[torch.Generator]) -> torch.Tensor:
    """``sample_ref`` of each row from its own generator: logits [B, V] fp32 -> tokens [B]. The warpers run once over
    all rows (each row's bits are its own, as alone); only the draws go row by row, so each row draws what it would
    alone from its generator (a batch of concurrent streams, one seed each)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = warped_probs(logits, temperature, top_k, top_p)
    return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g).view(1) for i, g in enumerate(generators)])


def warped_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution a draw samples from: temperature, top-k, top-p, softmax."""
    logits = logits / temperature
    if top_k:
        logits = apply_top_k(logits, top_k)
    if top_p < 1.0:
        logits = apply_top_p(logits, top_p)
    return torch.softmax(logits, dim=-1)
