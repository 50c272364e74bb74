"""TM-RoPE positions equal transformers' get_rope_index (thinker and talker), and bad media layouts are refused."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hf_checkpoints import build_reference_model, omni_config_dict
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

from omni_runtime.config import SpecialTokens
from omni_runtime.positions import decode_positions, rope_positions

VISION_START, VISION_END, IMAGE, VIDEO = 151652, 151653, 151655, 151656
AUDIO_START, AUDIO_END, AUDIO = 151669, 151670, 151675
IM_START, IM_END, USER, NEWLINE, TTS_PAD = 151644, 151645, 872, 198, 151671
TOKENS = SpecialTokens()
PER_SECOND = 13.0


@pytest.fixture(scope="module")
def reference():
    return build_reference_model(omni_config_dict())


def audio_tokens(mel_frames: int) -> int:
    return int(_get_feat_extract_output_lengths(torch.tensor(mel_frames)))


@dataclass
class Prompt:
    """A prompt built segment by segment, with the media arguments both implementations take."""
    ids: list[int] = field(default_factory=list)
    images: list[tuple[int, int, int]] = field(default_factory=list)
    videos: list[tuple[int, int, int]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    mel_frames: list[int] = field(default_factory=list)
    audio_in_video: bool = False

    def text(self, n: int) -> Prompt:
        self.ids += [1000 + (len(self.ids) + i) % 97 for i in range(n)]
        return self

    def image(self, grid) -> Prompt:
        self.images.append(grid)
        self.ids += [VISION_START] + [IMAGE] * (np.prod(grid) // 4) + [VISION_END]
        return self

    def video(self, grid, seconds: float) -> Prompt:
        self.videos.append(grid)
        self.seconds.append(seconds)
        self.ids += [VISION_START] + [VIDEO] * (np.prod(grid) // 4) + [VISION_END]
        return self

    def audio(self, mel_frames: int) -> Prompt:
        self.mel_frames.append(mel_frames)
        self.ids += [AUDIO_START] + [AUDIO] * audio_tokens(mel_frames) + [AUDIO_END]
        return self

    def video_with_audio(self, grid, seconds: float, mel_frames: int) -> Prompt:
        # the processor's layout (replace_video_with_audio_token): tokens ordered by time, video first on ties
        self.videos.append(grid)
        self.seconds.append(seconds)
        self.mel_frames.append(mel_frames)
        self.audio_in_video = True
        t, h, w = grid
        video_times = list(np.repeat(np.arange(t), h * w // 4) * seconds * PER_SECOND)
        audio_times = list(range(audio_tokens(mel_frames)))
        body = sorted([(x, 0, VIDEO) for x in video_times] + [(x, 1, AUDIO) for x in audio_times])
        self.ids += [VISION_START, AUDIO_START] + [token for *_, token in body] + [AUDIO_END, VISION_END]
        return self

    def reference_args(self) -> tuple:
        ids = torch.tensor([self.ids])
        grid = lambda rows: torch.tensor(rows) if rows else None  # noqa: E731
        mel = torch.tensor(self.mel_frames) if self.mel_frames else None
        seconds = torch.tensor(self.seconds) if self.seconds else None
        return ids, grid(self.images), grid(self.videos), torch.ones_like(ids), self.audio_in_video, mel, seconds

    def ours(self):
        return rope_positions(
            torch.tensor(self.ids), TOKENS, PER_SECOND, 2,
            torch.tensor(self.images) if self.images else None, torch.tensor(self.videos) if self.videos else None,
            self.seconds or None, self.audio_in_video, [audio_tokens(m) for m in self.mel_frames] or None)


def assert_same(ours, theirs) -> None:
    (positions, delta), (ref_positions, ref_delta) = ours, theirs
    whole = torch.equal(ref_positions, ref_positions.round())
    assert positions.dtype == (torch.int64 if whole else torch.float32)
    assert positions.shape == ref_positions.shape
    assert torch.equal(positions.to(ref_positions.dtype), ref_positions)
    assert delta == ref_delta.item() and isinstance(delta, int if whole else float)


def check(reference, prompt: Prompt) -> None:
    assert_same(prompt.ours(), reference.thinker.get_rope_index(*prompt.reference_args()))


# --- equality with the reference ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 151])
def test_text(reference, n):
    check(reference, Prompt().text(n))


@pytest.mark.parametrize("mel_frames", [[8], [100], [37, 250]])
def test_audio(reference, mel_frames):
    prompt = Prompt().text(3)
    for m in mel_frames:
        prompt.audio(m).text(2)
    check(reference, prompt)


@pytest.mark.parametrize("grid", [(1, 2, 2), (1, 4, 6), (1, 8, 2), (2, 4, 4), (3, 6, 8)])
def test_image(reference, grid):
    check(reference, Prompt().text(3).image(grid).text(5))


@pytest.mark.parametrize("seconds", [0.5, 1.0, 2.0, 1.33])
@pytest.mark.parametrize("grid", [(1, 2, 2), (2, 4, 6), (3, 8, 8), (3, 4, 4)])
def test_video(reference, grid, seconds):
    check(reference, Prompt().text(2).video(grid, seconds).text(4))


@pytest.mark.parametrize("grid, seconds, mel_frames", [
    ((1, 2, 2), 2.0, 100), ((2, 4, 6), 0.5, 60), ((3, 8, 4), 1.33, 250), ((2, 8, 8), 2.0, 20),
    ((3, 4, 4), 1.0, 420), ((1, 8, 8), 2.0, 8),  # one audio token: the block's end comes before its largest position
    ((3, 6, 6), 0.5, 8), ((2, 2, 8), 1.33, 37),
])
def test_audio_in_video(reference, grid, seconds, mel_frames):
    check(reference, Prompt().text(3).video_with_audio(grid, seconds, mel_frames).text(1))


@pytest.mark.parametrize("build", [
    lambda p: p.text(2).audio(37).text(1).audio(100).text(3).image((1, 4, 6)).text(2),  # two audios and an image
    lambda p: p.image((1, 2, 4)).video((2, 4, 4), 2.0).audio(60).text(1).image((2, 6, 2)).text(2),
    lambda p: p.text(1).video((3, 2, 2), 1.33).text(2).video((1, 4, 8), 0.5).audio(8).text(3),
    lambda p: p.text(2).video_with_audio((2, 4, 4), 2.0, 60).image((1, 2, 2)).audio(20)
              .video_with_audio((3, 2, 6), 1.33, 100).text(2),
    lambda p: p.image((1, 6, 6)).image((1, 2, 2)),  # ends with a media group
])
def test_several_media(reference, build):
    check(reference, build(Prompt()))


@pytest.mark.parametrize("seed", range(6))
def test_random_layouts(reference, seed):
    rng = random.Random(seed)
    prompt, with_audio_in_video = Prompt(), seed % 2 == 1
    for _ in range(rng.randint(1, 5)):
        grid = (rng.randint(1, 3), 2 * rng.randint(1, 4), 2 * rng.randint(1, 4))
        seconds, mel_frames = rng.choice([0.5, 1.0, 1.33, 2.0]), rng.choice([8, 20, 37, 100])
        media = [lambda: prompt.image(grid), lambda: prompt.audio(mel_frames),
                 (lambda: prompt.video_with_audio(grid, seconds, mel_frames)) if with_audio_in_video
                 else (lambda: prompt.video(grid, seconds))]
        prompt.text(rng.randint(0, 3))
        rng.choice(media)()
    check(reference, prompt.text(rng.randint(0, 3)))


@pytest.mark.parametrize("build", [
    lambda p: p.image((1, 4, 6)),
    lambda p: p.text(2).video((3, 4, 4), 2.0).text(1).image((1, 2, 2)),
    lambda p: p.video((2, 2, 4), 1.33),
])
def test_talker_subsequence(reference, build):
    # spec 3.2 item 5: the talker reruns get_rope_index over its own ids (user turn, then 9 tts_pad)
    prompt = build(Prompt(ids=[IM_START, USER, NEWLINE])).text(4)
    prompt.ids += [IM_END, NEWLINE] + [TTS_PAD] * 9
    assert_same(prompt.ours(), reference.talker.get_rope_index(*prompt.reference_args()))


def test_spec_examples():
    positions, delta = Prompt().text(3).image((1, 4, 6)).text(1).ours()
    t, h, w = positions[:, 0].tolist()
    assert t[4:10] == [4] * 6 and h[4:10] == [4, 4, 4, 5, 5, 5] and w[4:10] == [4, 5, 6, 4, 5, 6]
    assert positions[:, 0, 10].tolist() == [7] * 3 and positions[:, 0, 11].tolist() == [8] * 3
    assert delta == 9 - 12
    positions, _ = Prompt().text(1).video((3, 4, 4), 2.0).ours()
    assert positions[0, 0, 2:14:4].tolist() == [2, 28, 54]


# --- decoding -------------------------------------------------------------------------------------------------------

class _FilledCache:
    def __init__(self, length: int):
        self.length = length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


@pytest.mark.parametrize("build", [
    lambda p: p.text(5),
    lambda p: p.text(3).image((2, 4, 6)).text(3),
    lambda p: p.text(1).video((3, 4, 4), 1.33).text(3),  # fractional positions and delta
])
def test_decode_positions(reference, build):
    prompt = build(Prompt())
    positions, delta = prompt.ours()
    _, ref_delta = reference.thinker.get_rope_index(*prompt.reference_args())
    model = reference.thinker.model
    model.rope_deltas = ref_delta
    for done in (0, 1, 6):
        cache_len = len(prompt.ids) + done
        ref = model.compute_3d_position_ids(None, None, None, torch.zeros(1, 2, 1), None, cache=_FilledCache(cache_len))
        ours = decode_positions(cache_len, delta, count=2)
        assert torch.equal(ours.to(ref.dtype), ref) and ours.dtype == positions.dtype
    # generate() instead appends last + 1 per step: the same for a prompt ending in text
    assert torch.equal(decode_positions(len(prompt.ids), delta, 3), positions[:, :, -1:] + 1 + torch.arange(3))


# --- bad input ------------------------------------------------------------------------------------------------------

def test_group_count_must_match_grids():
    prompt = Prompt().image((1, 2, 2)).text(1).image((1, 2, 2))
    with pytest.raises(ValueError, match=r"2 image group\(s\) but image_grid_thw has 1 row"):
        rope_positions(torch.tensor(prompt.ids), TOKENS, PER_SECOND, image_grid_thw=torch.tensor([[1, 2, 2]]))
    with pytest.raises(ValueError, match=r"1 video group\(s\) but video_grid_thw has 0 row"):
        rope_positions(torch.tensor(Prompt().video((1, 2, 2), 1.0).ids), TOKENS, PER_SECOND)


@pytest.mark.parametrize("grid, message", [
    ((1, 3, 4), "divisible by spatial_merge_size 2"), ((1, 4, 6), "has 4 placeholders but its grid"),
    ((0, 2, 2), "must be positive"),
])
def test_bad_grid(grid, message):
    ids = torch.tensor(Prompt().image((1, 4, 4)).ids)
    with pytest.raises(ValueError, match=message):
        rope_positions(ids, TOKENS, PER_SECOND, image_grid_thw=torch.tensor([grid]))
    with pytest.raises(ValueError, match=r"integer \[n, 3\]"):
        rope_positions(ids, TOKENS, PER_SECOND, image_grid_thw=torch.tensor([1, 4, 4]))


def test_audio_lengths_must_match_placeholders():
    prompt = Prompt().audio(100).text(2).audio(37)
    with pytest.raises(ValueError, match=r"audio 1 has 5 placeholders but audio_lengths\[1\] = 6"):
        rope_positions(torch.tensor(prompt.ids), TOKENS, PER_SECOND, audio_lengths=[13, 6])
    with pytest.raises(ValueError, match=r"2 audio group\(s\) but audio_lengths has 1"):
        rope_positions(torch.tensor(prompt.ids), TOKENS, PER_SECOND, audio_lengths=torch.tensor([13]))


def test_video_needs_seconds_per_grid():
    prompt = Prompt().video((2, 2, 2), 1.0)
    with pytest.raises(ValueError, match=r"1 video\(s\) but video_second_per_grid has 0"):
        rope_positions(torch.tensor(prompt.ids), TOKENS, PER_SECOND, video_grid_thw=torch.tensor(prompt.videos))
    for bad in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="video_second_per_grid must be finite and > 0"):
            rope_positions(torch.tensor(prompt.ids), TOKENS, PER_SECOND, video_grid_thw=torch.tensor(prompt.videos),
                           video_second_per_grid=[bad])


def test_audio_in_video_flag_must_match_layout():
    with_audio = Prompt().video_with_audio((1, 2, 2), 1.0, 20)
    with pytest.raises(ValueError, match="use_audio_in_video=False but the video group at index 0 is an audio-in"):
        rope_positions(torch.tensor(with_audio.ids), TOKENS, PER_SECOND, video_grid_thw=torch.tensor([[1, 2, 2]]),
                       video_second_per_grid=[1.0])
    silent = Prompt().video((1, 2, 2), 1.0)
    with pytest.raises(ValueError, match="use_audio_in_video=True but the video group at index 0 is not"):
        rope_positions(torch.tensor(silent.ids), TOKENS, PER_SECOND, video_grid_thw=torch.tensor([[1, 2, 2]]),
                       video_second_per_grid=[1.0], use_audio_in_video=True)


@pytest.mark.parametrize("ids, message", [
    ([5, VISION_START, 6, VISION_END], "not followed by an image"),
    ([5, VISION_START, IMAGE, IMAGE, IMAGE, IMAGE], "not closed"),
    ([AUDIO_START, AUDIO, AUDIO], "not closed"),
    ([AUDIO_START, AUDIO_END], "not followed by audio placeholders"),
    ([5, IMAGE, 6], "outside a"),
    ([], "empty"),
])
def test_malformed_prompt(ids, message):
    with pytest.raises(ValueError, match=message):
        rope_positions(torch.tensor(ids, dtype=torch.long), TOKENS, PER_SECOND,
                       image_grid_thw=torch.tensor([[1, 4, 4]]))


def test_input_ids_shape():
    with pytest.raises(ValueError, match=r"\[T\] or \[1, T\]"):
        rope_positions(torch.ones(2, 3, dtype=torch.long), TOKENS, PER_SECOND)
    with pytest.raises(ValueError, match=r"\[T\] or \[1, T\]"):
        rope_positions(torch.ones(3), TOKENS, PER_SECOND)
    positions, delta = rope_positions(torch.ones(1, 3, dtype=torch.long), TOKENS, PER_SECOND)
    assert positions.tolist() == [[[0, 1, 2]]] * 3 and delta == 0
