"""One sampled draw in one kernel: repetition penalty (a seen mask), suppressed tokens, temperature, top-k, top-p and
the draw, per row, for vocabularies up to ``MAX_FUSED_VOCAB`` (the talker's 3072 codes, the predictor's 2048).

``Sampler`` runs the reference's logits processors op by op (``omni_kernels.sampling``): 12 ATen ops a talker draw
and 13 a predictor draw (counted on CPU; multinomial and sort are several kernels each on CUDA), and a sampled talker
frame draws 16 times (codebook 0, then 15 predictor steps), ~200 launches of a few microseconds each inside the
frame's graph, against two a draw here (the race's noise and the kernel).

The draw is the exponential race torch.multinomial(probs, 1) itself runs: argmax(probs / q) with
q = empty_like(probs).exponential_(generator), which picks token i with probability probs[i]. The caller draws q
exactly so, from the stream's generator, so the noise is the reference's, draw for draw; the kernel computes probs
as the reference does (fp32, the max subtracted, the exponential, a correctly rounded division by the sum: libdevice's
``expf`` on a GPU, as torch's softmax) in another summation order. A seed therefore gives the reference's tokens
unless two tokens' probs / q agree to the last bits (the sum's rounding can swap them: a measure-zero event in
practice, ~1e-7 relative).

The kept set is the reference's: top-k keeps every logit >= the k-th largest (ties included, as the reference's
``logits < kth`` mask); top-p drops the smallest probabilities whose running sum stays <= 1 - top_p and never the
largest. Both thresholds are found by bisection on the values' bit patterns instead of a sort: a group of equal
probabilities straddling the top-p boundary stays whole here, where the reference's sort (unspecified order on
ties) drops part of it, and a token whose running sum lies within rounding (~1e-6) of 1 - top_p may fall on the
other side, the sums being added in another order. With fp32 logits ties are rare and the tests' seeded draws equal
the reference's; bf16 logits (8 bits of mantissa) tie often, so there a seed's draws part ways now and then.
"""
from __future__ import annotations

import torch

from omni_kernels._triton import ACCURATE_EXP, tl, torch_exp, triton, triton_runs
from omni_kernels.dispatch import REGISTRY, everywhere
from omni_kernels.sampling import penalised_logits, sample_ref, sample_rows_ref, warped_probs

# One program holds its row in registers: on sm_90, 8192 fp32 over 16 warps take 107 registers a thread, no spills;
# 16384 spills even over 32 warps (compiled with triton 3.7, cuobjdump --dump-resource-usage).
MAX_FUSED_VOCAB = 8192


def sample_draw_ref(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                    generators: list[torch.Generator | None], seen: torch.Tensor | None = None,
                    penalty: float = 1.0, suppress: torch.Tensor | None = None) -> torch.Tensor:
    """The draw ``Sampler`` makes, op by op as the reference's logits processors: the penalty on the ``seen`` [B, V]
    mask, the ``suppress`` [V] tokens, then ``sample_ref`` with one generator for every row (``generators`` of one)
    or ``sample_rows_ref`` with one per row -> tokens [B] int64."""
    logits = penalised_logits(logits, seen, penalty, suppress)
    if len(generators) == 1:
        return sample_ref(logits, temperature, top_k, top_p, generators[0])
    return sample_rows_ref(logits, temperature, top_k, top_p, generators)


def sample_with_noise_ref(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, noise: torch.Tensor,
                          seen: torch.Tensor | None = None, penalty: float = 1.0,
                          suppress: torch.Tensor | None = None) -> torch.Tensor:
    """The fused draw's spec with the race's noise given: logits [B, V], noise [B, V] ~ Exp(1) -> tokens [B]."""
    logits = penalised_logits(logits.float(), seen, penalty, suppress)
    return (warped_probs(logits, temperature, top_k, top_p) / noise).argmax(dim=-1)


@triton.jit
def _order_key(x):
    """fp32 -> int64 ordered as the floats (-0.0 as +0.0, -inf lowest; no NaN)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)


@triton.jit
def _softmax(x, ACCURATE: tl.constexpr):
    """softmax over the row as torch computes it: exp(x - max) / sum, the division correctly rounded."""
    e = torch_exp(x - tl.max(x, axis=0), ACCURATE)     # 0 where masked (-inf)
    return tl.math.div_rn(e, tl.full(e.shape, 1.0, tl.float32) * tl.sum(e, axis=0))


@triton.jit
def _fused_sample_kernel(logits_ptr, seen_ptr, suppress_ptr, noise_ptr, out_ptr, vocab,
                         stride_lb, stride_lv, stride_sb, stride_sv, stride_nb,
                         temperature, penalty, top_k, top_p_drop,
                         HAS_SEEN: tl.constexpr, HAS_SUPPRESS: tl.constexpr, TOP_K: tl.constexpr,
                         TOP_P: tl.constexpr, ACCURATE_EXP: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    valid = offs < vocab
    x = tl.load(logits_ptr + row * stride_lb + offs * stride_lv, mask=valid, other=float("-inf")).to(tl.float32)
    if HAS_SEEN:   # CTRL penalty on the tokens seen so far (apply_repetition_penalty_seen)
        seen = tl.load(seen_ptr + row * stride_sb + offs * stride_sv, mask=valid, other=0) != 0
        x = tl.where(seen, tl.where(x < 0, x * penalty, tl.math.div_rn(x, penalty)), x)
    if HAS_SUPPRESS:
        x = tl.where(tl.load(suppress_ptr + offs, mask=valid, other=0) != 0, float("-inf"), x)
    x = tl.math.div_rn(x, temperature)          # correctly rounded, as torch's division (Triton's `/` is not)
    key = _order_key(x)
    lowest = tl.min(tl.where(valid, key, 2**40), axis=0)
    if TOP_K:   # the k-th largest key: the largest t with #(key >= t) >= k, by bisection over the 2^32 keys
        lo, hi = lowest, tl.max(tl.where(valid, key, -2**40), axis=0)
        for _ in range(33):
            mid = lo + (hi - lo + 1) // 2
            enough = tl.sum((valid & (key >= mid)).to(tl.int32), axis=0) >= top_k
            lo, hi = tl.where(enough, mid, lo), tl.where(enough, hi, mid - 1)
        x = tl.where(key >= lo, x, float("-inf"))
        key = _order_key(x)
    p = _softmax(x, ACCURATE_EXP)
    if TOP_P:   # drop keys <= the largest t whose probability mass sum(p, key <= t) stays <= 1 - top_p
        highest = tl.max(tl.where(valid, key, -2**40), axis=0)
        lo, hi = lowest - 1, highest
        for _ in range(34):
            mid = lo + (hi - lo + 1) // 2
            within = tl.sum(tl.where(key <= mid, p, 0.0), axis=0) <= top_p_drop
            lo, hi = tl.where(within, mid, lo), tl.where(within, hi, mid - 1)
        p = _softmax(tl.where((key <= lo) & (key < highest), float("-inf"), x), ACCURATE_EXP)   # over the kept
    q = tl.load(noise_ptr + row * stride_nb + offs, mask=valid, other=1.0)
    race = tl.where(valid & (p > 0.0), tl.math.div_rn(p, q), -1.0)    # torch.multinomial's probs / q, argmax
    tl.store(out_ptr + row, tl.argmax(race, axis=0).to(tl.int64))


def num_warps(block_v: int) -> int:
    return min(max(block_v // 512, 4), 16)   # 16 values a thread from 8192 up, 4 warps below 2048


def fused_sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, noise: torch.Tensor, *,
                 seen: torch.Tensor | None = None, penalty: float = 1.0,
                 suppress: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] (V <= MAX_FUSED_VOCAB), temperature > 0, the race's ``noise`` [B, V] fp32 ~ Exp(1) (what
    torch.multinomial draws: ``exponential_`` from the generator) -> tokens [B] int64. ``seen`` [B, V] bool with
    ``penalty``; ``suppress`` [V] bool."""
    batch, vocab = logits.shape
    if not 0 < vocab <= MAX_FUSED_VOCAB:
        raise ValueError(f"fused_sample: vocabulary {vocab} outside [1, {MAX_FUSED_VOCAB}]")
    if temperature <= 0:
        raise ValueError(f"fused_sample draws (temperature > 0), got temperature={temperature}; greedy is argmax")
    if noise.shape != logits.shape:
        raise ValueError(f"fused_sample: noise {tuple(noise.shape)} must match logits {tuple(logits.shape)}")
    noise = noise.float().contiguous()
    if seen is not None and seen.shape != logits.shape:
        raise ValueError(f"fused_sample: seen {tuple(seen.shape)} must match logits {tuple(logits.shape)}")
    if suppress is not None and suppress.shape != (vocab,):
        raise ValueError(f"fused_sample: suppress must be [{vocab}], got {tuple(suppress.shape)}")
    for name, t in (("noise", noise), ("seen", seen), ("suppress", suppress)):
        if t is not None and t.device != logits.device:
            raise ValueError(f"fused_sample: {name} on {t.device}, logits on {logits.device}")
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return out
    has_seen = seen is not None and penalty != 1.0
    seen_arg = seen.view(torch.uint8) if has_seen else logits
    suppress_arg = suppress.contiguous().view(torch.uint8) if suppress is not None else logits
    block_v = triton.next_power_of_2(vocab)
    _fused_sample_kernel[(batch,)](
        logits, seen_arg, suppress_arg, noise, out, vocab, *logits.stride(),
        *(seen_arg.stride() if has_seen else (0, 0)), noise.stride(0), float(temperature), float(penalty),
        int(top_k), 1.0 - float(top_p), HAS_SEEN=has_seen, HAS_SUPPRESS=suppress is not None,
        TOP_K=0 < top_k < vocab, TOP_P=top_p < 1.0, ACCURATE_EXP=ACCURATE_EXP, BLOCK_V=block_v,
        num_warps=num_warps(block_v))
    return out


def race_noise(logits: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """The Exp(1) noise torch.multinomial(probs, 1) draws for ``logits``' rows: one ``exponential_`` over [B, V]
    from a single generator (``sample_ref``), or one over each row from its own (``sample_rows_ref``)."""
    draw = lambda rows, g: torch.empty(rows, logits.shape[-1], device=logits.device).exponential_(  # noqa: E731
        generator=g)
    if len(generators) == 1:
        return draw(logits.shape[0], generators[0])
    return torch.cat([draw(1, g) for g in generators])


def _sample_draw_fused(logits, temperature, top_k, top_p, generators, seen=None, penalty=1.0, suppress=None):
    """``sample_draw_ref`` as one kernel: the race's noise drawn from the generators as torch.multinomial draws it,
    then ``fused_sample``. Greedy draws and larger vocabularies (the thinker's) take the reference."""
    if temperature == 0.0 or logits.shape[-1] > MAX_FUSED_VOCAB:
        return sample_draw_ref(logits, temperature, top_k, top_p, generators, seen, penalty, suppress)
    return fused_sample(logits, temperature, top_k, top_p, race_noise(logits, generators), seen=seen,
                        penalty=penalty, suppress=suppress)


REGISTRY.register("sample_draw", "torch", everywhere)(sample_draw_ref)
# opt-in: not yet timed against the reference's ~dozen launches on a GPU
REGISTRY.register("sample_draw", "triton", triton_runs, opt_in=True)(_sample_draw_fused)


def sample_draw(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generators: list[torch.Generator | None], seen: torch.Tensor | None = None, penalty: float = 1.0,
                suppress: torch.Tensor | None = None) -> torch.Tensor:
    """One draw of every row of ``logits`` [B, V] fp32 (see ``sample_draw_ref``) -> tokens [B] int64."""
    kernel = REGISTRY.select("sample_draw", logits.device)
    return kernel.fn(logits, temperature, top_k, top_p, generators, seen, penalty, suppress)
