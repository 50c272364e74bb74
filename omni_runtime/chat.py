"""Chat messages -> the thinker's inputs: what ``Qwen3OmniMoeProcessor`` builds from the chat template's text.

Layout (the chat template): ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then
``<|im_start|>assistant\\n`` with a generation prompt; no default system prompt; a message's parts in the order given,
text parts joined as they are. Placeholders (the processor):

* audio: ``<|audio_start|>`` + ``<|audio_pad|>`` × audio_token_count(frames) + ``<|audio_end|>``;
* image / video: ``<|vision_start|>`` + ``<|image_pad|>`` / ``<|video_pad|>`` × t·h·w / merge² + ``<|vision_end|>``;
* audio in video: ``<|vision_start|><|audio_start|>`` + the video's and its audio's placeholders in one stream +
  ``<|audio_end|><|vision_end|>``. Grid step f of the video sits at time f · second_per_grid ·
  position_id_per_seconds (float64), audio token i at i; a step's placeholders go first while its time is <= i.

Audio: every audio of the conversation (standalone and in-video, in order) goes through one Whisper batch, as in the
processor: waveforms zero-padded to the longest, log-mel over the padded waveform, valid frames = ceil(samples / 160)
capped at the batch's frame count. A shorter audio whose length is not a multiple of 160 samples thus gets one frame
more than alone, and its last frames see the zero padding; both are kept so ids and features equal the reference's.

Text is tokenized in runs between the template's special tokens and the placeholders, which is what the tokenizer
does with the rendered string (added tokens split it first). Special-token strings inside user text become their ids,
as in the reference. Without a tokenizer, prompts are built from ``text_ids`` parts, role names and "\\n" taking their
Qwen ids.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from omni_runtime.config import SpecialTokens
from omni_runtime.models.audio_encoder import audio_token_count
from omni_runtime.preprocess.audio import (HOP_LENGTH, MAX_CHANNELS, MAX_SECONDS, SAMPLE_RATE, log_mel_features,
                                          mono_waveform_16k)
from omni_runtime.preprocess.vision import preprocess_image, preprocess_video

if TYPE_CHECKING:
    from tokenizers import Tokenizer

AUDIO_END, VISION_END = 151670, 151653   # <|audio_end|>, <|vision_end|>
NEWLINE = 198                            # "\n" in the Qwen vocabulary: used only without a tokenizer
ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "text_ids", "audio", "image", "video")
DEFAULT_FPS = 1.0                        # the processor's fps for a video that gives none
POSITION_ID_PER_SECONDS = 13.0           # the processor's default
VIDEO_ONLY_KEYS = ("min_pixels", "max_pixels")   # image bounds; the processor fixes its own for videos


def load_tokenizer(folder: str | Path) -> Tokenizer | None:
    """The checkpoint's ``tokenizer.json``, or None when it has none."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception
        raise ValueError(f"{path}: not a valid tokenizer file ({e})") from e


def prepare_inputs(
    messages: Sequence[dict],
    tokenizer: Tokenizer | None,
    tokens: SpecialTokens,
    *,
    spatial_merge_size: int = 2,
    image_kwargs: dict[str, Any] | None = None,
    use_audio_in_video: bool = False,
    add_generation_prompt: bool = True,
    position_id_per_seconds: float = POSITION_ID_PER_SECONDS,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """messages -> ``OmniModel.generate``'s inputs: ``input_ids`` [1, T] int64 and, with media, ``input_features``
    [n_audio, 128, T_pad] fp32 + ``feature_attention_mask`` [n_audio, T_pad] int32, ``pixel_values`` +
    ``image_grid_thw``, ``pixel_values_videos`` + ``video_grid_thw`` + ``video_second_per_grid``, and
    ``use_audio_in_video``.

    A message is ``{"role": "system" | "user" | "assistant", "content": str | [part, ...]}``; parts are ``text``
    (``"text"``), ``text_ids`` (``"ids"``), ``audio`` (``"audio"``: a path, or an array with ``"sample_rate"``),
    ``image`` (``"image"``: a path, an [H, W, 3] array or a PIL image) and ``video`` (``"video"``: [T, H, W, 3] frames
    or a list of frames, sampled at ``"fps"``, default 1; with ``use_audio_in_video`` also ``"audio"`` +
    ``"sample_rate"``, its soundtrack). ``image_kwargs``: :func:`preprocess_image` settings (``preprocessor_kwargs``);
    their patch, merge and normalisation settings apply to videos too."""
    reader = _MediaReader(dict(image_kwargs or {}), spatial_merge_size, use_audio_in_video)
    pieces = _render(messages, tokens, reader, has_tokenizer=tokenizer is not None)
    if add_generation_prompt:
        pieces += [[tokens.im_start], _Template("assistant\n")]
    audio = _audio_batch(reader.waveforms)
    layout = _Layout(tokens, audio.token_counts, reader, spatial_merge_size, position_id_per_seconds)
    ids = _encode(pieces, tokenizer, tokens, layout)
    return _outputs(ids, audio, reader, device)


# ---- messages -> pieces --------------------------------------------------------------------------------------------
# A piece is template text (_Template), user text (str), ids (list[int]) or a media placeholder (_Media).

@dataclass(frozen=True, slots=True)
class _Template:
    """Chat-template text: tokenized together with the text around it, or fixed Qwen ids without a tokenizer."""
    text: str


@dataclass(frozen=True, slots=True)
class _Media:
    kind: str   # "audio", "image" or "video"
    index: int  # among the conversation's media of its kind


def _render(messages: Sequence[dict], tokens: SpecialTokens, reader: _MediaReader, has_tokenizer: bool) -> list:
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    pieces = []
    for m, message in enumerate(messages):
        role, parts = _role_and_parts(message, m)
        pieces += [[tokens.im_start], _Template(f"{role}\n")]
        for p, part in enumerate(parts):
            pieces += _part(part, f"message {m} part {p}", reader, has_tokenizer)
        pieces += [[tokens.im_end], _Template("\n")]
    return pieces


def _role_and_parts(message: Any, m: int) -> tuple[str, list]:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ValueError(f"message {m} must be a dict with 'role' and 'content', got {message!r:.80}")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise ValueError(f"message {m}: unknown role {role!r}; roles are {', '.join(ROLES)}")
    if isinstance(content, str):
        return role, [{"type": "text", "text": content}]
    if not isinstance(content, (list, tuple)):
        raise ValueError(f"message {m}: content must be a string or a list of parts, got {type(content).__name__}")
    return role, list(content)


def _part(part: Any, where: str, reader: _MediaReader, has_tokenizer: bool) -> list:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in PART_TYPES:
        raise ValueError(f"{where}: unknown part type {kind!r}; parts are dicts with 'type' in {', '.join(PART_TYPES)}")
    if kind == "text":
        return [_text(part, where, has_tokenizer)]
    if kind == "text_ids":
        return [_ids(part.get("ids"), where)]
    try:
        return [getattr(reader, kind)(part)]
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"{where} ({kind}): {e}") from e


def _text(part: dict, where: str, has_tokenizer: bool) -> str:
    text = part.get("text")
    if not isinstance(text, str):
        raise ValueError(f"{where}: a text part needs 'text' (a string), got {type(text).__name__}")
    if not has_tokenizer:
        raise ValueError(f"{where}: text needs a tokenizer and the checkpoint has no tokenizer.json; "
                         "give token ids as {'type': 'text_ids', 'ids': [...]} instead")
    return text


def _ids(ids: Any, where: str) -> list[int]:
    values = ids.tolist() if isinstance(ids, (torch.Tensor, np.ndarray)) else ids
    if not isinstance(values, (list, tuple)) or not all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in values):
        raise ValueError(f"{where}: a text_ids part needs 'ids', a 1-D list of non-negative ints, got {ids!r:.80}")
    return [int(i) for i in values]


# ---- media ---------------------------------------------------------------------------------------------------------

@dataclass
class _Video:
    pixels: torch.Tensor     # [N_patch, P]
    grid: torch.Tensor       # [1, 3]
    second_per_grid: float
    audio: int | None        # index of its soundtrack among the waveforms


@dataclass
class _MediaReader:
    """Loads and preprocesses a conversation's media in order; the methods are named after the part types."""
    image_kwargs: dict[str, Any]
    merge: int
    use_audio_in_video: bool
    waveforms: list[torch.Tensor] = field(default_factory=list)        # mono fp32 [S] at 16 kHz
    images: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    videos: list[_Video] = field(default_factory=list)

    def __post_init__(self):
        merge = self.image_kwargs.setdefault("merge_size", self.merge)
        if merge != self.merge:
            raise ValueError(f"image_kwargs merge_size={merge} disagrees with spatial_merge_size={self.merge}")

    def audio(self, part: dict) -> _Media:
        self.waveforms.append(_waveform(_required(part, "audio"), part.get("sample_rate")))
        return _Media("audio", len(self.waveforms) - 1)

    def image(self, part: dict) -> _Media:
        self.images.append(preprocess_image(_required(part, "image"), **self.image_kwargs))
        return _Media("image", len(self.images) - 1)

    def video(self, part: dict) -> _Media:
        settings = {k: v for k, v in self.image_kwargs.items() if k not in VIDEO_ONLY_KEYS}
        pixels, grid, seconds = preprocess_video(_frames(_required(part, "video")), part.get("fps", DEFAULT_FPS),
                                                 **settings)
        self.videos.append(_Video(pixels, grid, seconds, self._soundtrack(part)))
        return _Media("video", len(self.videos) - 1)

    def _soundtrack(self, part: dict) -> int | None:
        has_audio = part.get("audio") is not None
        if has_audio != self.use_audio_in_video:
            raise ValueError("use_audio_in_video=True needs the video's soundtrack as 'audio' + 'sample_rate'"
                             if self.use_audio_in_video else
                             "the video carries 'audio' but use_audio_in_video=False; pass use_audio_in_video=True "
                             "to interleave it, or drop it")
        return self.audio(part).index if has_audio else None


def _required(part: dict, key: str) -> Any:
    if part.get(key) is None:
        raise ValueError(f"the part has no {key!r}")
    return part[key]


def _frames(video: Any) -> Any:
    if isinstance(video, (str, Path)):
        raise ValueError("video files are not decoded here: pass the frames, an [T, H, W, 3] array sampled at 'fps'")
    if isinstance(video, (list, tuple)):
        if not video:
            raise ValueError("video has no frames")
        return np.stack([np.asarray(frame.cpu() if torch.is_tensor(frame) else frame) for frame in video])
    return video


def _waveform(source: Any, sample_rate: int | None) -> torch.Tensor:
    """An audio part -> mono fp32 [S] at 16 kHz, checked as ``log_mel_features`` checks it."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        source, file_rate = _read_audio_file(path)
        if sample_rate is not None and sample_rate != file_rate:
            raise ValueError(f"audio file {path} is at {file_rate} Hz, not the 'sample_rate' {sample_rate} given "
                             "beside it (a file's header says its rate: leave 'sample_rate' out)")
        sample_rate = file_rate
        try:
            return mono_waveform_16k(source, sample_rate).cpu()
        except ValueError as e:
            raise ValueError(f"audio file {path}: {e}") from e
    if sample_rate is None:
        raise ValueError("audio given as samples needs 'sample_rate' (Hz) beside it")
    return mono_waveform_16k(source, sample_rate).cpu()   # features on the CPU, as the reference computes them


def _read_audio_file(path: Path) -> tuple[np.ndarray, int]:
    """-> (samples [S] or [channels, S] fp32, sample rate). Length and channels are checked from the header first,
    so that an over-long file is refused before it is read into memory."""
    if path.is_dir():
        raise ValueError(f"audio path {path} is a directory, not an audio file")
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} does not exist")
    import soundfile

    try:
        info = soundfile.info(str(path))
    except (RuntimeError, TypeError, ValueError) as e:  # LibsndfileError is a RuntimeError
        raise ValueError(f"cannot decode audio file {path}: {e}") from e
    if info.samplerate > 0 and info.frames > MAX_SECONDS * info.samplerate:
        raise ValueError(f"audio file {path}: audio too long: {info.frames / info.samplerate:.1f} s, the supported "
                         f"maximum is {MAX_SECONDS // 60} minutes")
    if info.channels > MAX_CHANNELS:
        raise ValueError(f"audio file {path} has {info.channels} channels, at most {MAX_CHANNELS} are supported")
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # [S, channels]
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"cannot decode audio file {path}: {e}") from e
    return (data[:, 0] if data.shape[1] == 1 else np.ascontiguousarray(data.T)), int(rate)


@dataclass
class _AudioBatch:
    features: torch.Tensor | None   # [n, 128, T_pad] fp32
    mask: torch.Tensor | None       # [n, T_pad] int32, 1 on valid frames
    token_counts: list[int]


def _audio_batch(waveforms: list[torch.Tensor]) -> _AudioBatch:
    """The processor's Whisper batch: zero-pad to the longest, features over the padded waveform."""
    if not waveforms:
        return _AudioBatch(None, None, [])
    longest = max(w.numel() for w in waveforms)
    frames = longest // HOP_LENGTH
    features = torch.stack([log_mel_features(F.pad(w, (0, longest - w.numel())), SAMPLE_RATE)[0] for w in waveforms])
    valid = [min(-(-w.numel() // HOP_LENGTH), frames) for w in waveforms]   # the sample mask taken every hop
    mask = (torch.arange(frames)[None] < torch.tensor(valid)[:, None]).to(torch.int32)
    return _AudioBatch(features, mask, [audio_token_count(n) for n in valid])


# ---- pieces -> ids -------------------------------------------------------------------------------------------------

@dataclass
class _Layout:
    """Expands a media piece into its placeholder ids."""
    tokens: SpecialTokens
    audio_counts: list[int]
    reader: _MediaReader
    merge: int
    per_second: float

    def __call__(self, media: _Media) -> list[int]:
        t = self.tokens
        if media.kind == "audio":
            return [t.audio_start] + [t.audio] * self.audio_counts[media.index] + [AUDIO_END]
        if media.kind == "image":
            return [t.vision_start] + [t.image] * self._visual(self.reader.images[media.index][1]) + [VISION_END]
        video = self.reader.videos[media.index]
        if video.audio is None:
            return [t.vision_start] + [t.video] * self._visual(video.grid) + [VISION_END]
        return [t.vision_start, t.audio_start, *self._audio_in_video(video), AUDIO_END, VISION_END]

    def _visual(self, grid: torch.Tensor) -> int:
        return int(grid.prod()) // self.merge ** 2

    def _audio_in_video(self, video: _Video) -> list[int]:
        """Video grid steps at their time, audio tokens at their index, one stream; video first on ties."""
        steps, rows, cols = (int(v) for v in video.grid.reshape(-1))
        per_step, n_audio = (rows // self.merge) * (cols // self.merge), self.audio_counts[video.audio]
        ids, emitted = [], 0
        for f in range(steps):
            time = f * video.second_per_grid * self.per_second        # float64, the processor's order
            upto = min(n_audio, max(emitted, math.ceil(time)))      # audio i precedes the step while i < time
            ids += [self.tokens.audio] * (upto - emitted) + [self.tokens.video] * per_step
            emitted = upto
        return ids + [self.tokens.audio] * (n_audio - emitted)


def _encode(pieces: list, tokenizer: Tokenizer | None, tokens: SpecialTokens, layout: _Layout) -> list[int]:
    ids, text = [], ""
    for piece in pieces:
        if isinstance(piece, (str, _Template)) and tokenizer is not None:
            text += piece if isinstance(piece, str) else piece.text
            continue
        ids += _tokenize(tokenizer, text)
        text = ""
        if isinstance(piece, _Template):
            ids += _template_ids(piece.text, tokens)
        elif isinstance(piece, _Media):
            ids += layout(piece)
        else:
            ids += piece
    return ids + _tokenize(tokenizer, text)


def _tokenize(tokenizer: Tokenizer | None, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids if text else []


def _template_ids(text: str, tokens: SpecialTokens) -> list[int]:
    """Template text without a tokenizer: "\\n" or a role name + "\\n" (Qwen: "user\\n" -> [872, 198])."""
    role = text[:-1]
    return [getattr(tokens, role), NEWLINE] if role else [NEWLINE]


def _outputs(ids: list[int], audio: _AudioBatch, reader: _MediaReader, device: str | torch.device) -> dict:
    out: dict[str, Any] = {"input_ids": torch.tensor([ids], dtype=torch.int64)}
    if audio.features is not None:
        out |= {"input_features": audio.features, "feature_attention_mask": audio.mask}
    if reader.images:
        out |= {"pixel_values": torch.cat([p for p, _ in reader.images]),
                "image_grid_thw": torch.cat([g for _, g in reader.images])}
    if reader.videos:
        out |= {"pixel_values_videos": torch.cat([v.pixels for v in reader.videos]),
                "video_grid_thw": torch.cat([v.grid for v in reader.videos]),
                "video_second_per_grid": torch.tensor([v.second_per_grid for v in reader.videos])}
    if len(out) > 1:
        out["use_audio_in_video"] = reader.use_audio_in_video and bool(reader.videos)
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in out.items()}
