"""Chat messages -> model inputs, against transformers' ``Qwen3OmniMoeProcessor`` with a tiny local tokenizer.

The reference side: the chat template below rendered by the processor's ``apply_chat_template``, then the processor's
own placeholder expansion (audio counts from its WhisperFeatureExtractor batch, image/video counts from the grids,
audio-in-video interleaving) and tokenization by the same tokenizer wrapped as ``PreTrainedTokenizerFast``.

Two stand-ins, both stated where they are used:
* The release chat template cannot be read offline (it ships with the checkpoint); ``CHAT_TEMPLATE`` is its layout:
  no default system prompt, parts in the order given.
* The reference image/video processors need torchvision (not installed), so the processor gets stand-ins that return
  ``preprocess_image``/``preprocess_video``'s pixels and grids (those are compared with the real processors in
  test_vision_encoder.py where torchvision exists). Placeholder counts are also checked against t*h*w/merge^2.
"""
import json

import numpy as np
import pytest
import torch

from omni_runtime.chat import AUDIO_END, NEWLINE, VISION_END, load_tokenizer, prepare_inputs
from omni_runtime.config import SpecialTokens
from omni_runtime.models.audio_encoder import audio_token_count
from omni_runtime.positions import rope_positions
from omni_runtime.preprocess.vision import preprocess_image, preprocess_video

TOKENS = SpecialTokens()
QWEN_SPECIALS = {
    "<|endoftext|>": 151643, "<|im_start|>": TOKENS.im_start, "<|im_end|>": TOKENS.im_end,
    "<|vision_start|>": TOKENS.vision_start, "<|vision_end|>": VISION_END, "<|image_pad|>": TOKENS.image,
    "<|video_pad|>": TOKENS.video, "<|audio_start|>": TOKENS.audio_start, "<|audio_end|>": AUDIO_END,
    "<|audio_pad|>": TOKENS.audio,
}
PROCESSOR_TOKENS = dict(  # the tokenizer attributes Qwen3OmniMoeProcessor reads
    image_token="<|image_pad|>", video_token="<|video_pad|>", audio_token="<|audio_pad|>",
    vision_bos_token="<|vision_start|>", vision_eos_token="<|vision_end|>",
    audio_bos_token="<|audio_start|>", audio_eos_token="<|audio_end|>",
)
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}{%- for part in message.content %}"
    "{%- if part.type == 'audio' %}{{- '<|audio_start|><|audio_pad|><|audio_end|>' }}"
    "{%- elif part.type == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part.type == 'video' %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part.type == 'text' %}{{- part.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CORPUS = ["Hello world, what is in this audio?", "Describe the image and the video in detail.",
          "system user assistant: be brief, answer in one line.", "Which of these animals makes the sound?"]


# ---- fixtures ------------------------------------------------------------------------------------------------------

def tiny_tokenizer_json() -> str:
    """A byte-level BPE trained on a few sentences, with the Qwen special tokens added at their real ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    spec = json.loads(tokenizer.to_str())
    spec["model"]["vocab"].update(QWEN_SPECIALS)
    spec["added_tokens"] = [dict(id=i, content=token, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                 special=True) for token, i in QWEN_SPECIALS.items()]
    return json.dumps(spec)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    (path / "tokenizer.json").write_text(tiny_tokenizer_json())
    return path


@pytest.fixture(scope="module")
def tokenizer(folder):
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def reference(tokenizer):
    from transformers import BatchFeature, PreTrainedTokenizerFast, Qwen3OmniMoeProcessor, WhisperFeatureExtractor
    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.video_processing_utils import VideoProcessorMixin

    class Images(ImageProcessingMixin):  # stand-in: the reference's needs torchvision
        merge_size, model_input_names = 2, ["pixel_values", "image_grid_thw"]

        def __call__(self, images, **kwargs):
            pixels, grids = zip(*[preprocess_image(image) for image in images])
            return BatchFeature({"pixel_values": torch.cat(pixels), "image_grid_thw": torch.cat(grids)})

    class Videos(VideoProcessorMixin):  # stand-in: the reference's needs torchvision
        merge_size, temporal_patch_size, model_input_names = 2, 2, ["pixel_values_videos", "video_grid_thw"]

        def __init__(self):
            pass

        def __call__(self, videos, fps=None, **kwargs):
            pixels, grids, _ = zip(*[preprocess_video(video, fps or 1.0) for video in videos])
            return BatchFeature({"pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.cat(grids)})

    class Processor(Qwen3OmniMoeProcessor):
        def check_argument_for_proper_class(self, name, argument):
            # without torchvision the expected classes are dummies no object is an instance of
            if name in ("image_processor", "video_processor"):
                return type(argument)
            return super().check_argument_for_proper_class(name, argument)

    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400,
                                       chunk_length=300, padding_value=0.0, dither=0.0, return_attention_mask=True)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, extra_special_tokens=PROCESSOR_TOKENS)
    return Processor(image_processor=Images(), video_processor=Videos(), feature_extractor=features, tokenizer=wrapped)


def reference_inputs(processor, messages: list[dict], use_audio_in_video: bool = False) -> dict:
    """The processor's inputs for a conversation whose media are arrays (one fps for all videos, as it takes)."""
    text = processor.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)
    parts = [part for m in messages if not isinstance(m["content"], str) for part in m["content"]]
    audio, slots, videos = [], [], [p for p in parts if p["type"] == "video"]
    for part in parts:
        if part["type"] == "audio" or (part["type"] == "video" and use_audio_in_video):
            audio.append(part["audio"])
            slots.append(None if part["type"] == "audio" else videos.index(part))
    kwargs = dict(images=[p["image"] for p in parts if p["type"] == "image"] or None,
                  videos=[np.asarray(p["video"]) for p in videos] or None, audio=audio or None, return_tensors="pt",
                  videos_kwargs={"fps": videos[0]["fps"]} if videos else {})
    if use_audio_in_video:
        kwargs |= dict(audio_from_video_indices=slots, load_audio_from_video=True)
    return dict(processor(text=[text], **kwargs))


def wave(seconds: float, seed: int, extra: int = 37) -> np.ndarray:
    """Noise of ``seconds`` plus ``extra`` samples (not a multiple of the 160-sample hop)."""
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * 16000) + extra)).astype(np.float32)


def pixels(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def assert_same_inputs(ours: dict, theirs: dict):
    torch.testing.assert_close(ours["input_ids"], theirs["input_ids"], rtol=0, atol=0)
    for key in ("input_features", "feature_attention_mask", "image_grid_thw", "video_grid_thw",
                "video_second_per_grid", "pixel_values", "pixel_values_videos"):
        assert (key in ours) == (key in theirs), key
        if key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)


def count(ids: torch.Tensor, token: int) -> int:
    return int((ids == token).sum())


# ---- against the reference -----------------------------------------------------------------------------------------

def test_text_only(tokenizer, reference):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello world, what is in this audio?"},
                {"role": "assistant", "content": [{"type": "text", "text": "Nothing, "},
                                                  {"type": "text", "text": "in one line."}]},
                {"role": "user", "content": [{"type": "text", "text": "Which <|im_end|> animals?"}]}]
    ours = prepare_inputs(messages, tokenizer, TOKENS)
    assert set(ours) == {"input_ids"} and ours["input_ids"].dtype == torch.int64
    assert_same_inputs(ours, reference_inputs(reference, messages))
    assert ours["input_ids"][0, :1].tolist() == [TOKENS.im_start]   # no default system prompt
    assert count(ours["input_ids"], TOKENS.im_end) == 5             # the one in the user's text included


def test_audio_only_from_a_file(tokenizer, reference, tmp_path):
    import soundfile

    samples = wave(1.3, seed=0)
    soundfile.write(tmp_path / "a.wav", samples, 16000, subtype="FLOAT")
    ours = prepare_inputs([{"role": "user", "content": [{"type": "audio", "audio": str(tmp_path / "a.wav")},
                                                        {"type": "text", "text": "What is in this audio?"}]}],
                          tokenizer, TOKENS)
    theirs = reference_inputs(reference, [{"role": "user", "content": [
        {"type": "audio", "audio": samples}, {"type": "text", "text": "What is in this audio?"}]}])
    assert_same_inputs(ours, theirs)
    assert ours["use_audio_in_video"] is False
    assert count(ours["input_ids"], TOKENS.audio) == audio_token_count(len(samples) // 160)


def test_image_only(tokenizer, reference):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe "},
                                             {"type": "image", "image": pixels((60, 90, 3), seed=1)}]}]
    ours = prepare_inputs(messages, tokenizer, TOKENS)
    assert_same_inputs(ours, reference_inputs(reference, messages))
    assert count(ours["input_ids"], TOKENS.image) == int(ours["image_grid_thw"].prod()) // 4


def test_video_only(tokenizer, reference):
    messages = [{"role": "user", "content": [{"type": "video", "video": list(pixels((5, 40, 48, 3), seed=2)),
                                              "fps": 2.0}, {"type": "text", "text": "Describe the video."}]}]
    ours = prepare_inputs(messages, tokenizer, TOKENS)
    assert_same_inputs(ours, reference_inputs(reference, messages))
    assert count(ours["input_ids"], TOKENS.video) == int(ours["video_grid_thw"].prod()) // 4
    assert ours["video_second_per_grid"].tolist() == [1.0]


def test_audio_in_video(tokenizer, reference):
    """A standalone audio (shorter, so padded in the batch) and a video whose soundtrack interleaves with its frames."""
    messages = [{"role": "user", "content": [
        {"type": "audio", "audio": wave(0.9, seed=3), "sample_rate": 16000},
        {"type": "video", "video": pixels((8, 40, 48, 3), seed=4), "fps": 2.0, "audio": wave(2.2, seed=5),
         "sample_rate": 16000},
        {"type": "text", "text": "Which of these animals makes the sound?"}]}]
    ours = prepare_inputs(messages, tokenizer, TOKENS, use_audio_in_video=True)
    assert_same_inputs(ours, reference_inputs(reference, messages, use_audio_in_video=True))
    assert ours["use_audio_in_video"] is True
    ids = ours["input_ids"][0].tolist()
    start = ids.index(TOKENS.audio_start, ids.index(TOKENS.vision_start))
    body = ids[start + 1:ids.index(AUDIO_END, start)]
    runs = [kind for n, kind in enumerate(body) if n == 0 or body[n - 1] != kind]
    assert ids[start - 1] == TOKENS.vision_start and len(runs) >= 4          # interleaved, not one block each
    mask = ours["feature_attention_mask"].sum(1).tolist()
    positions, _ = rope_positions(ours["input_ids"], TOKENS, 13.0, 2, video_grid_thw=ours["video_grid_thw"],
                                  video_second_per_grid=ours["video_second_per_grid"], use_audio_in_video=True,
                                  audio_lengths=[audio_token_count(n) for n in mask])
    assert positions.shape == (3, 1, len(ids))


def test_two_audios_and_an_image(tokenizer, reference):
    first, second = wave(1.0, seed=6), wave(2.5, seed=7, extra=101)
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "audio", "audio": first, "sample_rate": 16000},
                                             {"type": "text", "text": "and"},
                                             {"type": "audio", "audio": second, "sample_rate": 16000},
                                             {"type": "image", "image": pixels((64, 64, 3), seed=8)},
                                             {"type": "text", "text": "Describe the image."}]}]
    ours = prepare_inputs(messages, tokenizer, TOKENS)
    assert_same_inputs(ours, reference_inputs(reference, messages))
    # The reference's batch gives the padded audio ceil(samples / 160) frames: one more than it has alone.
    assert ours["feature_attention_mask"].sum(1).tolist() == [len(first) // 160 + 1, len(second) // 160]
    assert ours["input_features"].shape == (2, 128, len(second) // 160)


# ---- without a tokenizer, and bad input ----------------------------------------------------------------------------

def test_text_ids_without_a_tokenizer():
    messages = [{"role": "user", "content": [{"type": "text_ids", "ids": [9707, 11]},
                                             {"type": "audio", "audio": wave(0.5, seed=9), "sample_rate": 16000}]}]
    ids = prepare_inputs(messages, None, TOKENS)["input_ids"][0].tolist()
    n = audio_token_count(len(wave(0.5, seed=9)) // 160)
    assert ids == [TOKENS.im_start, TOKENS.user, NEWLINE, 9707, 11, TOKENS.audio_start, *[TOKENS.audio] * n,
                   AUDIO_END, TOKENS.im_end, NEWLINE, TOKENS.im_start, TOKENS.assistant, NEWLINE]


def test_text_ids_mix_with_text(tokenizer):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text_ids", "ids": [7]}]}]
    ids = prepare_inputs(messages, tokenizer, TOKENS, add_generation_prompt=False)["input_ids"][0].tolist()
    assert ids == [TOKENS.im_start, *tokenizer.encode("user\nHello").ids, 7, TOKENS.im_end, *tokenizer.encode("\n").ids]


def test_load_tokenizer(tmp_path):
    assert load_tokenizer(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


NAN_AUDIO = np.full(4000, np.nan, dtype=np.float32)
BAD_INPUT = [
    ([], "non-empty list"),
    ([{"role": "user", "content": [{"type": "sticker", "sticker": 1}]}], "unknown part type 'sticker'"),
    ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "user", "content": 3}], "content must be a string or a list"),
    ([{"role": "user", "content": [{"type": "audio", "audio": NAN_AUDIO, "sample_rate": 16000}]}],
     r"message 0 part 0 \(audio\): waveform contains NaN"),
    ([{"role": "user", "content": [{"type": "audio", "audio": wave(1, 0)}]}], "needs 'sample_rate'"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "has no 'audio'"),
    ([{"role": "user", "content": [{"type": "text_ids", "ids": [1, -2]}]}], "non-negative ints"),
    ([{"role": "user", "content": [{"type": "video", "video": pixels((2, 40, 48, 3), 0), "audio": wave(1, 0),
                                    "sample_rate": 16000}]}], "use_audio_in_video=False"),
    ([{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]}], "not decoded"),
]


@pytest.mark.parametrize("messages, message", BAD_INPUT)
def test_bad_input(tokenizer, messages, message):
    with pytest.raises(ValueError, match=message):
        prepare_inputs(messages, tokenizer, TOKENS)


@pytest.mark.parametrize("content", ["Hello", [{"type": "text", "text": "Hello"}]])
def test_text_without_a_tokenizer(content):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        prepare_inputs([{"role": "user", "content": content}], None, TOKENS)


def test_video_without_its_audio_when_audio_in_video(tokenizer):
    messages = [{"role": "user", "content": [{"type": "video", "video": pixels((2, 40, 48, 3), 0)}]}]
    with pytest.raises(ValueError, match="use_audio_in_video=True needs"):
        prepare_inputs(messages, tokenizer, TOKENS, use_audio_in_video=True)


def test_audio_files_that_cannot_be_read(tokenizer, tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000not audio")
    with pytest.raises(ValueError, match="cannot decode audio file .*bad.wav"):
        prepare_inputs([{"role": "user", "content": [{"type": "audio", "audio": tmp_path / "bad.wav"}]}],
                       tokenizer, TOKENS)
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        prepare_inputs([{"role": "user", "content": [{"type": "audio", "audio": tmp_path / "missing.wav"}]}],
                       tokenizer, TOKENS)


def test_streamed_text_pieces_concatenate_to_the_full_decode(tokenizer):
    from omni_runtime.pipeline import IncrementalText
    text = "héllo wörld, 世界 — ok"
    ids = tokenizer.encode(text).ids
    stream = IncrementalText(lambda ids: tokenizer.decode(ids, skip_special_tokens=False))
    pieces = [stream.push([i]) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert len([p for p in pieces if p]) > 1       # it does stream


def test_streamed_text_ends_with_what_a_cut_answer_holds(tokenizer):
    # an answer cut by max_new_tokens inside a multi-byte character: the last push gives the rest, the incomplete
    # character's replacement included, so the pieces still concatenate to the full decode
    from omni_runtime.pipeline import IncrementalText
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    ids = tokenizer.encode("ok 世界").ids
    cut = next(n for n in range(1, len(ids)) if decode(ids[:n]).endswith("\ufffd"))
    stream = IncrementalText(decode)
    pieces = [stream.push([i]) for i in ids[:cut - 1]] + [stream.push([ids[cut - 1]], final=True)]
    assert "".join(pieces) == decode(ids[:cut]) and pieces[-1].endswith("\ufffd")


def test_streamed_text_decodes_a_window_per_token(tokenizer):
    # each push decodes the tokens since the last piece's window, not the whole answer: linear in its length
    from omni_runtime.pipeline import IncrementalText
    decoded = []

    def decode(ids):
        decoded.append(len(ids))
        return tokenizer.decode(ids, skip_special_tokens=False)

    ids = tokenizer.encode(" ".join(["streaming text, wörds and 世界"] * 40)).ids
    stream = IncrementalText(decode)
    assert "".join(stream.push([i]) for i in ids) == tokenizer.decode(ids)
    assert len(ids) > 300 and sum(decoded) < 8 * len(ids)
