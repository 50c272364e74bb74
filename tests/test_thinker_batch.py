"""Batched thinker decoding (``OmniModel.generate_batch``): each answer is the one ``generate`` gives its prompt alone,
with rows freed and refilled as answers end, prompts of different lengths, per-prompt sampling, and padded rows."""
import pytest
import torch

import omni_kernels as ok
from omni_runtime import OmniModel, SamplingParams
from omni_runtime.engine.batch_rows import batch_buckets
from omni_runtime.engine.batch_rows import DEFAULT_PREFILL_TOKENS
from omni_runtime.engine.thinker_batch import BatchedThinkerRunner
from test_thinker_parity import IM_END, chat_prompt


@pytest.fixture(scope="module")
def model(reference_checkpoint):
    return OmniModel.from_pretrained(reference_checkpoint()[0])


def prompts(count: int) -> list[torch.Tensor]:
    return [chat_prompt(seed, user_len=7 + 5 * seed) for seed in range(count)]   # 19..39 tokens


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(6) == [1, 2, 4, 6]


@pytest.mark.parametrize("max_batch", [1, 3, 8])
def test_batch_answers_equal_single_answers(model, max_batch):
    # 5 prompts: with 3 rows two wait and take rows as answers end; an EOS that prompt 1's answer holds makes that
    # row end early (its row is refilled while the others go on).
    batch = prompts(5)
    alone = [model.generate(p, max_new_tokens=10, eos_token_id=IM_END).text_ids for p in batch]
    eos = alone[1][3]
    expected = [model.generate(p, max_new_tokens=10, eos_token_id=[IM_END, eos]) for p in batch]
    assert expected[1].finish_reason == "eos" and len(expected[1].text_ids) <= 4
    got = model.generate_batch(batch, max_new_tokens=10, eos_token_id=[IM_END, eos], max_batch=max_batch)
    assert [g.text_ids for g in got] == [e.text_ids for e in expected]
    assert [g.finish_reason for g in got] == [e.finish_reason for e in expected]
    runner = model.batched_thinker
    assert not any(runner.live) and set(runner.steps) <= set(batch_buckets(max_batch))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_batch_logits_match_single_decode(model, backend):
    # the step itself: rows at different lengths and positions, a padded row in the bucket (3 live rows -> 4);
    # "cpp": the C++ twin over the rows (a CPU's), "torch": the module step (what a GPU captures)
    runner = BatchedThinkerRunner(model.thinker, model.config.thinker_text, 4, 64, model.device, model.dtype)
    single = model.thinker_runner
    from omni_runtime.multimodal import MediaInputs, build_prompt
    rows, expected, last = [], [], []
    with torch.inference_mode(), ok.use_backend(backend, op="decoder_step"):
        for prompt in prompts(3):
            inputs = build_prompt(prompt[0], MediaInputs(), model.config, model.thinker.model.embed_tokens, None,
                                  None)
            row = runner.acquire()
            logits, _ = runner.prefill(row, inputs)
            token = logits.argmax(-1)
            single.prefill(inputs)
            expected.append(single.decode(token.view(1, 1)))
            rows.append(row)
            last.append(token)
        logits = runner.decode(rows, torch.cat(last))
    assert runner.steps.keys() == {4}
    torch.testing.assert_close(logits, torch.cat(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prefill_tokens", [4096, 80])
def test_prompts_prefilled_together_match_alone(model, prefill_tokens):
    # 4 prompts of 19..34 tokens in rows 3, 0, 2, 1 (out of order): one padded forward (80: split in groups of
    # two), then each row's logits, captured hidden states and next decode step are those of its prompt alone
    from omni_runtime.multimodal import MediaInputs, build_prompt
    runner = BatchedThinkerRunner(model.thinker, model.config.thinker_text, 4, 64, model.device, model.dtype)
    runner.prefill_tokens = prefill_tokens
    single = model.thinker_runner
    inputs = [build_prompt(p[0], MediaInputs(), model.config, model.thinker.model.embed_tokens, None, None)
              for p in prompts(4)]
    rows = [3, 0, 2, 1]
    for _ in rows:
        runner.acquire()
    with torch.inference_mode():
        together = runner.prefill_many(rows, inputs, capture_layer=2)
        tokens = torch.cat([logits.argmax(-1) for logits, _ in together])
        decoded = runner.decode(rows, tokens)
        for i, (prompt, (logits, hidden)) in enumerate(zip(inputs, together)):
            alone_logits, alone_hidden = single.prefill(prompt, capture_layer=2)
            torch.testing.assert_close(logits, alone_logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(hidden, alone_hidden, atol=1e-5, rtol=1e-5)
            assert runner.host_lengths[rows[i]] == prompt.embeds.shape[1] + 1
            torch.testing.assert_close(decoded[i:i + 1], single.decode(tokens[i].view(1, 1)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_prompt_prefilled_in_chunks_matches_whole(model, chunk):
    # a 34-token prompt in chunks of 1, 7 (the last one short) and 16 tokens: the last chunk's logits, the captured
    # hidden states of all chunks, the row's cache and its next decode step are those of one whole prefill
    from omni_runtime.multimodal import MediaInputs, build_prompt
    runner = BatchedThinkerRunner(model.thinker, model.config.thinker_text, 2, 64, model.device, model.dtype)
    whole = BatchedThinkerRunner(model.thinker, model.config.thinker_text, 2, 64, model.device, model.dtype)
    prompt = build_prompt(prompts(4)[3][0], MediaInputs(), model.config, model.thinker.model.embed_tokens, None, None)
    length = prompt.embeds.shape[1]
    row, other = runner.acquire(), runner.acquire()
    whole.acquire()
    with torch.inference_mode():
        expected_logits, expected_hidden = whole.prefill(0, prompt, capture_layer=2)
        parts = [runner.prefill_part(row, prompt, start, min(start + chunk, length), capture_layer=2)
                 for start in range(0, length, chunk)]
        logits, hidden = parts[-1][0], torch.cat([h for _, h in parts], dim=1)
        torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hidden, expected_hidden, atol=1e-5, rtol=1e-5)
        kv, expected_kv = runner.state.cache.kv[:, :, row, :, :length], whole.state.cache.kv[:, :, 0, :, :length]
        torch.testing.assert_close(kv, expected_kv, atol=1e-5, rtol=1e-5)
        assert runner.host_lengths[row] == length and not runner.state.cache.kv[:, :, other].any()
        token = logits.argmax(-1)
        torch.testing.assert_close(runner.decode([row], token), whole.decode([0], token), atol=1e-5, rtol=1e-5)


def test_long_prompts_prefill_a_chunk_per_step(model):
    # prefill_tokens 20: prompts of 25..40 tokens go in chunks, the others decoding a step between two chunks;
    # prompts of 18 and 20 tokens prefill whole, together; rows are refilled: every answer is still generate's
    batch = prompts(4) + [chat_prompt(9, user_len=2), chat_prompt(10, user_len=0)]
    expected = [model.generate(p, max_new_tokens=8, eos_token_id=IM_END).text_ids for p in batch]
    runner = model._batched_thinker(3)
    runner.prefill_tokens = 20
    try:
        got = model.generate_batch(batch, max_new_tokens=8, eos_token_id=IM_END, max_batch=3)
    finally:
        runner.prefill_tokens = DEFAULT_PREFILL_TOKENS
    assert [g.text_ids for g in got] == expected
    assert not any(runner.live)


def test_seeded_sampling_per_prompt(model):
    batch = prompts(3)
    settings = [SamplingParams(temperature=0.8, top_k=20, seed=s) for s in (1, 2, 3)]
    alone = [model.generate(p, max_new_tokens=8, eos_token_id=IM_END, thinker_sampling=s).text_ids
             for p, s in zip(batch, settings)]
    got = model.generate_batch(batch, max_new_tokens=8, eos_token_id=IM_END, thinker_sampling=settings, max_batch=2)
    assert [g.text_ids for g in got] == alone


def test_bad_batches_are_named(model):
    good = chat_prompt(0)
    with pytest.raises(ValueError, match="prompt 1: input_ids holds ids outside the vocabulary"):
        model.generate_batch([good, torch.tensor([[10**9]])])
    with pytest.raises(ValueError, match="prompt 0: .*exceeds"):
        model.generate_batch([good], max_new_tokens=10**6)
    with pytest.raises(ValueError, match="2 settings for 1 prompts"):
        model.generate_batch([good], thinker_sampling=[SamplingParams(), SamplingParams()])
    with pytest.raises(ValueError, match="max_batch"):
        model.generate_batch([good], max_batch=0)
    assert model.generate_batch([]) == []
    assert len(model.generate_batch([good], max_new_tokens=2)[0].text_ids) == 2   # still works afterwards


def test_rows_taken_for_a_failed_start_are_given_back(model):
    # three sequences for two free rows: the start fails, and the rows it took are free again
    from omni_runtime.multimodal import MediaInputs, build_prompt
    from omni_runtime.pipeline import start_thinker_rows
    from omni_runtime.sampling import Sampler
    runner = BatchedThinkerRunner(model.thinker, model.config.thinker_text, 2, 64, model.device, model.dtype)
    ids = chat_prompt(0)[0]
    prompt = build_prompt(ids, MediaInputs(), model.config, model.thinker.model.embed_tokens, None, None)
    start = (ids, prompt, Sampler(SamplingParams(temperature=0.0), model.device), {IM_END}, 4)
    with pytest.raises(ValueError, match="all 2 rows"):
        start_thinker_rows(runner, [start] * 3)
    assert not any(runner.live)


@pytest.mark.gpu
def test_batch_step_graphs_replay_like_eager(reference_checkpoint):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    model = OmniModel.from_pretrained(reference_checkpoint()[0], device="cuda", dtype=torch.bfloat16)
    batch = [p.cuda() for p in prompts(5)]
    graphed = model.generate_batch(batch, max_new_tokens=10, eos_token_id=IM_END, max_batch=4)
    assert all(step.graph is not None for step in model.batched_thinker.steps.values())
    model.batched_thinker.capture = False
    model.batched_thinker.steps.clear()
    eager = model.generate_batch(batch, max_new_tokens=10, eos_token_id=IM_END, max_batch=4)
    assert [g.text_ids for g in graphed] == [e.text_ids for e in eager]


def test_media_prompts_in_a_batch(reference_checkpoint):
    # audio, image and video prompts (dicts, as prepare() returns them) beside a text one: each answer is its own
    from test_multimodal_parity import CASES, chat, media_inputs
    model = OmniModel.from_pretrained(reference_checkpoint()[0])
    batch = [{"input_ids": torch.tensor([chat(CASES[case]).ids]), **media_inputs(chat(CASES[case]))}
             for case in ("audio", "image", "video with its audio")] + [chat_prompt(3)]
    alone = [model.generate(**p, max_new_tokens=6, eos_token_id=IM_END) if isinstance(p, dict) else
             model.generate(p, max_new_tokens=6, eos_token_id=IM_END) for p in batch]
    got = model.generate_batch(batch, max_new_tokens=6, eos_token_id=IM_END, max_batch=2)
    assert [g.text_ids for g in got] == [a.text_ids for a in alone]
    model.batched_thinker.prefill_tokens = 8   # media prompts in chunks that split their DeepStack features
    chunked = model.generate_batch(batch, max_new_tokens=6, eos_token_id=IM_END, max_batch=2)
    assert [g.text_ids for g in chunked] == [a.text_ids for a in alone]
    bad = dict(batch[0], input_features=batch[0]["input_features"][:, :, :10])   # fewer frames than placeholders
    with pytest.raises(ValueError, match="prompt 1: "):
        model.generate_batch([batch[1], bad, batch[2]], max_new_tokens=2, max_batch=2)
    assert not any(model.batched_thinker.live)   # the failed batch gave its rows back
    with pytest.raises(ValueError, match="prompt 0: unknown generate arguments"):
        model.generate_batch([{"input_ids": chat_prompt(0), "pixels": None}])
