"""Sampling against transformers' logits processors, which define what the reference model samples from."""
import pytest
import torch

from omni_runtime.sampling import (Sampler, SamplingParams, apply_repetition_penalty, apply_repetition_penalty_seen,
                                   apply_top_k, apply_top_p)


def test_greedy_is_argmax_and_ignores_seed():
    logits = torch.randn(3, 1000)
    sampler = Sampler(SamplingParams(temperature=0.0, top_k=5, seed=3), torch.device("cpu"))
    assert torch.equal(sampler(logits), logits.argmax(-1))


def test_same_seed_same_draws_different_seed_different_draws():
    logits = torch.randn(1, 5000)

    def stream(seed):
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed), torch.device("cpu"))
        return [int(sampler(logits)) for _ in range(20)]

    assert stream(1) == stream(1)
    assert stream(1) != stream(2)


def test_a_given_generator_draws_as_a_seeded_sampler():
    # what the code predictor's graphs rely on: the runner's generator, reseeded with a request's seed, draws the
    # request's stream (and a given generator is used as it stands, not reseeded from params.seed)
    logits = torch.randn(1, 3000)
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.8, seed=11)
    own = Sampler(params, torch.device("cpu"))
    given = Sampler(SamplingParams(temperature=0.9, top_k=50, top_p=0.8, seed=99), torch.device("cpu"),
                    generator=torch.Generator().manual_seed(own.generator.initial_seed()))
    assert [int(own(logits)) for _ in range(20)] == [int(given(logits)) for _ in range(20)]


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.9, top_k=50, top_p=0.8, repetition_penalty=1.3),
                                    SamplingParams(temperature=1.0), SamplingParams(temperature=0.0, top_k=5)])
def test_rows_draw_from_their_own_generators_as_alone(params):
    # a batch of concurrent streams: warped together, each row drawn from its own generator gives that row's
    # stream alone, draw after draw
    cpu = torch.device("cpu")
    logits = torch.randn(5, 3000, generator=torch.Generator().manual_seed(0))
    seen = torch.rand(5, 3000, generator=torch.Generator().manual_seed(1)) < 0.1
    suppress = torch.zeros(3000, dtype=torch.bool)
    suppress[-100:] = True
    batched = Sampler(params, cpu, suppress)
    rows = [torch.Generator().manual_seed(7 + i) for i in range(5)]
    alone = [Sampler(params, cpu, suppress, generator=torch.Generator().manual_seed(7 + i)) for i in range(5)]
    for _ in range(3):
        got = batched.draw_rows(logits, rows, seen)
        expected = torch.cat([alone[i](logits[i:i + 1], seen=seen[i:i + 1]) for i in range(5)])
        assert torch.equal(got, expected) and (got < 2900).all()


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 300)
    for params in (SamplingParams(temperature=0.7, top_k=1, seed=0), SamplingParams(temperature=1.3, top_p=1e-6)):
        assert torch.equal(Sampler(params, torch.device("cpu"))(logits), logits.argmax(-1))


def test_warpers_match_transformers():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    logits = torch.randn(2, 512)
    history = torch.randint(0, 512, (2, 40))
    torch.testing.assert_close(apply_repetition_penalty(logits, history, 1.05),
                               RepetitionPenaltyLogitsProcessor(1.05)(history, logits.clone()))
    assert torch.equal(apply_top_k(logits, 50), TopKLogitsWarper(50)(history, logits.clone()))
    assert torch.equal(apply_top_p(logits, 0.8), TopPLogitsWarper(0.8)(history, logits.clone()))


@pytest.mark.parametrize("history_len", [0, 1, 40, 300])
def test_penalty_over_a_seen_mask_is_the_penalty_over_the_history(history_len):
    # The talker's frame graph keeps its codebook-0 history as a [1, V] mask: the same bits as the id list, repeats
    # and all (the history holds duplicates; positive and negative logits; the empty history is a no-op).
    logits = torch.randn(2, 512) * 3
    history = torch.randint(0, 512, (2, history_len))
    seen = torch.zeros(2, 512, dtype=torch.bool).scatter_(1, history, True)
    expected = apply_repetition_penalty(logits, history, 1.05) if history_len else logits
    assert torch.equal(apply_repetition_penalty_seen(logits, seen, 1.05), expected)
    params = SamplingParams(temperature=0.9, top_k=50, repetition_penalty=1.05, seed=4)
    by_history, by_mask = Sampler(params, torch.device("cpu")), Sampler(params, torch.device("cpu"))
    assert [by_history(logits, history).tolist() for _ in range(10)] == \
        [by_mask(logits, seen=seen).tolist() for _ in range(10)]


def test_samples_only_from_the_allowed_set():
    logits = torch.randn(1, 200)
    allowed = set(logits.topk(7).indices[0].tolist())
    sampler = Sampler(SamplingParams(temperature=2.0, top_k=7, seed=0), torch.device("cpu"))
    assert {int(sampler(logits)) for _ in range(200)} <= allowed


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number"),
    (dict(top_p=float("nan")), "top_p must be a finite number"), (dict(temperature="0.7"), "temperature"),
    (dict(top_k=2.5), "top_k must be an integer"), (dict(seed="a"), "seed must be an integer"),
    (dict(seed=1.0), "seed must be an integer")])
def test_bad_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
