"""Audio, image, video and audio-in-video prompts: greedy thinker tokens and logits equal to transformers' on the
same random checkpoint, and speech from a multimodal prompt equal to the reference's."""
import numpy as np
import pytest
import torch

from omni_runtime import OmniModel
from test_positions import IM_END, IM_START, NEWLINE, USER, Prompt
from test_speech import GREEDY_TALKER, WAVE_ATOL, reference_speech
from test_thinker_parity import assert_logits_match, teacher_forced_logits

ASSISTANT = 77091


def chat(build) -> Prompt:
    prompt = Prompt(ids=[IM_START, USER, NEWLINE])
    build(prompt)
    prompt.ids += [IM_END, NEWLINE, IM_START, ASSISTANT, NEWLINE]
    return prompt


def media_inputs(prompt: Prompt, seed: int = 0) -> dict:
    """Random encoder inputs shaped as the reference processor returns them for this prompt."""
    g = torch.Generator().manual_seed(seed)
    media = {}
    if prompt.mel_frames:
        longest = max(prompt.mel_frames)
        media["input_features"] = torch.randn(len(prompt.mel_frames), 128, longest, generator=g) * 0.5
        frames = torch.tensor(prompt.mel_frames)
        media["feature_attention_mask"] = (torch.arange(longest)[None] < frames[:, None]).long()
    patches = lambda grids: torch.randn(sum(int(np.prod(x)) for x in grids), 3 * 2 * 16 * 16, generator=g)  # noqa: E731
    if prompt.images:
        media["pixel_values"], media["image_grid_thw"] = patches(prompt.images), torch.tensor(prompt.images)
    if prompt.videos:
        media["pixel_values_videos"], media["video_grid_thw"] = patches(prompt.videos), torch.tensor(prompt.videos)
        media["video_second_per_grid"] = torch.tensor(prompt.seconds)
    if prompt.audio_in_video:
        media["use_audio_in_video"] = True
    return media


CASES = {
    "audio": lambda p: p.text(3).audio(250).text(4),
    "image": lambda p: p.image((1, 4, 6)).text(5),
    "video": lambda p: p.text(2).video((2, 4, 4), 2.0).text(3),
    "video with its audio": lambda p: p.video_with_audio((2, 4, 4), 2.0, 300).text(2),
    "two audios and an image": lambda p: p.audio(120).text(2).audio(99).image((1, 4, 4)).text(3),
    "long audio over several windows": lambda p: p.audio(1700).text(2),
}


@pytest.fixture(scope="module")
def checkpoint(reference_checkpoint):
    return reference_checkpoint()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_multimodal_thinker_matches_reference(checkpoint, case, dtype):
    from transformers import Qwen3OmniMoeForConditionalGeneration
    folder, _ = checkpoint
    hf_model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
    model = OmniModel.from_pretrained(folder, dtype=dtype)
    prompt = chat(CASES[case])
    media = media_inputs(prompt)
    ids = torch.tensor([prompt.ids])
    floats = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in media.items()}
    with torch.no_grad():
        out = hf_model.thinker.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                        do_sample=False, eos_token_id=IM_END, output_logits=True,
                                        return_dict_in_generate=True, **floats)
    expected, expected_logits = out.sequences[0, ids.shape[1]:].tolist(), torch.cat(out.logits).float()
    ours = model.generate(ids, max_new_tokens=8, eos_token_id=IM_END, **floats)
    assert ours.text_ids == expected
    assert_logits_match(teacher_forced_logits(model, ids, expected, **floats), expected_logits, dtype, floor=2e-5)


def assert_speech_matches_reference(hf_model, model, prompt: Prompt, thinker_tokens: int, talker_tokens: int,
                                    compare_audio: bool = True, **reference_kwargs) -> None:
    """Greedy speech from ``prompt`` and its random media (seed 1): our text and codes equal the reference's, the
    waveform within WAVE_ATOL. ``reference_kwargs`` go to the reference's generate alone."""
    media = media_inputs(prompt, seed=1)
    ids = torch.tensor([prompt.ids])
    text, codes, wav = reference_speech(hf_model, ids, thinker_tokens, talker_tokens, **media, **reference_kwargs)
    out = model.generate(ids, max_new_tokens=thinker_tokens, eos_token_id=IM_END, return_audio=True,
                         talker_max_new_tokens=talker_tokens, talker_sampling=GREEDY_TALKER, **media)
    assert out.text_ids == text
    assert torch.equal(out.codes, codes)
    if compare_audio:
        torch.testing.assert_close(out.audio, wav, atol=WAVE_ATOL, rtol=0)


@pytest.mark.parametrize("case", ["audio", "image"])
def test_speech_from_multimodal_prompt_matches_reference(checkpoint, case):
    folder, hf_model = checkpoint
    assert_speech_matches_reference(hf_model, OmniModel.from_pretrained(folder), chat(CASES[case]), 6, 12)


def test_placeholder_count_must_match_features(checkpoint):
    model = OmniModel.from_pretrained(checkpoint[0])
    prompt = chat(CASES["image"])
    media = media_inputs(prompt)
    ids = torch.tensor([prompt.ids])
    with pytest.raises(ValueError, match="grid_thw .* 16 patches but pixel_values has 24 rows"):
        model.generate(ids, max_new_tokens=2, **media | {"image_grid_thw": torch.tensor([[1, 4, 4]])})
    short = [t for i, t in enumerate(prompt.ids) if not (t == 151655 and i % 2)]
    with pytest.raises(ValueError, match="placeholder"):
        model.generate(torch.tensor([short]), max_new_tokens=2, **media)
    audio = chat(CASES["audio"])
    extra = torch.tensor([audio.ids[:5] + [151675] + audio.ids[5:]])
    with pytest.raises(ValueError, match="audio"):
        model.generate(extra, max_new_tokens=2, **media_inputs(audio))
    with pytest.raises(ValueError, match="unknown generate arguments"):
        model.generate(ids, max_new_tokens=2, pixel_value=media["pixel_values"])
    assert len(model.generate(torch.tensor([chat(CASES["audio"]).ids]), max_new_tokens=2,
                              **media_inputs(chat(CASES["audio"]))).text_ids) == 2


def test_prepare_from_raw_audio_then_generate_matches_reference(checkpoint):
    folder, hf_model = checkpoint
    model = OmniModel.from_pretrained(folder)
    rate = 22050
    wave = (0.3 * np.sin(2 * np.pi * 330 * np.arange(int(1.5 * rate)) / rate)).astype(np.float32)
    inputs = model.prepare([{"role": "user", "content": [{"type": "audio", "audio": wave, "sample_rate": rate},
                                                         {"type": "text_ids", "ids": [1000, 1001, 1002]}]}])
    assert int((inputs["input_ids"] == 151675).sum()) == 20   # 1.5 s: 150 frames -> 13 + 7 tokens
    out = model.generate(max_new_tokens=5, eos_token_id=IM_END, **inputs)
    with torch.no_grad():
        ids = inputs["input_ids"]
        reference = hf_model.thinker.generate(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                              eos_token_id=IM_END, **inputs)
    assert out.text_ids == reference[0, ids.shape[1]:].tolist()


def test_speech_with_an_image_in_the_system_turn(checkpoint):
    # The talker's prefill holds the user turns only, so its positions count the user turns' images alone (the
    # reference passes every grid and fails here). A system image (1, 4, 6) and a user image (1, 4, 4): the talker's
    # positions are those of its ids with the user image's grid; speech runs, alone and in the engine alike.
    from omni_runtime.engine.talker_prompt import user_positions
    from omni_runtime.multimodal import MediaInputs, talker_positions
    from omni_runtime.positions import rope_positions
    from test_positions import TTS_PAD, Prompt
    model = OmniModel.from_pretrained(checkpoint[0])
    prompt = Prompt(ids=[IM_START, 8948, NEWLINE]).image((1, 4, 6))
    prompt.ids += [IM_END, NEWLINE, IM_START, USER, NEWLINE]
    prompt.text(2).image((1, 4, 4)).text(3)
    prompt.ids += [IM_END, NEWLINE, IM_START, ASSISTANT, NEWLINE]
    media = media_inputs(prompt)
    ids = torch.tensor(prompt.ids)
    talker_ids = torch.cat([ids[user_positions(ids, model.config.tokens)], torch.full((9,), TTS_PAD)])
    expected, _ = rope_positions(talker_ids, model.config.tokens, model.config.talker.position_id_per_seconds,
                                 image_grid_thw=torch.tensor([[1, 4, 4]]))
    got = talker_positions(ids, MediaInputs.from_kwargs(media), model.config)
    assert torch.equal(got, expected)
    kwargs = dict(max_new_tokens=4, eos_token_id=None, talker_max_new_tokens=5, talker_sampling=GREEDY_TALKER)
    alone = model.generate(ids[None], return_audio=True, **kwargs, **media)
    assert alone.codes.shape == (16, 4)
    batched = model.generate_batch([{"input_ids": ids[None], **media}], return_audio=True, **kwargs)[0]
    assert batched.text_ids == alone.text_ids and torch.equal(batched.codes, alone.codes)


def test_speech_when_the_talker_reads_the_last_hidden_state(reference_checkpoint):
    # accept_hidden_layer == thinker layers: the reference's last hidden state is the final-norm one, not the last
    # layer's output, and the talker's audio rows read it
    folder, hf_model = reference_checkpoint(accept_hidden_layer=2)
    assert_speech_matches_reference(hf_model, OmniModel.from_pretrained(folder), chat(CASES["audio"]), 4, 8,
                                    compare_audio=False)


@pytest.mark.parametrize("case", ["two audios and an image", "video with its audio"])
def test_speech_from_mixed_media_matches_reference(checkpoint, case):
    # Two reference bugs stand in the way, both patched here: its talker reads ``config.audio_config.n_window``, a
    # field the talker config lacks (any prompt with audio and an image or video fails), and its generate does not
    # pass ``use_audio_in_video`` on to the talker (which then lays the video's positions out as plain text).
    folder, hf_model = checkpoint
    prompt = chat(CASES[case])
    extra = {"talker_use_audio_in_video": True} if prompt.audio_in_video else {}
    talker_config = hf_model.talker.config
    talker_config.audio_config = hf_model.config.thinker_config.audio_config
    try:
        assert_speech_matches_reference(hf_model, OmniModel.from_pretrained(folder), prompt, 6, 12, **extra)
    finally:
        del talker_config.audio_config


def test_the_talker_lays_out_positions_with_its_own_config(reference_checkpoint):
    # thinker 13 positions a second, talker 25: each get_rope_index reads its own config's, so a video's frames sit
    # at other talker positions than thinker ones
    folder, hf_model = reference_checkpoint(talker_position_id_per_seconds=25)
    model = OmniModel.from_pretrained(folder)
    assert (model.config.position_id_per_seconds, model.config.talker.position_id_per_seconds) == (13, 25)
    prompt = chat(lambda p: p.text(2).video((3, 4, 4), 2.0).text(3))
    assert_speech_matches_reference(hf_model, model, prompt, 4, 8, compare_audio=False)


def test_a_config_without_a_key_reads_as_transformers_reads_it():
    # position_id_per_seconds (25 for thinker and talker, the release's 13) and norm_topk_prob (thinker True,
    # talker False, the release's True): transformers' class defaults, what a config without them means to it
    from hf_checkpoints import omni_config_dict
    from transformers import Qwen3OmniMoeConfig

    from omni_runtime.config import OmniConfig
    config = omni_config_dict()
    del config["thinker_config"]["position_id_per_seconds"], config["talker_config"]["position_id_per_seconds"]
    for part in ("thinker_config", "talker_config"):
        del config[part]["text_config"]["norm_topk_prob"]
    ours, theirs = OmniConfig.from_dict(config), Qwen3OmniMoeConfig(**config)
    assert ours.position_id_per_seconds == theirs.thinker_config.position_id_per_seconds == 25
    assert ours.talker.position_id_per_seconds == theirs.talker_config.position_id_per_seconds == 25
    assert ours.thinker_text.norm_topk_prob == theirs.thinker_config.text_config.norm_topk_prob is True
    assert ours.talker.text.norm_topk_prob == theirs.talker_config.text_config.norm_topk_prob is False
