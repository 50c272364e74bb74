"""Speech output: text, codes and waveform equal to transformers' generate (greedy talker), and streaming that
concatenates to exactly what generate returns."""
import gc
from contextlib import closing

import pytest
import torch

from omni_runtime import OmniModel, SamplingParams
from test_thinker_parity import IM_END, chat_prompt

GREEDY_TALKER = SamplingParams(temperature=0.0, repetition_penalty=1.05)   # the reference's talker_do_sample=False
WAVE_ATOL = 2e-5   # streaming attention over fewer keys rounds differently from one full decode


@pytest.fixture(scope="module")
def speech_checkpoint(reference_checkpoint):
    return reference_checkpoint()


@pytest.fixture(scope="module")
def model(speech_checkpoint):
    return OmniModel.from_pretrained(speech_checkpoint[0])


def reference_speech(hf_model, prompt, thinker_max_new_tokens, talker_max_new_tokens, eos=IM_END, **media):
    """The reference's greedy generate, plus the codes it hands to Code2Wav."""
    captured = {}
    decode = hf_model.code2wav.chunked_decode

    def capture(codes, *args, **kwargs):
        captured["codes"] = codes.clone()
        return decode(codes, *args, **kwargs)

    hf_model.code2wav.chunked_decode = capture
    try:
        with torch.no_grad():
            sequences, wav = hf_model.generate(prompt, thinker_max_new_tokens=thinker_max_new_tokens,
                                               thinker_eos_token_id=eos, talker_do_sample=False, speaker="ethan",
                                               talker_max_new_tokens=talker_max_new_tokens, **media)
    finally:
        hf_model.code2wav.chunked_decode = decode
    return sequences[0, prompt.shape[1]:].tolist(), captured["codes"][0], wav.flatten()


def ours(model, prompt, max_new_tokens, talker_max_new_tokens, eos=IM_END, **kwargs):
    return model.generate(prompt, max_new_tokens=max_new_tokens, eos_token_id=eos, return_audio=True,
                          talker_max_new_tokens=talker_max_new_tokens, talker_sampling=GREEDY_TALKER, **kwargs)


@pytest.mark.parametrize("thinker_tokens, talker_tokens, case", [
    (12, 30, "talker runs past the text (cut by max_new_tokens)"),
    (12, 6, "talker_max_new_tokens reached before the text ends"),
    (2, 10, "two-token answer"),
])
def test_greedy_speech_matches_reference(speech_checkpoint, model, thinker_tokens, talker_tokens, case):
    _, hf_model = speech_checkpoint
    prompt = chat_prompt(0)
    text, codes, wav = reference_speech(hf_model, prompt, thinker_tokens, talker_tokens)
    out = ours(model, prompt, thinker_tokens, talker_tokens)
    assert out.text_ids == text
    assert out.codes.shape == codes.shape == (16, talker_tokens - 1)
    assert torch.equal(out.codes, codes)
    assert out.sample_rate == 24000 and out.audio.dtype == torch.float32
    assert out.audio.shape == wav.shape == (1920 * codes.shape[1] - 555,)
    torch.testing.assert_close(out.audio, wav, atol=WAVE_ATOL, rtol=0)


def test_tied_word_embeddings_load_and_speak_as_the_reference(tmp_path):
    # tie_word_embeddings: transformers ties the thinker's lm_head to its token embedding and the talker's codec
    # head to its codec embedding, and does not save either head
    from hf_checkpoints import omni_config_dict, save_reference_checkpoint
    from safetensors import safe_open
    config = omni_config_dict()
    config["thinker_config"]["tie_word_embeddings"] = config["talker_config"]["tie_word_embeddings"] = True
    hf_model = save_reference_checkpoint(tmp_path, config)
    with safe_open(str(next(tmp_path.glob("*.safetensors"))), "pt") as f:
        assert not {"thinker.lm_head.weight", "talker.codec_head.weight"} & set(f.keys())
    model = OmniModel.from_pretrained(tmp_path)
    assert model.thinker.lm_head.weight.data_ptr() == model.thinker.model.embed_tokens.weight.data_ptr()
    prompt = chat_prompt(0)
    text, codes, wav = reference_speech(hf_model, prompt, 6, 8)
    out = ours(model, prompt, 6, 8)
    assert out.text_ids == text
    assert torch.equal(out.codes, codes)


def test_strong_repetition_penalty_matches_reference(speech_checkpoint, model):
    # The random model's greedy codes never repeat, so at 1.05 they do not depend on the codebook-0 history. A
    # penalty below 1 favours seen codes: the codes then follow the history (checked against no penalty), which
    # holds the history itself (a device-side mask) to the reference's.
    _, hf_model = speech_checkpoint
    prompt = chat_prompt(0)
    _, codes, _ = reference_speech(hf_model, prompt, 8, 24, talker_repetition_penalty=0.5)
    penalised = model.generate(prompt, max_new_tokens=8, eos_token_id=IM_END, return_audio=True,
                               talker_max_new_tokens=24,
                               talker_sampling=SamplingParams(temperature=0.0, repetition_penalty=0.5))
    assert torch.equal(penalised.codes, codes)
    assert not torch.equal(ours(model, prompt, 8, 24).codes, codes)


def test_answer_ending_in_eos_matches_reference(speech_checkpoint, model):
    _, hf_model = speech_checkpoint
    prompt = chat_prompt(1)
    free_run, _, _ = reference_speech(hf_model, prompt, 8, 2)
    eos = free_run[4]                       # pretend the 5th token ends the turn
    text, codes, wav = reference_speech(hf_model, prompt, 8, 16, eos=eos)
    out = ours(model, prompt, 8, 16, eos=eos)
    assert out.text_ids == text and out.text_ids[-1] == eos and out.finish_reason == "eos"
    assert torch.equal(out.codes, codes)
    torch.testing.assert_close(out.audio, wav, atol=WAVE_ATOL, rtol=0)


def test_one_token_answer_speaks_instead_of_crashing(model):
    # The reference crashes here (spec pitfall 5): its assistant part has 8 text rows for 9 codec rows.
    out = ours(model, chat_prompt(2), 1, 5)
    assert len(out.text_ids) == 1 and out.codes.shape == (16, 4)
    assert out.audio.shape == (1920 * 4 - 555,) and torch.isfinite(out.audio).all()


def test_no_frames(model):
    out = ours(model, chat_prompt(2), 3, 1)
    assert out.codes.shape == (16, 0) and out.audio.numel() == 0
    assert len(out.text_ids) == 3        # the text is still complete


@pytest.mark.parametrize("first_chunk, chunk", [(1, 1), (1, 4), (3, 25)])
def test_stream_concatenates_to_generate(model, first_chunk, chunk):
    prompt = chat_prompt(4)
    full = ours(model, prompt, 6, 12)
    text, audio, codes, first_audio_at = [], [], [], None
    for event in model.stream(prompt, max_new_tokens=6, eos_token_id=IM_END, talker_max_new_tokens=12,
                              talker_sampling=GREEDY_TALKER, first_chunk_frames=first_chunk, chunk_frames=chunk):
        text += event.text_ids
        if event.audio is not None:
            audio.append(event.audio)
            first_audio_at = first_audio_at if first_audio_at is not None else len(text)
        if event.codes is not None:
            codes.append(event.codes)
    assert text == full.text_ids
    assert torch.equal(torch.cat(codes, dim=1), full.codes)
    torch.testing.assert_close(torch.cat(audio), full.audio, atol=1e-5, rtol=0)
    assert audio[0].numel() == 1920 * first_chunk - 555
    # frame k needs the k-th generated token only: the first packet right after its last frame's token
    assert first_audio_at == first_chunk < len(full.text_ids)


def test_stopping_early_releases_everything(model):
    prompt = chat_prompt(5)
    expected = ours(model, prompt, 5, 8)
    for count, _ in enumerate(model.stream(prompt, max_new_tokens=5, eos_token_id=IM_END, talker_max_new_tokens=8,
                                           talker_sampling=GREEDY_TALKER)):
        if count == 2:
            break
    again = ours(model, prompt, 5, 8)
    assert again.text_ids == expected.text_ids and torch.equal(again.codes, expected.codes)
    assert torch.equal(again.audio, expected.audio)


def test_seeded_sampling_is_reproducible(model):
    prompt = chat_prompt(6)
    kwargs = dict(max_new_tokens=4, eos_token_id=IM_END, return_audio=True, talker_max_new_tokens=6,
                  thinker_sampling=SamplingParams(temperature=0.8, top_k=20, seed=1),
                  talker_sampling=SamplingParams(temperature=0.9, top_k=50, repetition_penalty=1.05, seed=2))
    a, b = model.generate(prompt, **kwargs), model.generate(prompt, **kwargs)
    assert a.text_ids == b.text_ids and torch.equal(a.codes, b.codes)
    assert (a.codes[0] < 2048).all()        # codec specials are never sampled as codebook-0 codes


def test_bad_speech_requests(model):
    prompt = chat_prompt(0)
    with pytest.raises(ValueError, match="unknown speaker 'nobody'.*aiden, chelsie, ethan"):
        model.generate(prompt, return_audio=True, speaker="nobody")
    with pytest.raises(ValueError, match="talker_max_new_tokens"):
        model.generate(prompt, return_audio=True, talker_max_new_tokens=0)
    with pytest.raises(ValueError, match="assistant"):
        model.generate(prompt[:, :-3], return_audio=True, talker_max_new_tokens=3)
    with pytest.raises(ValueError, match="chunk"):
        model.stream(prompt, first_chunk_frames=0)   # at the call, not at the first event
    with pytest.raises(ValueError, match="talker's KV cache"):
        model.stream(prompt, talker_max_new_tokens=10**6)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.stream(prompt, max_new_tokens=0, return_audio=False)
    assert len(model.generate(prompt, max_new_tokens=2).text_ids) == 2    # still works afterwards


def test_bad_speech_requests_are_refused_before_any_work(model, monkeypatch):
    calls = []
    prefill = model.thinker_runner.prefill
    monkeypatch.setattr(model.thinker_runner, "prefill", lambda *args: calls.append(1) or prefill(*args))
    prompt = chat_prompt(0)
    for kwargs in (dict(talker_max_new_tokens=10**6), dict(input_ids=prompt[:, :-3]), dict(speaker="nobody")):
        with pytest.raises(ValueError):
            model.generate(**{"input_ids": prompt, **kwargs}, return_audio=True)
    assert not calls   # no encoder, no thinker prefill
    model.generate(prompt, max_new_tokens=2, return_audio=True, talker_max_new_tokens=2)
    assert calls == [1]


def test_one_stream_at_a_time(model):
    # the single-request runners hold one answer's state: a second stream, or generate(), while a stream is
    # suspended is refused (it would reset the caches under it); closing or dropping the stream frees them
    prompt = chat_prompt(3)
    kwargs = dict(max_new_tokens=4, eos_token_id=IM_END, talker_max_new_tokens=5, talker_sampling=GREEDY_TALKER)
    expected = ours(model, prompt, 4, 5)
    for return_audio in (True, False):
        # closing(): a failure here must not leave the runners held for the next tests
        with closing(model.stream(prompt, return_audio=return_audio, **kwargs)) as first:
            events = [next(first)]
            second = model.stream(prompt, return_audio=return_audio, **kwargs)   # checked, not started
            for use in (lambda: next(second), lambda: model.generate(prompt, max_new_tokens=2),
                        lambda: model.generate(prompt, return_audio=True, talker_max_new_tokens=3)):
                with pytest.raises(RuntimeError, match="single-request runners are in use by a stream.*stream_batch"):
                    use()
            events += list(first)                              # the first one is still its own answer
        assert [t for e in events for t in e.text_ids] == expected.text_ids
        if return_audio:
            assert torch.equal(torch.cat([e.codes for e in events if e.codes is not None], dim=1), expected.codes)
        assert [e.finish_reason for e in events if e.finish_reason] == [expected.finish_reason]
    stream = model.stream(prompt, **kwargs)
    next(stream)
    del stream                                                 # collected: the runners are free again
    gc.collect()
    assert ours(model, prompt, 4, 5).text_ids == expected.text_ids


def test_bf16_speech_codes_match_reference(speech_checkpoint):
    from transformers import Qwen3OmniMoeForConditionalGeneration
    folder, _ = speech_checkpoint
    hf_model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).eval()
    model = OmniModel.from_pretrained(folder, dtype=torch.bfloat16)
    prompt = chat_prompt(0)
    text, codes, wav = reference_speech(hf_model, prompt, 8, 12)
    out = ours(model, prompt, 8, 12)
    assert out.text_ids == text and torch.equal(out.codes, codes)
    # The bf16 waveform itself is only good to ~0.1 here (a bf16 offline decode is ~0.08 from fp32's); streaming runs
    # other op shapes, so it rounds differently within that noise.
    assert out.audio.shape == wav.shape
    torch.testing.assert_close(out.audio, wav.float(), atol=0.2, rtol=0)
