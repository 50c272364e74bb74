"""Concurrent spoken answers (``OmniModel.generate_batch(return_audio=True)``, ``stream_batch``): each answer's text,
codes and waveform are the ones ``generate`` gives its prompt alone, with rows freed and refilled as answers end,
per-prompt speakers and seeds, answers whose speech outlives their text and the other way round."""
import contextlib
import gc
import itertools
import weakref

import pytest
import torch

import omni_kernels as ok
from omni_runtime import OmniModel, SamplingParams
from omni_runtime.api import SpokenParts
from omni_runtime.engine.batch_rows import DEFAULT_PREFILL_TOKENS, batch_buckets
from omni_runtime.engine.prefill_pacer import PrefillPacer
from omni_runtime.pipeline import StageTimer
from test_speech import GREEDY_TALKER
from test_thinker_parity import IM_END, chat_prompt


@pytest.fixture(scope="module")
def model(reference_checkpoint):
    return OmniModel.from_pretrained(reference_checkpoint()[0])


@pytest.fixture(autouse=True)
def close_engines(model):
    """An engine a test left open (a failed test's frames keep it alive) is closed: the batched runners serve one
    engine at a time, and the next test's must be able to take them."""
    yield
    engine = model.batched_lease.holder
    if engine is not None:
        engine.close()


def prompts(count: int) -> list[torch.Tensor]:
    return [chat_prompt(seed, user_len=7 + 5 * seed) for seed in range(count)]   # 19..39 tokens


def alone(model, prompt, **kwargs):
    if isinstance(prompt, dict):
        return model.generate(**prompt, return_audio=True, **kwargs)
    return model.generate(prompt, return_audio=True, **kwargs)


@contextlib.contextmanager
def cpu_twins(backend: str):
    """``cpp``: the CPU's C++ twins of the batched steps (their default here); ``torch``: the module steps a GPU
    captures."""
    with ok.use_backend(backend, op="code_predictor_frame"), ok.use_backend(backend, op="decoder_step"):
        yield


# Batched Code2Wav attends over a masked fixed window per row (engine/code2wav_batch.py), the single stream over the
# exact keys: the same visibility, other shapes, so other roundings.
WAVE_ATOL = 1e-5


def assert_same_answers(got, expected, reasons: bool = True):
    for g, e in zip(got, expected, strict=True):
        assert g.text_ids == e.text_ids and (g.finish_reason == e.finish_reason or not reasons)
        assert torch.equal(g.codes, e.codes)
        torch.testing.assert_close(g.audio, e.audio, atol=WAVE_ATOL, rtol=0)


@pytest.mark.parametrize("max_batch, steps", [(1, "cpp"), (3, "cpp"), (8, "cpp"), (3, "torch")])
def test_batch_speech_equals_single_answers(model, max_batch, steps):
    # 5 prompts: with 3 rows two wait and take rows as answers end. An EOS that prompt 1's answer holds ends its text
    # early, so its speech outlives its text; prompt 3's talker budget is its text's, the others' runs past it.
    # ``steps="torch"`` runs the batched module steps a GPU captures instead of the CPU's C++ twins (the thinker's and
    # talker's steps over their rows, each row's predictor frame).
    batch = prompts(5)
    eos = model.generate(batch[1], max_new_tokens=10, eos_token_id=IM_END).text_ids[3]
    kwargs = dict(max_new_tokens=10, eos_token_id=[IM_END, eos], talker_max_new_tokens=14,
                  talker_sampling=GREEDY_TALKER)
    expected = [alone(model, p, **kwargs) for p in batch]
    assert expected[1].finish_reason == "eos" and len(expected[1].text_ids) <= 4
    with cpu_twins(steps):
        got = model.generate_batch(batch, max_batch=max_batch, return_audio=True, **kwargs)
    assert_same_answers(got, expected)
    assert all(g.codes.shape == (16, 13) for g in got)
    assert not any(model.batched_thinker.live) and not any(model.batched_talker.live)
    buckets = [key[0] for key in model.batched_talker.steps]   # one static frame per bucket: free rows draw alike
    assert set(buckets) <= set(batch_buckets(max_batch)) and len(buckets) == len(set(buckets))


@pytest.mark.parametrize("steps", ["cpp", "torch"])
def test_each_row_keeps_its_own_codebook0_history(model, steps):
    # A penalty below 1 favours seen codes, so the codes follow each answer's history (see test_speech): a row's
    # history must hold its own answer's codes only, from an empty one each time a row is taken again.
    batch = prompts(3)
    kwargs = dict(max_new_tokens=6, eos_token_id=IM_END, talker_max_new_tokens=16,
                  talker_sampling=SamplingParams(temperature=0.0, repetition_penalty=0.5))
    expected = [alone(model, p, **kwargs) for p in batch]
    with cpu_twins(steps):
        assert_same_answers(model.generate_batch(batch, max_batch=2, return_audio=True, **kwargs), expected)


def test_speech_that_ends_first_or_never_starts(model):
    # a 2-frame answer beside longer ones frees its talker row while its text goes on; a 1-token talker budget
    # speaks nothing; a 1-token text still speaks
    batch = prompts(3)
    settings = [dict(max_new_tokens=8, talker_max_new_tokens=3), dict(max_new_tokens=8, talker_max_new_tokens=1),
                dict(max_new_tokens=1, talker_max_new_tokens=6)]
    for setting in settings:
        expected = [alone(model, p, eos_token_id=IM_END, talker_sampling=GREEDY_TALKER, **setting) for p in batch]
        got = model.generate_batch(batch, eos_token_id=IM_END, talker_sampling=GREEDY_TALKER, max_batch=2,
                                   return_audio=True, **setting)
        assert_same_answers(got, expected)
    assert got[0].codes.shape == (16, 5) and len(got[0].text_ids) == 1


def test_seeded_sampling_and_speakers_per_prompt(model):
    batch = prompts(4)
    thinker = [SamplingParams(temperature=0.8, top_k=20, seed=s) for s in range(4)]
    talker = [SamplingParams(temperature=0.9, top_k=50, repetition_penalty=1.05, seed=10 + s) for s in range(4)]
    speakers = ["ethan", "chelsie", "aiden", "ethan"]
    expected = [alone(model, p, max_new_tokens=6, eos_token_id=IM_END, talker_max_new_tokens=10,
                      thinker_sampling=a, talker_sampling=b, speaker=c)
                for p, a, b, c in zip(batch, thinker, talker, speakers)]
    for steps in ("cpp", "torch"):
        with cpu_twins(steps):
            got = model.generate_batch(batch, max_new_tokens=6, eos_token_id=IM_END, talker_max_new_tokens=10,
                                       thinker_sampling=thinker, talker_sampling=talker, speaker=speakers,
                                       max_batch=4, return_audio=True)
        assert_same_answers(got, expected)
    greedy = model.generate_batch(batch[:1], max_new_tokens=6, eos_token_id=IM_END, talker_max_new_tokens=10,
                                  talker_sampling=GREEDY_TALKER, return_audio=True)
    assert not torch.equal(greedy[0].codes, got[0].codes)   # the seeds were drawn from, per row


def test_talker_prefills_together_match_alone(model):
    # three answers' talker prompts of different lengths in rows 2, 0, 1, right-padded into one forward: each row's
    # logits, last hidden state, length, next position and next frame are those of its prompt prefilled alone
    from omni_runtime.engine.talker_batch import BatchedTalkerRunner
    single = model.talker_runner
    runner = BatchedTalkerRunner(model.talker, model.config.talker, 3, single.max_len, model.device, model.dtype,
                                 single.code0_suppress, single.frame_weights)
    alone_runner = BatchedTalkerRunner(model.talker, model.config.talker, 3, single.max_len, model.device,
                                       model.dtype, single.code0_suppress, single.frame_weights)
    hidden_size = model.config.talker.text.hidden_size
    embeds = [torch.randn(1, n, hidden_size, generator=torch.Generator().manual_seed(n)) for n in (12, 21, 17)]
    positions = [torch.arange(n).view(1, 1, n).expand(3, 1, n) + 5 * i for i, n in enumerate((12, 21, 17))]
    rows = [2, 0, 1]
    for _ in rows:
        runner.acquire(), alone_runner.acquire()
    with torch.inference_mode():
        together = runner.prefill_many(rows, embeds, positions)
        step = torch.randn(3, 1, hidden_size, generator=torch.Generator().manual_seed(0))
        for row, e, p, (logits, hidden) in zip(rows, embeds, positions, together):
            want_logits, want_hidden = alone_runner.prefill(row, e, p)
            torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(hidden, want_hidden, atol=1e-5, rtol=1e-5)
        assert runner.host_lengths == alone_runner.host_lengths == [21, 17, 12]
        torch.testing.assert_close(runner.next_positions, alone_runner.next_positions)
        (code0, residuals, frame_embeds), want = runner.frame(rows, step), alone_runner.frame(rows, step)  # greedy
    assert torch.equal(code0, want[0]) and torch.equal(residuals, want[1])
    torch.testing.assert_close(frame_embeds, want[2], atol=1e-5, rtol=1e-5)


def test_stream_batch_interleaves_answers(model):
    batch = prompts(3)
    kwargs = dict(max_new_tokens=6, eos_token_id=IM_END, talker_max_new_tokens=12, talker_sampling=GREEDY_TALKER)
    expected = [alone(model, p, **kwargs) for p in batch]
    text, audio, order = [[] for _ in batch], [[] for _ in batch], []
    for index, event in model.stream_batch(batch, max_batch=3, first_chunk_frames=1, chunk_frames=2, **kwargs):
        text[index] += event.text_ids
        if event.audio is not None:
            audio[index].append(event.audio)
            order.append(index)
    for i, e in enumerate(expected):
        assert text[i] == e.text_ids
        torch.testing.assert_close(torch.cat(audio[i]), e.audio, atol=1e-5, rtol=0)   # other chunk sizes
        assert audio[i][0].numel() == 1920 - 555   # a one-frame first packet
    assert sorted(order[:3]) == [0, 1, 2]          # every answer's first packet before any second one


@pytest.mark.parametrize("first, chunk, sizes", [(1, 4, [1, 1, 2, 4, 4, 4]), (3, 25, [3, 3, 6, 12, 24, 25]),
                                                 (2, 1, [2, 1, 1, 1, 1, 1])])
def test_packets_ramp_up_to_chunk_frames(first, chunk, sizes):
    # a frame a tick: packets of first_chunk_frames, that many again, then doubling up to chunk_frames
    from omni_runtime.pipeline import PacketSchedule, SpeechOptions
    schedule = PacketSchedule(SpeechOptions(0, None, None, 1000, first, chunk))
    got = []
    for _ in range(sum(sizes)):
        schedule.add(torch.zeros(16, dtype=torch.long))
        codes = schedule.take(final=False)
        if codes is not None:
            got.append(codes.shape[1])
    assert got == sizes and schedule.frames_sent == sum(sizes)
    schedule.add(torch.zeros(16, dtype=torch.long))
    assert schedule.take(final=False, on_beat=True).shape == (16, 1)   # on the beat: what is pending, short
    assert schedule.take(final=True) is None                         # nothing pending


def test_staggered_answers_decode_their_packets_together(model):
    # Requests a tick apart: after its ramp (packets of 1, 1, 2 frames), each answer sends its frames on the engine's
    # beat (ticks that are multiples of chunk_frames), so their later packets share Code2Wav pushes; none holds more
    # than chunk_frames frames, and each answer's audio is still its own.
    batch = prompts(3)
    kwargs = dict(max_new_tokens=8, eos_token_id=IM_END, talker_max_new_tokens=14, talker_sampling=GREEDY_TALKER)
    expected = [alone(model, p, **kwargs) for p in batch]
    timer = StageTimer()
    engine = model.speech_engine(max_batch=3, timer=timer)
    ids, packets = [], {}
    tick = 0
    while len(ids) < len(batch) or engine.busy:
        if len(ids) < len(batch):
            ids.append(engine.submit(batch[len(ids)], chunk_frames=4, **kwargs))
        for rid, event in engine.step():
            if event.audio is not None:
                packets.setdefault(rid, []).append((tick, event))
        tick += 1
    pushes = set()
    for rid, e in zip(ids, expected):
        sizes = [event.codes.shape[1] for _, event in packets[rid]]
        assert sizes[:2] == [1, 1] and sizes[2] <= 2 and max(sizes) <= 4 and sum(sizes) == e.codes.shape[1]
        assert all(t % 4 == 0 for t, _ in packets[rid][3:-1])     # the last one goes when speech ends
        torch.testing.assert_close(torch.cat([ev.audio for _, ev in packets[rid]]), e.audio, atol=WAVE_ATOL, rtol=0)
        pushes |= {(t, ev.codes.shape[1], i == 0) for i, (t, ev) in enumerate(packets[rid])}
    assert len({t for t, _ in packets[ids[0]][:1] + packets[ids[1]][:1] + packets[ids[2]][:1]}) == 3   # staggered
    assert timer.calls["code2wav"] == len(pushes) < sum(len(p) for p in packets.values())
    ticks = [t for p in packets.values() for t, ev in p if ev.codes.shape[1] == 4]
    assert any(ticks.count(t) == 3 for t in ticks)   # a push of all three


def test_long_prompt_prefills_while_others_speak(model):
    # prefill_tokens 10: a 40-token prompt that arrives while another answer speaks prefills over 4 ticks, and that
    # answer gets its next token in each of them; both answers are still their own
    speaking, long = chat_prompt(1, user_len=4), chat_prompt(5, user_len=22)
    kwargs = dict(max_new_tokens=12, eos_token_id=None, talker_max_new_tokens=16, talker_sampling=GREEDY_TALKER)
    expected = [alone(model, p, **kwargs) for p in (speaking, long)]
    engine = model.speech_engine(max_batch=2, prefill_tokens=10)
    assert engine.prefill_tokens == 10 and model.batched_thinker.prefill_tokens == DEFAULT_PREFILL_TOKENS   # its own
    engine.pacer.clock = lambda: 0.0   # no time passes: the pacer always allows all 10 tokens
    events = {}
    first = engine.submit(speaking, **kwargs)
    for _ in range(3):
        for rid, event in engine.step():
            events.setdefault(rid, []).append(event)
    later = engine.submit(long, **kwargs)
    prefill_ticks = 0
    while engine.busy:
        prefilling = any(a.prefill is not None for a in engine.live) or later in engine.waiting
        tick = engine.step()
        if prefilling:
            prefill_ticks += 1
            assert any(rid == first and e.text_ids for rid, e in tick)   # the speaking answer went on
        for rid, event in tick:
            events.setdefault(rid, []).append(event)
    assert prefill_ticks == 4
    for rid, e in zip((first, later), expected):
        assert [t for ev in events[rid] for t in ev.text_ids] == e.text_ids
        codes = torch.cat([ev.codes for ev in events[rid] if ev.codes is not None], dim=1)
        assert torch.equal(codes, e.codes)
        torch.testing.assert_close(torch.cat([ev.audio for ev in events[rid] if ev.audio is not None]), e.audio,
                                   atol=WAVE_ATOL, rtol=0)
    with pytest.raises(ValueError, match="prefill_tokens must be >= 1"):
        model.speech_engine(max_batch=2, prefill_tokens=0)


class ScriptedPacer(PrefillPacer):
    """Budgets from a script, one per tick (then ``max_tokens``): what the engine does with them is the test."""

    def __init__(self, script: list[int], min_tokens: int):
        super().__init__(min_tokens=min_tokens, clock=lambda: 0.0)
        self.script = list(script)

    def budget(self, slacks, max_tokens, ticks_to_packet, spent=0.0, prefix=0):
        return self.script.pop(0) if self.script else max_tokens


def test_engine_prefills_what_the_pacer_allows(model):
    # A speaking answer; then a 40-token prompt and an 18-token one arrive together. Budgets 0, 0, 15, 0, 30: the
    # short prompt (<= min_tokens 20) prefills at once anyway, the long one waits, then takes 15 and the last 25
    # tokens; both answers are their own.
    speaking, long, short = chat_prompt(1, user_len=4), chat_prompt(5, user_len=22), chat_prompt(6, user_len=0)
    kwargs = dict(max_new_tokens=10, eos_token_id=None, talker_max_new_tokens=12, talker_sampling=GREEDY_TALKER)
    expected = [alone(model, p, **kwargs) for p in (speaking, long, short)]
    engine = model.speech_engine(max_batch=3)
    ids = [engine.submit(speaking, **kwargs)]
    parts = {}
    for _ in range(3):
        for rid, event in engine.step():
            parts.setdefault(rid, SpokenParts()).add(event)
    engine.pacer = ScriptedPacer([0, 0, 15, 0, 30], min_tokens=20)
    ids += [engine.submit(long, **kwargs), engine.submit(short, **kwargs)]
    done, short_text = [], []
    while engine.busy:
        for rid, event in engine.step():
            parts.setdefault(rid, SpokenParts()).add(event)
        long_answer = next((a for a in engine.live if a.index == ids[1]), None)
        done.append(None if long_answer is None else
                    long_answer.prefill.done if long_answer.prefill is not None else "decoding")
        short_text.append(len(parts.get(ids[2], SpokenParts()).text))
    assert done[:5] == [0, 0, 15, 15, "decoding"]
    assert short_text[0] == 1   # its first token in the tick it arrived
    for rid, e in zip(ids, expected):
        assert_same_answers([parts[rid].output(e.finish_reason, 16, model.device)], [e])
    assert not any(model.batched_thinker.live)


def test_pacer_budget():
    pacer = PrefillPacer(min_tokens=100, patience=2)
    assert pacer.budget([0.5], 4096, 4) == 4096                  # nothing measured yet
    pacer.record_prefill(50, 0.05)
    assert pacer.cost() == (0.0, 0.001, 0.0)                     # one size: all of it per token
    pacer.record_prefill(250, 0.09)
    fixed, per_token, per_pair = pacer.cost()                    # two sizes: the line through them
    assert abs(fixed - 0.04) < 1e-9 and abs(per_token - 2e-4) < 1e-12 and per_pair == 0.0
    pacer.record_tick(0.03, prompt_waited=False)
    assert pacer.budget([], 4096, 4) == 4096                     # nobody speaks
    assert pacer.budget([0.5, 0.9], 4096, 4) == 1700             # (0.5 - 4 x 0.03 - 0.04) / 2e-4
    assert pacer.budget([0.5], 1000, 4) == 1000
    assert pacer.budget([0.15], 4096, 4) == 0                    # 0 < 100 tokens: wait
    pacer.record_tick(0.03, prompt_waited=True)
    pacer.record_tick(0.03, prompt_waited=True)
    assert pacer.budget([0.15], 4096, 4) == 100                  # waited enough: min_tokens
    assert pacer.budget([0.15], 60, 4) == 60
    pacer.record_tick(0.03, prompt_waited=False)
    assert pacer.budget([0.5], 4096, 4, spent=0.2) == 700         # encoders took 0.2 s: (0.5-0.12-0.2-0.04) / 2e-4


def test_prefill_cost_grows_with_the_prefix_a_chunk_attends_to():
    # seconds = 0.02 + 1e-4 n + 1e-8 pairs, measured on whole prompts and on chunks after a prefix: the fit finds the
    # three terms, and a chunk late in a long prompt gets fewer tokens for the same spare seconds
    from omni_runtime.engine.prefill_pacer import PrefillCost, attention_pairs
    cost = PrefillCost()
    truth = lambda n, p: 0.02 + 1e-4 * n + 1e-8 * attention_pairs(n, p)  # noqa: E731
    for n, p in ((100, 0), (400, 0), (512, 512), (512, 1536), (256, 3000)):
        cost.record(n, attention_pairs(n, p), truth(n, p))
    for got, want in zip(cost.fit, (0.02, 1e-4, 1e-8)):
        assert abs(got - want) <= 1e-6 * want
    assert attention_pairs(3, 2) == 3 * 2 + 6                     # keys 1..3 of the new tokens, 2 cached each
    early, late = cost.tokens_within(0.2, 0), cost.tokens_within(0.2, 20000)
    assert abs(truth(early, 0) - 0.2) < 1e-6 and abs(truth(late, 20000) - 0.2) < 1e-6   # the fit, to a us
    assert late < early / 2
    assert cost.tokens_within(0.01, 0) == 0.0                     # less than the fixed cost
    pacer = PrefillPacer(min_tokens=16)
    pacer.prefill = cost
    assert pacer.budget([1.0], 4096, 1, prefix=20000) == int(cost.tokens_within(1.0, 20000) + 1e-6)
    one = PrefillCost()
    one.record(64, attention_pairs(64, 4000), 0.5)                # one sample: all of it per token
    assert one.fit == (0.0, 0.5 / 64, 0.0)
    linear, prefix = PrefillCost(), 0                             # timings with no attention term at all: the fit's
    for n in (128, 256, 384, 512, 512):                           # per-pair part is rounding noise, and the budget
        linear.record(n, attention_pairs(n, prefix), 0.064 + 3.6e-4 * n)   # must still be the linear one
        prefix += n
    assert abs(linear.tokens_within(0.064 + 3.6e-4 * 400, prefix) - 400) < 1e-3


def test_chunks_of_a_thinker_that_captures_no_layer():
    # a talker's accept_hidden_layer past the thinker's layers captures nothing: the text rows need none
    from omni_runtime.pipeline import ChunkedPrefill
    assert ChunkedPrefill(None, 0, None, None, StageTimer()).captured_between(0, 5) is None


def test_engine_paces_a_chunk_at_its_prefix(model):
    # the budget is asked for at the next chunk's prefix, and each chunk's measurement counts its attention pairs
    class Recording(PrefillPacer):
        def __init__(self):
            super().__init__(clock=lambda: 0.0)
            self.prefixes, self.recorded = [], []

        def budget(self, slacks, max_tokens, ticks_to_packet, spent=0.0, prefix=0):
            self.prefixes.append(prefix)
            return max_tokens

        def record_prefill(self, tokens, seconds, pairs=None):
            self.recorded.append((tokens, pairs))

    engine = model.speech_engine(max_batch=1, prefill_tokens=16)
    engine.pacer = pacer = Recording()
    engine.submit(chat_prompt(5, user_len=22), max_new_tokens=2, eos_token_id=None, talker_max_new_tokens=2)
    run_engine(engine)
    assert pacer.prefixes[:3] == [0, 16, 32]                       # 40 tokens in chunks of 16
    assert pacer.recorded == [(0, 0), (16, 136), (16, 16 * 16 + 136), (8, 8 * 32 + 36)]


def test_pacer_holds_back_encoders_that_do_not_fit():
    pacer = PrefillPacer(patience=3)
    assert pacer.admits_encoders(500, [0.5], 4, spent=0.0, waited=0)          # nothing measured yet
    pacer.record_encoders(100, 0.05)
    pacer.record_encoders(300, 0.11)                                          # 0.02 s + 3e-4 s a token
    pacer.record_tick(0.03, prompt_waited=False)
    assert pacer.admits_encoders(0, [0.0], 4, spent=0.0, waited=0)            # no media: nothing to hold back
    assert pacer.admits_encoders(5000, [], 4, spent=0.0, waited=0)            # nobody speaks
    assert pacer.admits_encoders(1000, [0.5], 4, spent=0.0, waited=0)         # 0.32 s <= 0.5 - 4 x 0.03
    assert not pacer.admits_encoders(1000, [0.5], 4, spent=0.1, waited=0)     # not after 0.1 s spent already
    assert not pacer.admits_encoders(1000, [0.5, 0.3], 4, spent=0.0, waited=2)
    assert pacer.admits_encoders(1000, [0.3], 4, spent=0.0, waited=3)         # waited patience ticks


def test_engine_takes_requests_as_they_come_and_cancels(model):
    # a server's loop: requests arrive while others speak, one is cancelled mid-answer and one while it waits; the
    # others' answers are still their own, and every row is free at the end
    batch = prompts(4)
    kwargs = dict(max_new_tokens=6, eos_token_id=IM_END, talker_max_new_tokens=12, talker_sampling=GREEDY_TALKER)
    expected = [alone(model, p, **kwargs) for p in batch]
    engine = model.speech_engine(max_batch=2)
    parts = {}
    first = engine.submit(batch[0], **kwargs)
    for _ in range(3):
        for rid, event in engine.step():
            parts.setdefault(rid, []).append(event)
    later = [engine.submit(p, **kwargs) for p in batch[1:]]
    engine.cancel(later[2])                                    # still waiting
    ticks = 0
    while engine.busy:
        ticks += 1
        if ticks == 4:
            engine.cancel(later[1])                            # running
        for rid, event in engine.step():
            parts.setdefault(rid, []).append(event)
    for rid, index in ((first, 0), (later[0], 1)):
        text = [t for e in parts[rid] for t in e.text_ids]
        audio = torch.cat([e.audio for e in parts[rid] if e.audio is not None])
        assert text == expected[index].text_ids
        torch.testing.assert_close(audio, expected[index].audio, atol=WAVE_ATOL, rtol=0)
    assert later[2] not in parts and len(parts.get(later[1], [])) < len(parts[later[0]])
    assert not any(model.batched_thinker.live) and not any(model.batched_talker.live)
    assert not any(model.batched_code2wav.live)
    with pytest.raises(ValueError, match="unknown speaker"):
        engine.submit(batch[0], speaker="nobody", talker_max_new_tokens=4)
    with pytest.raises(RuntimeError, match="in use by a SpeechEngine"):
        model.speech_engine(max_batch=3)
    engine.close()
    assert not any(model.batched_thinker.live) and not engine.busy


def test_stopping_early_releases_everything(model):
    batch = prompts(3)
    kwargs = dict(max_new_tokens=5, eos_token_id=IM_END, talker_max_new_tokens=8, talker_sampling=GREEDY_TALKER)
    expected = model.generate_batch(batch, max_batch=2, return_audio=True, **kwargs)
    for count, _ in enumerate(model.stream_batch(batch, max_batch=2, **kwargs)):
        if count == 4:
            break
    assert not any(model.batched_thinker.live) and not any(model.batched_talker.live)
    assert not any(model.batched_code2wav.live)
    assert_same_answers(model.generate_batch(batch, max_batch=2, return_audio=True, **kwargs), expected)


@pytest.mark.parametrize("prefill_tokens", [DEFAULT_PREFILL_TOKENS, 24], ids=["whole", "chunked"])
def test_engine_under_a_random_schedule(model, prefill_tokens):
    # requests of different lengths and settings arrive and are cancelled at random ticks over 3 rows (24: prompts
    # of 25..41 tokens prefill in chunks, some cancelled while they do): every answer that runs to its end is the
    # one its prompt gets alone, and the engine ends with every row free
    # seed 10: cancellations while waiting and while running (chunked: while prefilling), 4 answers to the end
    rng = torch.Generator().manual_seed(10)
    pick = lambda n: int(torch.randint(n, (1,), generator=rng))  # noqa: E731
    requests = [(chat_prompt(i, user_len=5 + 3 * i),
                 dict(max_new_tokens=2 + pick(6), eos_token_id=IM_END, talker_max_new_tokens=2 + pick(10),
                      talker_sampling=GREEDY_TALKER if i % 2 else
                      SamplingParams(temperature=0.9, top_k=50, repetition_penalty=1.05, seed=i)))
                for i in range(7)]
    engine = model.speech_engine(max_batch=3, prefill_tokens=prefill_tokens)
    engine.pacer.clock = lambda: 0.0   # the chunks: prefill_tokens each, whatever the machine's speed
    parts, ids, cancelled, pending = {}, {}, set(), list(range(len(requests)))
    while pending or engine.busy:
        if pending and pick(2):
            i = pending.pop(0)
            ids[engine.submit(requests[i][0], **requests[i][1])] = i
        if ids and not pick(8):
            victim = list(ids)[pick(len(ids))]
            engine.cancel(victim)
            cancelled.add(victim)
        for rid, event in engine.step():
            parts.setdefault(rid, SpokenParts()).add(event)
    assert cancelled and len(cancelled) < len(ids)
    for rid, i in ids.items():
        if rid not in cancelled:
            prompt, kwargs = requests[i]
            expected = alone(model, prompt, **kwargs)
            got = parts[rid].output(expected.finish_reason, 16, model.device)
            assert_same_answers([got], [expected])
    assert not any(model.batched_thinker.live) and not any(model.batched_talker.live)
    assert not any(model.batched_code2wav.live)


def test_engine_drops_a_request_whose_media_fail_and_goes_on(reference_checkpoint):
    # Placeholders and features that disagree are refused by submit; NaN features show only when the encoders run
    # (at admission): that request fails, named, and the others admitted with it still run
    from test_multimodal_parity import CASES, chat, media_inputs
    model = OmniModel.from_pretrained(reference_checkpoint()[0])
    good = {"input_ids": torch.tensor([chat(CASES["audio"]).ids]), **media_inputs(chat(CASES["audio"]))}
    kwargs = dict(max_new_tokens=4, eos_token_id=IM_END, talker_max_new_tokens=5, talker_sampling=GREEDY_TALKER)
    engine = model.speech_engine(max_batch=3)
    short = dict(good, input_features=good["input_features"][:, :, :10],   # fewer frames than placeholders
                 feature_attention_mask=good["feature_attention_mask"][:, :10])
    with pytest.raises(ValueError, match="33 audio placeholder tokens but the audio input gives 2 features"):
        engine.submit(short, **kwargs)
    bad = dict(good, input_features=good["input_features"].index_fill(2, torch.tensor([3]), float("nan")))
    ids = [engine.submit(p, **kwargs) for p in (chat_prompt(1), bad, good)]
    with pytest.raises(ValueError, match=f"prompt {ids[1]}: "):
        engine.step()
    parts = {}
    while engine.busy:
        for rid, event in engine.step():
            parts.setdefault(rid, SpokenParts()).add(event)
    for rid, prompt in ((ids[0], chat_prompt(1)), (ids[2], good)):
        assert_same_answers([parts[rid].output("eos", 16, model.device)], [alone(model, prompt, **kwargs)],
                            reasons=False)
    assert ids[1] not in parts


def test_encoders_wait_for_slack_and_text_requests_pass_them(reference_checkpoint, monkeypatch):
    # An encoder slower than the speaking answer's slack: the first audio request runs it (nothing measured yet),
    # the second waits the pacer's patience while a text request behind it is admitted; the encoders' seconds count
    # as prompt work, not as tick time. Every answer is still the one its prompt gets alone.
    from test_multimodal_parity import CASES, chat, media_inputs
    model = OmniModel.from_pretrained(reference_checkpoint()[0])
    audio = {"input_ids": torch.tensor([chat(CASES["audio"]).ids]), **media_inputs(chat(CASES["audio"]))}
    kwargs = dict(max_new_tokens=8, eos_token_id=None, talker_max_new_tokens=14, talker_sampling=GREEDY_TALKER)
    prompts = [chat_prompt(1, user_len=4), audio, audio, chat_prompt(2, user_len=2)]
    expected = [alone(model, p, **kwargs) for p in prompts]
    now = [0.0]
    encode = model.audio_encoder.forward

    def slow_encoder(*args, **kw):
        now[0] += 1.0   # a second of encoder: far more than the slack of one 80 ms packet
        return encode(*args, **kw)

    monkeypatch.setattr(model.audio_encoder, "forward", slow_encoder)
    engine = model.speech_engine(max_batch=4)
    engine.pacer = PrefillPacer(min_tokens=256, patience=2, clock=lambda: now[0])
    ids, parts, admitted = [engine.submit(prompts[0], **kwargs)], {}, []
    while not any(a.first_audio_at is not None for a in engine.live):   # until the first answer speaks
        engine.step()
    for rid, prompt in enumerate(prompts[1:], start=1):
        ids.append(engine.submit(prompt, **kwargs))
    while engine.busy:
        for rid, event in engine.step():
            parts.setdefault(rid, SpokenParts()).add(event)
        admitted.append(sorted(a.index for a in engine.live if a.index in ids[1:]))
    assert admitted[:4] == [[1, 3], [1, 3], [1, 2, 3], [1, 2, 3]]   # the second audio request waited 2 ticks
    assert engine.pacer.encoders.fit is not None and max(engine.pacer.ticks) < 1.0
    for rid, e in zip(ids[1:], expected[1:]):
        assert_same_answers([parts[rid].output(e.finish_reason, 16, model.device)], [e])


def test_random_model_with_encoders_speaks_about_audio():
    # OmniModel.random(encoders=True) builds the config's encoders (the full-size benchmarks' audio requests);
    # without, an audio prompt is refused by name
    import copy

    import numpy as np

    from omni_runtime.demo import DEMO_CONFIG
    config = copy.deepcopy(DEMO_CONFIG)
    config["thinker_config"]["audio_config"] = dict(
        encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32, downsample_hidden_size=16,
        output_dim=config["thinker_config"]["text_config"]["hidden_size"])
    model = OmniModel.random(config, encoders=True)
    assert model.audio_encoder is not None and model.vision_encoder is None   # the config has no vision_config
    assert OmniModel.random(config).audio_encoder is None
    wave = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    prompt = model.prepare([{"role": "user", "content": [{"type": "audio", "audio": wave, "sample_rate": 16000}]}])
    kwargs = dict(max_new_tokens=3, eos_token_id=None, talker_max_new_tokens=4, talker_sampling=GREEDY_TALKER)
    engine = model.speech_engine(max_batch=2)
    ids = [engine.submit(p, **kwargs) for p in (prompt, chat_prompt(1))]
    parts = {}
    for rid, event in engine.events():
        parts.setdefault(rid, SpokenParts()).add(event)
    assert engine.pacer.encoders.fit is not None
    for rid, p in zip(ids, (prompt, chat_prompt(1))):   # the demo's Code2Wav is wider: its waveform rounds more
        got, expected = parts[rid].output("length", 16, model.device), alone(model, p, **kwargs)
        assert got.text_ids == expected.text_ids and torch.equal(got.codes, expected.codes)
        torch.testing.assert_close(got.audio, expected.audio, atol=1e-4, rtol=0)


def test_media_prompts_speak_in_a_batch(reference_checkpoint):
    from test_multimodal_parity import CASES, chat, media_inputs
    model = OmniModel.from_pretrained(reference_checkpoint()[0])
    batch = [{"input_ids": torch.tensor([chat(CASES[case]).ids]), **media_inputs(chat(CASES[case]))}
             for case in ("audio", "image", "video with its audio")] + [chat_prompt(3)]
    kwargs = dict(max_new_tokens=5, eos_token_id=IM_END, talker_max_new_tokens=6, talker_sampling=GREEDY_TALKER)
    expected = [alone(model, p, **kwargs) for p in batch]
    assert_same_answers(model.generate_batch(batch, max_batch=2, return_audio=True, **kwargs), expected)


def test_bad_speech_batches_are_named(model):
    batch = prompts(3)
    with pytest.raises(ValueError, match="prompt 1: .*assistant"):
        model.generate_batch([batch[0], batch[1][:, :-3], batch[2]], return_audio=True, talker_max_new_tokens=8)
    with pytest.raises(ValueError, match="prompt 2: unknown speaker 'nobody'"):
        model.generate_batch(batch, return_audio=True, talker_max_new_tokens=8, speaker=["ethan", "chelsie", "nobody"])
    with pytest.raises(ValueError, match="speaker holds 2 settings for 3 prompts"):
        model.generate_batch(batch, return_audio=True, talker_max_new_tokens=8, speaker=["ethan", "chelsie"])
    with pytest.raises(ValueError, match="prompt 0: .*talker's KV cache"):
        model.generate_batch(batch, return_audio=True, talker_max_new_tokens=10**6)
    with pytest.raises(ValueError, match="chunk"):
        next(model.stream_batch(batch, talker_max_new_tokens=8, chunk_frames=0))
    assert not any(model.batched_thinker.live) and not any(model.batched_talker.live)
    got = model.generate_batch(batch[:1], max_new_tokens=2, talker_max_new_tokens=3, return_audio=True)
    assert got[0].codes.shape == (16, 2)   # still works afterwards


@pytest.mark.gpu
def test_batched_frame_graphs_replay_like_eager(reference_checkpoint):
    # On a GPU every bucket's frame replays a CUDA graph (sampled rows draw from their registered row generators):
    # the same codes as the eager steps, greedy and seeded, and the same as each answer alone.
    model = OmniModel.from_pretrained(reference_checkpoint()[0], device="cuda", dtype=torch.bfloat16)
    batch = [p.cuda() for p in prompts(3)]
    for talker in (GREEDY_TALKER, [SamplingParams(temperature=0.9, top_k=50, repetition_penalty=1.05, seed=s)
                                   for s in range(3)]):
        kwargs = dict(max_new_tokens=6, eos_token_id=IM_END, talker_max_new_tokens=12, talker_sampling=talker,
                      max_batch=4, return_audio=True)
        graphed = model.generate_batch(batch, **kwargs)
        steps = model.batched_talker.steps
        assert steps and all(step.graph is not None for step in steps.values())
        model.batched_talker.capture = False
        steps.clear()
        eager = model.generate_batch(batch, **kwargs)
        model.batched_talker.capture = True
        steps.clear()
        for g, e in zip(graphed, eager):
            assert g.text_ids == e.text_ids and torch.equal(g.codes, e.codes)


def run_engine(engine, parts: dict[int, SpokenParts] | None = None, ticks: int = 200) -> dict[int, SpokenParts]:
    """Steps until the engine is idle (at most ``ticks``: a stuck answer fails instead of hanging), gathering each
    request's events."""
    parts = {} if parts is None else parts
    for _ in range(ticks):
        if not engine.busy:
            return parts
        gather(parts, engine.step())
    raise AssertionError(f"the engine is still busy after {ticks} ticks")


def gather(parts: dict[int, SpokenParts], events) -> dict[int, SpokenParts]:
    for rid, event in events:
        parts.setdefault(rid, SpokenParts()).add(event)
    return parts


def output(parts: SpokenParts, model):
    return parts.output(parts.finish_reason, 16, model.device)


def test_speech_starts_in_the_tick_of_the_first_token(model):
    # The talker's prefill needs the first generated token's row only: the first packet leaves in the tick that
    # draws the first token, with no thinker step in between.
    kwargs = dict(max_new_tokens=6, eos_token_id=IM_END, talker_max_new_tokens=8, talker_sampling=GREEDY_TALKER)
    expected = alone(model, chat_prompt(2), **kwargs)
    engine = model.speech_engine(max_batch=2)
    rid = engine.submit(chat_prompt(2), **kwargs)
    parts = gather({}, engine.step())
    assert len(parts[rid].text) == 1 and [c.shape[1] for c in parts[rid].codes] == [1]
    assert_same_answers([output(run_engine(engine, parts)[rid], model)], [expected])


def test_prompt_with_an_assistant_prefix_prefilled_in_chunks(model):
    # A 103-token prompt whose assistant turn holds 3 tokens already (a user-supplied prefix) prefills in chunks of
    # 64: its text rows are known before its thinker stream exists, and its talker waits for that stream.
    prompt = torch.cat([chat_prompt(7, user_len=82), torch.tensor([[1000, 2000, 3000]])], dim=1)
    kwargs = dict(max_new_tokens=5, eos_token_id=IM_END, talker_max_new_tokens=7, talker_sampling=GREEDY_TALKER)
    expected = alone(model, prompt, **kwargs)
    engine = model.speech_engine(max_batch=2, prefill_tokens=64)
    engine.pacer.clock = lambda: 0.0
    rid = engine.submit(prompt, **kwargs)
    parts = gather({}, engine.step())
    assert engine.live[0].prefill is not None and engine.live[0].prefill.done == 64
    assert_same_answers([output(run_engine(engine, parts)[rid], model)], [expected])


def test_two_engines_on_the_batched_runners_are_refused(model):
    kwargs = dict(max_new_tokens=3, eos_token_id=IM_END, talker_max_new_tokens=3, talker_sampling=GREEDY_TALKER)
    engine = model.speech_engine(max_batch=2)
    engine.submit(chat_prompt(1), **kwargs)
    engine.step()
    for use in (lambda: model.speech_engine(max_batch=2), lambda: next(model.stream_batch([chat_prompt(2)], **kwargs)),
                lambda: model.generate_batch([chat_prompt(2)], max_new_tokens=2)):
        with pytest.raises(RuntimeError, match="batched runners are in use by a SpeechEngine.*one speech_engine"):
            use()
    engine.close()                                   # gives them back
    other = model.speech_engine(max_batch=2)
    with pytest.raises(RuntimeError, match="in use by a SpeechEngine"):
        engine.submit(chat_prompt(1), **kwargs)      # a closed engine takes them again only when they are free
    other.submit(chat_prompt(1), **kwargs)
    other.step()
    del other                                        # an engine dropped unclosed: its rows and the lease go back
    gc.collect()
    assert not any(model.batched_thinker.live) and not any(model.batched_talker.live)
    stream = model.stream_batch([chat_prompt(2)], max_batch=2, **kwargs)
    next(stream)
    with pytest.raises(RuntimeError, match="in use by a SpeechEngine"):
        model.speech_engine(max_batch=2)
    stream.close()
    assert len(model.generate_batch([chat_prompt(2)], max_new_tokens=2, max_batch=2)[0].text_ids) == 2


class StarvingPacer(PrefillPacer):
    """No budget (as when every speaking answer's slack is short) until a prompt has waited ``patience`` ticks."""

    def budget(self, slacks, max_tokens, ticks_to_packet, spent=0.0, prefix=0):
        return min(self.min_tokens, max_tokens) if self.waited >= self.patience else 0


def test_long_prompt_is_not_starved_by_short_ones(model):
    # Short prompts (<= min_tokens) prefill whole in any tick; a long one waits for budget at most ``patience``
    # ticks in a row, short prefills in those ticks or not.
    long = chat_prompt(5, user_len=22)                                # 40 tokens: chunks of min_tokens 20
    short = dict(max_new_tokens=2, eos_token_id=IM_END, talker_max_new_tokens=2, talker_sampling=GREEDY_TALKER)
    engine = model.speech_engine(max_batch=3)
    clock = itertools.count(step=1e-3)
    engine.pacer = StarvingPacer(min_tokens=20, patience=3, clock=lambda: next(clock))
    engine.submit(long, **dict(short, max_new_tokens=4))
    done = []
    for tick in range(8):
        if tick % 2 == 0:
            engine.submit(chat_prompt(6, user_len=0), **short)       # 18 tokens: whole
        engine.step()
        long_answer = next(a for a in engine.live if a.index == 0)
        done.append(long_answer.prefill.done if long_answer.prefill is not None else "decoding")
    assert done == [0, 0, 0, 20, 20, 20, 20, "decoding"]
    engine.close()


def test_engine_keeps_nothing_of_a_finished_request(model):
    # a long-running server: a request served or cancelled leaves no trace in the engine (ids, media, samplers),
    # and the text's end frees its thinker row at once while its speech goes on
    kwargs = dict(max_new_tokens=2, eos_token_id=None, talker_max_new_tokens=6, talker_sampling=GREEDY_TALKER)
    engine = model.speech_engine(max_batch=2)
    served = model.speech_request(chat_prompt(3), **kwargs)
    cancelled = model.speech_request(chat_prompt(4), **kwargs)
    refs = [weakref.ref(served), weakref.ref(cancelled)]
    served_id, cancelled_id = engine.submit_request(served), engine.submit_request(cancelled)
    engine.cancel(cancelled_id)
    del served, cancelled
    events = engine.step() + engine.step()
    assert [e.finish_reason for _, e in events if e.text_ids] == [None, "length"]   # on the last token's event
    assert [a.index for a in engine.live] == [served_id] and engine.live[0].thinker.finished
    assert not any(model.batched_thinker.live) and any(model.batched_talker.live)   # text over, speech not
    run_engine(engine)
    gc.collect()
    assert refs[0]() is None and refs[1]() is None and not engine.waiting and not engine.live
    engine.close()


def test_an_error_in_the_talker_prefill_leaves_the_answer_to_start_again(model, monkeypatch):
    kwargs = dict(max_new_tokens=5, eos_token_id=IM_END, talker_max_new_tokens=6, talker_sampling=GREEDY_TALKER)
    expected = alone(model, chat_prompt(3), **kwargs)
    engine = model.speech_engine(max_batch=2)
    rid = engine.submit(chat_prompt(3), **kwargs)

    def fail(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine.talker_rows, "prefill_many", fail)
    parts = {}
    with pytest.raises(RuntimeError, match="out of memory"):
        for _ in range(3):   # the tick that starts the talker fails (its text event goes out with the next tick's)
            gather(parts, engine.step())
    monkeypatch.undo()
    answer = engine.live[0]
    assert not answer.started and answer.prompt_embeds is not None and answer.thinker.prompt_hidden is not None
    assert_same_answers([output(run_engine(engine, parts)[rid], model)], [expected])
    engine.close()


def test_a_frame_step_keeps_only_the_runners_suppress_mask(model):
    # a frame step captures its draws' masks: it is kept for the runner's mask, never for another one
    from omni_runtime.engine.talker_batch import BatchedTalkerRunner
    from omni_runtime.sampling import Sampler
    cfg, cpu, single = model.config.talker, torch.device("cpu"), model.talker_runner
    runner = BatchedTalkerRunner(model.talker, cfg, 2, 32, cpu, model.dtype, single.code0_suppress,
                                 single.frame_weights)
    hidden_size = cfg.text.hidden_size
    greedy = SamplingParams(temperature=0.0)
    with torch.inference_mode():
        for mask, kept in ((single.code0_suppress.clone(), 0), (single.code0_suppress, 1)):
            row = runner.acquire()
            runner.prefill(row, torch.zeros(1, 4, hidden_size), torch.arange(4).view(1, 1, 4).expand(3, 1, 4))
            runner.begin_answer(row, Sampler(greedy, cpu, mask), Sampler(greedy, cpu))
            runner.frame([row], torch.zeros(1, 1, hidden_size))
            assert len(runner.steps) == kept
            runner.release(row)


@pytest.mark.parametrize("case", ["audio", "video with its audio"])
def test_long_media_prompt_prefills_its_talker_behind_its_chunks(reference_checkpoint, monkeypatch, case):
    # A media prompt prefilled in chunks of 16: after each chunk the talker row holds the user-turn rows of the
    # tokens prefilled so far (audio/video rows from the chunk's captured hidden states), and the tick its speech
    # starts prefills only the rest and the 9 assistant rows. The answer is the one the prompt gets alone.
    from omni_runtime.engine.talker_prompt import user_positions
    from test_multimodal_parity import CASES, chat, media_inputs
    model = OmniModel.from_pretrained(reference_checkpoint()[0])
    prompt = {"input_ids": torch.tensor([chat(CASES[case]).ids]), **media_inputs(chat(CASES[case]))}
    kwargs = dict(max_new_tokens=5, eos_token_id=IM_END, talker_max_new_tokens=6, talker_sampling=GREEDY_TALKER)
    expected = alone(model, prompt, **kwargs)
    user = user_positions(prompt["input_ids"][0], model.config.tokens)
    engine = model.speech_engine(max_batch=2, prefill_tokens=16)
    engine.pacer.clock = lambda: 0.0
    started = []
    prefill_many = engine.talker_rows.prefill_many

    def spy(rows, embeds, positions, starts=None):
        started.append((starts, [e.shape[1] for e in embeds]))
        return prefill_many(rows, embeds, positions, starts)

    monkeypatch.setattr(engine.talker_rows, "prefill_many", spy)
    rid = engine.submit(prompt, **kwargs)
    parts, cached = {}, []
    while not engine.live or engine.live[0].prefill is not None:
        gather(parts, engine.step())
        answer = engine.live[0]
        if answer.prefill is not None:
            rows = int((user < answer.prefill.done).sum())
            assert answer.talker_cached == rows == engine.talker_rows.host_lengths[answer.talker_row]
            cached.append(answer.talker_cached)
    assert len(cached) >= 2 and cached[-1] > 0
    assert started == [([cached[-1]], [user.numel() - cached[-1] + 9])]
    assert_same_answers([output(run_engine(engine, parts)[rid], model)], [expected])


def test_talker_follows_again_after_an_error(model, monkeypatch):
    # A talker prefill behind a chunk that fails leaves its rows to the next tick's, which catches up. Chunks of 10
    # of a 40-token prompt whose user turn is tokens 10..36: the first chunk has no talker rows, the second's fail.
    long = chat_prompt(5, user_len=22)
    kwargs = dict(max_new_tokens=5, eos_token_id=None, talker_max_new_tokens=6, talker_sampling=GREEDY_TALKER)
    expected = alone(model, long, **kwargs)
    engine = model.speech_engine(max_batch=2, prefill_tokens=10)
    engine.pacer.clock = lambda: 0.0
    extend = engine.talker_rows.extend
    calls = []

    def fail_once(*args):
        calls.append(args[3])
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return extend(*args)

    monkeypatch.setattr(engine.talker_rows, "extend", fail_once)
    rid = engine.submit(long, **kwargs)
    parts = gather({}, engine.step())
    answer = engine.live[0]
    assert answer.prefill.done == 10 and (answer.talker_prompt, answer.talker_cached) == (10, 0) and not calls
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.step()
    assert answer.prefill.done == 20 and (answer.talker_prompt, answer.talker_cached) == (10, 0)
    gather(parts, engine.step())   # the failed chunk's rows and the next one's, in one forward
    assert calls == [0, 0] and (answer.talker_prompt, answer.talker_cached) == (30, 20)
    assert_same_answers([output(run_engine(engine, parts)[rid], model)], [expected])


def test_talker_prefill_is_prompt_work_not_tick_time(model, monkeypatch):
    # a talker prefill's seconds are prompt work: the pacer's tick times (what it expects the next ticks to take)
    # leave them out
    now = [0.0]
    prefill_many = model.batched_talker.prefill_many

    def slow(*args):
        now[0] += 1.0
        return prefill_many(*args)

    kwargs = dict(max_new_tokens=4, eos_token_id=None, talker_max_new_tokens=5, talker_sampling=GREEDY_TALKER)
    engine = model.speech_engine(max_batch=2)
    monkeypatch.setattr(engine.talker_rows, "prefill_many", slow)
    engine.pacer = PrefillPacer(clock=lambda: now[0])
    engine.submit(chat_prompt(1), **kwargs)
    run_engine(engine)
    assert now[0] == 1.0 and max(engine.pacer.ticks) == 0.0


def test_an_answer_whose_talker_input_fails_is_dropped_and_the_others_go_on(model, monkeypatch):
    # what one answer's input makes failing (here its talker positions) drops that answer alone, named; the answer
    # that started with it speaks on, as it does alone
    kwargs = dict(max_new_tokens=5, eos_token_id=None, talker_max_new_tokens=6, talker_sampling=GREEDY_TALKER)
    expected = alone(model, chat_prompt(2), **kwargs)
    engine = model.speech_engine(max_batch=2)
    ids = [engine.submit(chat_prompt(1), **kwargs), engine.submit(chat_prompt(2), **kwargs)]
    positions = engine._talker_positions

    def fail_first(answer):
        if answer.index == ids[0]:
            raise ValueError("the prompt has 0 image group(s) but image_grid_thw has 1 row(s)")
        return positions(answer)

    monkeypatch.setattr(engine, "_talker_positions", fail_first)
    with pytest.raises(ValueError, match=f"request {ids[0]}: the prompt has 0 image .*it is dropped"):
        engine.step()
    assert [a.index for a in engine.live] == [ids[1]] and engine.talker_rows.free_rows() == 1
    parts = run_engine(engine)
    assert ids[0] not in parts
    assert_same_answers([output(parts[ids[1]], model)], [expected], reasons=False)


def test_admission_error_of_any_kind_keeps_the_other_requests(model, monkeypatch):
    # an encoder that fails with something else than a ValueError: that request is dropped, named in a note, and the
    # requests admitted with it wait again instead of vanishing
    kwargs = dict(max_new_tokens=3, eos_token_id=None, talker_max_new_tokens=4, talker_sampling=GREEDY_TALKER)
    engine = model.speech_engine(max_batch=3)
    ids = [engine.submit(chat_prompt(s), **kwargs) for s in (1, 2, 3)]
    build = model._build_prompt

    def fail_second(index, *args):
        if index == ids[1]:
            raise RuntimeError("CUDA error: an illegal memory access")
        return build(index, *args)

    monkeypatch.setattr(model, "_build_prompt", fail_second)
    with pytest.raises(RuntimeError, match="illegal memory access") as failure:
        engine.step()
    assert f"request {ids[1]}" in "".join(failure.value.__notes__)
    assert list(engine.waiting) == [ids[0], ids[2]]
    parts = run_engine(engine)
    assert sorted(parts) == [ids[0], ids[2]]
