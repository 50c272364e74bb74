"""TM-RoPE position ids of a prompt: the t/h/w rows the thinker (and the talker) rotate by (spec 3.1, 3.2 item 5).

The prompt is a left-to-right sequence of segments; each starts at ``p``, one past where the previous one ended:

* text: token i at ``p + i`` on all three rows;
* audio ``<audio_start> a×N <audio_end>``: like text;
* image / video ``<vision_start> v×(t·h·w/m²) <vision_end>``: the start token takes ``p``; merged patch (f, r, c) of
  the ``t × h/m × w/m`` grid sits at ``(p+1 + f·Δ, p+1 + r, p+1 + c)`` with ``Δ = position_id_per_seconds`` times
  the seconds per grid (1 for images); the end token goes one past the block's largest position;
* audio in video ``<vision_start><audio_start> … <audio_end><vision_end>``: the two start tokens take ``p, p+1``;
  video patches (as above) and audio tokens (at ``p+2 + i``) share one stream ordered by time, video first on ties;
  the two end tokens follow one past the largest position of the stream's last single-kind run.

The arithmetic is the reference's float32 arithmetic, in its order, so the values are identical to
``get_rope_index``'s. They are whole numbers, returned as int64, unless some ``Δ`` is fractional (e.g. second per
grid 0.5 or 1.33 at 13 positions per second); then they are the reference's float32 values (spec pitfall 14).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from omni_runtime.config import SpecialTokens

TEXT, AUDIO, IMAGE, VIDEO, AUDIO_IN_VIDEO = "text", "audio", "image", "video", "audio in video"


@dataclass(frozen=True, slots=True)
class Segment:
    kind: str
    begin: int  # index of its first token in the prompt
    end: int  # one past its last token
    n_visual: int = 0  # image or video placeholders
    n_audio: int = 0  # audio placeholders

    @property
    def n_edge(self) -> int:
        """Tokens that open the group (as many close it)."""
        return {TEXT: 0, AUDIO_IN_VIDEO: 2}.get(self.kind, 1)


def rope_positions(
    input_ids: torch.Tensor,
    tokens: SpecialTokens,
    position_id_per_seconds: float,
    spatial_merge_size: int = 2,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    video_second_per_grid: torch.Tensor | Sequence[float] | None = None,
    use_audio_in_video: bool = False,
    audio_lengths: torch.Tensor | Sequence[int] | None = None,
) -> tuple[torch.Tensor, int | float]:
    """input_ids: [T] or [1, T] -> (positions [3, 1, T] t/h/w, rope_delta = max position + 1 - T).

    image_grid_thw / video_grid_thw: [n, 3] patch grids (before merging), one per image / video group in prompt
    order, audio-in-video groups counting as videos. video_second_per_grid: [n_videos] seconds one temporal grid step
    spans. audio_lengths: optional [n_audios] audio TOKEN counts (the encoder's output lengths), checked against the
    placeholders; the reference's ``audio_seqlens`` are mel-frame counts it converts with
    ``_get_feat_extract_output_lengths``. use_audio_in_video must say whether the prompt's videos carry interleaved
    audio: the reference miscounts groups when it is wrong, so a mismatch is refused.
    Decode step positions are ``decode_positions(cache_len, rope_delta)``.
    """
    ids = _prompt_ids(input_ids)
    segments = prompt_segments(ids, tokens)
    images = _grids("image", image_grid_thw, [s for s in segments if s.kind == IMAGE], spatial_merge_size)
    video_segments = [s for s in segments if s.kind in (VIDEO, AUDIO_IN_VIDEO)]
    videos = _grids("video", video_grid_thw, video_segments, spatial_merge_size)
    seconds = _seconds_per_grid(video_second_per_grid, len(videos))
    _check_audio(segments, audio_lengths)
    _check_audio_in_video_flag(video_segments, use_audio_in_video)
    positions = _walk(segments, iter(images), iter(zip(videos, seconds)), position_id_per_seconds, spatial_merge_size)
    rope_delta = positions.max() + 1 - len(ids)
    if torch.equal(positions, positions.round()):
        return positions.long().view(3, 1, -1).to(input_ids.device), int(rope_delta)
    return positions.view(3, 1, -1).to(input_ids.device), float(rope_delta)


def decode_positions(cache_len: int, rope_delta: int | float, count: int = 1,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """[3, 1, count] positions of the next ``count`` tokens after ``cache_len`` cached ones: cache_len + i + delta."""
    steps = torch.arange(cache_len, cache_len + count, device=device)
    delta = rope_delta if isinstance(rope_delta, int) else torch.tensor(rope_delta, dtype=torch.float32, device=device)
    return (steps + delta).view(1, 1, -1).repeat(3, 1, 1)


# --- reading the prompt ---------------------------------------------------------------------------------------------

def prompt_segments(ids: list[int], tokens: SpecialTokens) -> list[Segment]:
    """Split a prompt into text runs and media groups, left to right."""
    segments, i = [], 0
    while i < len(ids):
        segments.append(_segment_at(ids, i, tokens))
        i = segments[-1].end
    return segments


def _segment_at(ids: list[int], i: int, tokens: SpecialTokens) -> Segment:
    if ids[i] == tokens.vision_start:
        return _closed(_vision_group(ids, i, tokens), ids, tokens)
    if ids[i] == tokens.audio_start:
        return _closed(_audio_group(ids, i, tokens), ids, tokens)
    if ids[i] in _markers(tokens):
        raise ValueError(f"placeholder token {ids[i]} at index {i} is outside a <|vision_start|>/<|audio_start|> group")
    end = i
    while end < len(ids) and ids[end] not in _markers(tokens):
        end += 1
    return Segment(TEXT, i, end)


def _audio_group(ids: list[int], i: int, tokens: SpecialTokens) -> Segment:
    body_end = _run_end(ids, i + 1, {tokens.audio})
    if body_end == i + 1:
        raise ValueError(f"the <|audio_start|> at index {i} is not followed by audio placeholders ({tokens.audio})")
    return Segment(AUDIO, i, body_end + 1, n_audio=body_end - i - 1)


def _vision_group(ids: list[int], i: int, tokens: SpecialTokens) -> Segment:
    kinds = {tokens.image: IMAGE, tokens.video: VIDEO, tokens.audio_start: AUDIO_IN_VIDEO}
    kind = kinds.get(ids[i + 1]) if i + 1 < len(ids) else None
    if kind is None:
        raise ValueError(f"the <|vision_start|> at index {i} is not followed by an image ({tokens.image}), "
                         f"video ({tokens.video}) or <|audio_start|> ({tokens.audio_start}) token")
    if kind != AUDIO_IN_VIDEO:
        body_end = _run_end(ids, i + 1, {ids[i + 1]})
        return Segment(kind, i, body_end + 1, n_visual=body_end - i - 1)
    body = ids[i + 2:_run_end(ids, i + 2, {tokens.video, tokens.audio})]
    return Segment(kind, i, i + 2 + len(body) + 2, body.count(tokens.video), body.count(tokens.audio))


def _closed(segment: Segment, ids: list[int], tokens: SpecialTokens) -> Segment:
    closing = ids[segment.end - segment.n_edge:segment.end]
    if segment.end > len(ids) or any(t in _markers(tokens) for t in closing):
        raise ValueError(f"the {segment.kind} group opened at index {segment.begin} is not closed by "
                         f"{segment.n_edge} end token(s)")
    return segment


def _run_end(ids: list[int], i: int, members: set[int]) -> int:
    while i < len(ids) and ids[i] in members:
        i += 1
    return i


def _markers(tokens: SpecialTokens) -> set[int]:
    return {tokens.vision_start, tokens.audio_start, tokens.image, tokens.video, tokens.audio}


# --- checking the media against the prompt --------------------------------------------------------------------------

def _prompt_ids(input_ids: torch.Tensor) -> list[int]:
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids of shape [T] or [1, T], got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError("input_ids is empty")
    return input_ids.tolist()


def _grids(kind: str, grid_thw: torch.Tensor | None, segments: list[Segment], merge: int) -> list[tuple[int, ...]]:
    """Check the [n, 3] grids against the prompt's groups of this kind; return them as (t, h, w) tuples."""
    rows = _grid_rows(kind, grid_thw)
    if len(rows) != len(segments):
        raise ValueError(f"the prompt has {len(segments)} {kind} group(s) but {kind}_grid_thw has {len(rows)} row(s)")
    for n, ((t, h, w), segment) in enumerate(zip(rows, segments)):
        if min(t, h, w) < 1 or h % merge or w % merge:
            raise ValueError(f"{kind}_grid_thw[{n}] = {(t, h, w)}: t, h, w must be positive and h, w divisible by "
                             f"spatial_merge_size {merge}")
        if segment.n_visual != t * h * w // merge**2:
            raise ValueError(f"{kind} {n} has {segment.n_visual} placeholders but its grid {(t, h, w)} makes "
                             f"t*h*w/{merge}^2 = {t * h * w // merge**2}")
    return rows


def _grid_rows(kind: str, grid_thw: torch.Tensor | None) -> list[tuple[int, ...]]:
    if grid_thw is None:
        return []
    grids = torch.as_tensor(grid_thw)
    if grids.dim() != 2 or grids.shape[1] != 3 or grids.dtype.is_floating_point:
        raise ValueError(f"{kind}_grid_thw must be an integer [n, 3] tensor, got {grids.dtype} {tuple(grids.shape)}")
    return [tuple(row) for row in grids.tolist()]


def _seconds_per_grid(seconds: torch.Tensor | Sequence[float] | None, n_videos: int) -> torch.Tensor:
    values = torch.as_tensor([] if seconds is None else seconds, dtype=torch.float32).reshape(-1).cpu()
    if n_videos and len(values) != n_videos:
        raise ValueError(f"the prompt has {n_videos} video(s) but video_second_per_grid has {len(values)} value(s)")
    if not (torch.isfinite(values) & (values > 0)).all():
        raise ValueError(f"video_second_per_grid must be finite and > 0, got {values.tolist()}")
    return values


def _check_audio(segments: list[Segment], audio_lengths: torch.Tensor | Sequence[int] | None) -> None:
    if audio_lengths is None:
        return
    counts = [s.n_audio for s in segments if s.kind in (AUDIO, AUDIO_IN_VIDEO)]
    lengths = torch.as_tensor(audio_lengths).reshape(-1).tolist()
    if len(lengths) != len(counts):
        raise ValueError(f"the prompt has {len(counts)} audio group(s) but audio_lengths has {len(lengths)} value(s)")
    for n, (count, length) in enumerate(zip(counts, lengths)):
        if count != length:
            raise ValueError(f"audio {n} has {count} placeholders but audio_lengths[{n}] = {length}")


def _check_audio_in_video_flag(videos: list[Segment], use_audio_in_video: bool) -> None:
    # The reference counts a prompt's groups by this flag: with it on, plain videos are not counted; with it off,
    # audio-in-video groups are found only while an image or a plain video remains. Either way positions go wrong.
    wrong = [s for s in videos if (s.kind == AUDIO_IN_VIDEO) != use_audio_in_video]
    if wrong:
        raise ValueError(f"use_audio_in_video={use_audio_in_video} but the video group at index {wrong[0].begin} "
                         f"is {'not ' if use_audio_in_video else ''}an audio-in-video group "
                         f"(<|vision_start|><|audio_start|>)")


# --- the walk -------------------------------------------------------------------------------------------------------

def _walk(segments: list[Segment], images, videos, per_second: float, merge: int) -> torch.Tensor:
    """-> [3, T] float32 positions, built the way the reference builds them."""
    chunks, start = [], torch.tensor(0.0)
    for segment in segments:
        if segment.kind == TEXT:
            chunks.append(_line(start, segment.end - segment.begin))
            start = start + (segment.end - segment.begin)
            continue
        chunks.append(_line(start, segment.n_edge))
        start = start + segment.n_edge
        body, last_max = _body(segment, start, images, videos, per_second, merge)
        closing = _line(last_max + 1, segment.n_edge)
        chunks += [body, closing]
        start = closing.max() + 1
    return torch.cat(chunks, dim=1)


def _body(segment: Segment, start: torch.Tensor, images, videos, per_second: float, merge: int):
    """-> (body positions [3, n], the largest position the closing tokens count from)."""
    if segment.kind == AUDIO:
        body = _line(start, segment.n_audio)
    elif segment.kind == IMAGE:
        body = _grid_block(start, next(images), 1, per_second, merge)
    else:
        grid, seconds = next(videos)
        body = _grid_block(start, grid, seconds, per_second, merge)
        if segment.kind == AUDIO_IN_VIDEO:
            return _interleave(body, _line(start, segment.n_audio))
    return body, body.max()


def _line(start: torch.Tensor, n: int) -> torch.Tensor:
    """n tokens at start + i on all three rows: [3, n]."""
    return (torch.arange(n) + start).expand(3, -1)


def _grid_block(start: torch.Tensor, grid: tuple[int, ...], seconds: float | torch.Tensor, per_second: float,
                merge: int) -> torch.Tensor:
    """Merged patches of a t × h × w grid, frame-major: [3, t·(h/m)·(w/m)] at (start + f·Δ, start + r, start + c)."""
    frames, rows, cols = grid[0], grid[1] // merge, grid[2] // merge
    times = torch.arange(frames) * seconds * per_second  # float32: the reference's rounding of f·Δ
    t = times.repeat_interleave(rows * cols)
    h = torch.arange(rows).repeat_interleave(cols).repeat(frames)
    w = torch.arange(cols).repeat(frames * rows)
    return torch.stack([t, h.float(), w.float()]) + start


def _interleave(video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Video [3, V] and audio [3, A] as one stream sorted by time (row t), video first on ties."""
    order = torch.argsort(torch.cat([video[0], audio[0]]), stable=True)  # stable: each stream keeps its order
    merged = torch.cat([video, audio], dim=1)[:, order]
    is_video = order < video.shape[1]
    # The reference restarts after the largest position of the last run of one kind (what is left once the other
    # stream ran out), not after the block's largest position.
    switches = torch.nonzero(is_video != is_video[-1])
    last_run = merged[:, int(switches[-1]) + 1:] if len(switches) else merged
    return merged, last_run.max()
