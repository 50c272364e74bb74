"""The streaming pipeline: thinker -> talker -> code predictor -> Code2Wav, interleaved in one process.

The thinker runs one token ahead of the talker: talker step k needs only the thinker token that conditions it
(see engine/talker_prompt.py), so speech starts after the thinker's first token and the talker never waits for the
whole answer. Frames go to a stateful Code2Wav stream as they are finished, in packets that ramp from
``first_chunk_frames`` up to ``chunk_frames`` (``PacketSchedule``); samples are yielded as soon as they are final,
with no re-decoding and no seams.
"""
from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from omni_runtime.engine.talker_prompt import (ASSISTANT_TEXT_ROWS, TextConditioner, assistant_start,
                                               talker_prefill_embeds)
from omni_runtime.multimodal import MediaInputs, PromptInputs, talker_positions
from omni_runtime.profiling import stage_range
from omni_runtime.sampling import Sampler


SAMPLE_RATE = 24000   # of the audio Code2Wav makes

# StageTimer stages of the talker side: its prefill, the first frame's predictor, then whole frames (talker step,
# codebook-0 draw, predictor).
TALKER_STAGES = ("talker prefill", "code predictor", "talker frame")


@dataclass
class StreamEvent:
    text_ids: list[int] = field(default_factory=list)   # new thinker tokens
    text: str | None = None                              # their decoded text, when a tokenizer exists
    audio: torch.Tensor | None = None                    # new float32 samples at 24 kHz
    codes: torch.Tensor | None = None                    # the frames [16, n] those samples came from
    finish_reason: str | None = None                     # on the thinker's last token's event: "eos" or "length"


class StageTimer:
    """Wall time and call count per pipeline stage, each stage an NVTX range too (``profiling.py``). Given a GPU
    device it synchronises around each stage, so that is for measurement runs only; without one it only reads
    the clock."""

    def __init__(self, device: torch.device | None = None):
        self.sync = device is not None and device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def __call__(self, stage: str):
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with stage_range(stage):
            yield
            if self.sync:
                torch.cuda.synchronize()
        self.seconds[stage] += time.perf_counter() - start
        self.calls[stage] += 1


class IncrementalText:
    """Turns a growing token sequence into text pieces that concatenate to the decode of the whole sequence: a
    byte-level BPE token can end inside a UTF-8 character, so text is emitted only once it decodes completely; the
    last push (``final``) emits whatever is left, an incomplete character's replacement included.

    Each push decodes a window, not the whole sequence (as vLLM's detokenizer does): the tokens from ``prefix`` on,
    diffed against those from ``prefix`` to ``read`` (emitted already). The window starts one piece back because a
    decoder may treat a decode's first token apart (drop its leading space)."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.ids = decode, []
        self.prefix = self.read = 0

    def push(self, ids: list[int], final: bool = False) -> str:
        self.ids += ids
        emitted = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if len(text) <= len(emitted) or (text.endswith("\ufffd") and not final):
            return ""   # nothing new, or an incomplete character: wait for the token that completes it
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(emitted):]


class ThinkerStream:
    """Prefills the thinker on construction; each ``step()`` samples one token and advances the cache. A row of a
    batched thinker comes prefilled and without a runner: ``step_thinker_rows`` steps all rows at once."""

    def __init__(self, runner, sampler: Sampler, ids: torch.Tensor, prompt: PromptInputs, eos: set[int],
                 max_new_tokens: int, capture_layer: int | None = None, timer: StageTimer | None = None,
                 prefilled: tuple[torch.Tensor, torch.Tensor | None] | None = None):
        """``prefilled``: what ``runner.prefill`` returned for this prompt already (a batch prefilled together)."""
        self.runner, self.sampler, self.eos, self.max_new_tokens = runner, sampler, eos, max_new_tokens
        self.timer = timer or StageTimer()
        if prefilled is None:
            with self.timer("thinker prefill"):
                prefilled = runner.prefill(prompt, capture_layer)
        self.logits, self.prompt_hidden = prefilled
        # Prompt and answer so far, for the repetition penalty: one buffer, filled as tokens come.
        self.ids = torch.empty(1, ids.numel() + max_new_tokens, dtype=torch.int64, device=ids.device)
        self.ids[0, :ids.numel()] = ids
        self.length = ids.numel()
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """The next token [1]; its ``is_last`` is ``self.finished`` right after."""
        token = self.draw()
        self.record(token, int(token))
        if not self.finished:
            with self.timer("thinker decode"):
                self.logits = self.runner.decode(token.view(1, 1))
        return token

    def draw(self) -> torch.Tensor:
        """The next token [1] from the current logits, on the device (a batch reads all of its rows' at once)."""
        return self.sampler(self.logits, self.ids[:, :self.length])

    def record(self, token: torch.Tensor, value: int) -> None:
        """Takes the drawn ``token`` (``value`` its id): the answer, the finish reason, the penalty's history."""
        self.tokens.append(value)
        if value in self.eos:
            self.finish_reason = "eos"
        elif len(self.tokens) == self.max_new_tokens:
            self.finish_reason = "length"
        else:
            self.ids[0, self.length] = token[0]
            self.length += 1


ThinkerStart = tuple[torch.Tensor, PromptInputs, Sampler, set[int], int]   # ids, prompt, sampler, EOS, max_new_tokens


def start_thinker_rows(runner, starts: list[ThinkerStart], capture_layer: int | None = None,
                       timer: StageTimer | None = None,
                       whole_tokens: int | None = None,
                       forward_tokens: int | None = None) -> list[tuple[int, ThinkerStream | ChunkedPrefill]]:
    """New sequences of a batched thinker: each takes a free row -> [(row, its stream)]. Prompts of up to
    ``whole_tokens`` (default: the runner's ``prefill_tokens``) tokens prefill together now; a longer one gets a
    ``ChunkedPrefill`` instead, which the caller advances a chunk per tick and which gives the stream at its end. On
    an error every row taken is given back. ``forward_tokens``: padded tokens per prefill forward (default: the
    runner's ``prefill_tokens``)."""
    timer = timer or StageTimer()
    limit = runner.prefill_tokens if whole_tokens is None else whole_tokens
    whole = [i for i, start in enumerate(starts) if start[1].positions.shape[-1] <= limit]
    rows = []   # filled one by one: a row taken before an error is given back too
    try:
        for _ in starts:
            rows.append(runner.acquire())
        with timer("thinker prefill"):
            prefilled = runner.prefill_many([rows[i] for i in whole], [starts[i][1] for i in whole], capture_layer,
                                            forward_tokens)
    except BaseException:
        for row in rows:
            runner.release(row)
        raise
    done = dict(zip(whole, prefilled))
    return [(row, ThinkerStream(None, *_stream_args(start), capture_layer, timer, done[i]) if i in done else
             ChunkedPrefill(runner, row, start, capture_layer, timer))
            for i, (row, start) in enumerate(zip(rows, starts))]


def _stream_args(start: ThinkerStart) -> tuple:
    ids, prompt, sampler, eos, max_new = start
    return sampler, ids, prompt, eos, max_new


class ChunkedPrefill:
    """A prompt longer than a tick may prefill (the batched runner's ``prefill_tokens``, or the speech engine's paced
    budget), prefilled in its row a chunk at a time: the rows already decoding wait for one chunk per tick, never
    for the whole prompt (a long audio or video prompt would stall every live answer's speech). ``advance(tokens)``
    prefills the next ``tokens`` at most; the last chunk returns the sequence's ``ThinkerStream``. Chunks attend to
    the keys the row holds, so the stream is the one a whole prefill gives, up to the rounding of GEMMs over fewer
    rows."""

    def __init__(self, runner, row: int, start: ThinkerStart, capture_layer: int | None, timer: StageTimer):
        self.runner, self.row, self.start, self.capture_layer, self.timer = runner, row, start, capture_layer, timer
        self.done = 0
        self.captured: list[torch.Tensor] = []   # the hidden state number capture_layer of each chunk
        self.chunk_starts: list[int] = []        # the first prompt token of each chunk

    @property
    def remaining(self) -> int:
        return self.start[1].positions.shape[-1] - self.done

    def advance(self, tokens: int) -> ThinkerStream | None:
        end = self.done + min(tokens, self.remaining)
        with self.timer("thinker prefill"):
            logits, captured = self.runner.prefill_part(self.row, self.start[1], self.done, end, self.capture_layer)
        if captured is not None:
            self.captured.append(captured)
            self.chunk_starts.append(self.done)
        self.done = end
        if self.remaining:
            return None
        hidden = torch.cat(self.captured, dim=1) if self.captured else None
        return ThinkerStream(None, *_stream_args(self.start), self.capture_layer, self.timer, (logits, hidden))

    def captured_between(self, start: int, end: int) -> torch.Tensor | None:
        """The hidden state number ``capture_layer`` of prompt tokens ``start:end``, all prefilled -> [1, end - start,
        H]; None when the thinker captures none (no layer of that number)."""
        if not self.captured:
            return None
        parts = [chunk[:, max(start - first, 0):end - first] for first, chunk in zip(self.chunk_starts, self.captured)
                 if first < end and first + chunk.shape[1] > start]
        return torch.cat(parts, dim=1)


def advance_prefills(prefills: list[ChunkedPrefill], budget: int) -> list[tuple[ChunkedPrefill, ThinkerStream]]:
    """One tick of chunked prefills, oldest first, ``budget`` prompt tokens in all -> those that finished, with
    their streams."""
    finished = []
    for prefill in prefills:
        if budget <= 0:
            break
        tokens = min(budget, prefill.remaining)
        budget -= tokens
        stream = prefill.advance(tokens)
        if stream is not None:
            finished.append((prefill, stream))
    return finished


def step_thinker_rows(runner, streams: dict[int, ThinkerStream]) -> list[tuple[int, torch.Tensor, int]]:
    """One step of every stream of a batched thinker (``streams``: row -> its unfinished stream): draws each row's
    next token (one host read for all), records it, decodes the rows still going -> [(row, token [1], its id)]."""
    rows = sorted(streams)
    tokens = torch.cat([streams[row].draw() for row in rows])                                  # [n]
    values = tokens.tolist()
    for row, token, value in zip(rows, tokens, values):
        streams[row].record(token.view(1), value)
    going = [i for i, row in enumerate(rows) if not streams[row].finished]
    if going:
        with streams[rows[0]].timer("thinker decode"):
            logits = runner.decode([rows[i] for i in going], tokens[going])
        for i, logit in zip(going, logits):
            streams[rows[i]].logits = logit.view(1, -1)
    return [(row, tokens[i:i + 1], values[i]) for i, row in enumerate(rows)]


@dataclass
class SpeechOptions:
    speaker_id: int
    talker_sampler: Sampler
    predictor_sampler: Sampler
    talker_max_new_tokens: int
    first_chunk_frames: int = 1
    chunk_frames: int = 4


class SpeechSession:
    """One spoken answer. ``events()`` drives the thinker and the talker in lockstep and yields what is final."""

    def __init__(self, model, thinker: ThinkerStream, ids: torch.Tensor, prompt_embeds: torch.Tensor,
                 media: MediaInputs, options: SpeechOptions, decode_text=None):
        self.model, self.thinker, self.options = model, thinker, options
        self.detokenizer = IncrementalText(decode_text) if decode_text else None
        self.ids, self.prompt_embeds, self.media = ids, prompt_embeds, media
        talker = model.talker
        self.text = TextConditioner(talker, model.thinker.model.embed_tokens, model.config.tokens)
        self.text.add_prompt(prompt_embeds[:, assistant_start(ids, model.config.tokens):])
        self.runner = model.talker_runner
        self.timer = thinker.timer
        self.packets = AudioPackets(model.code2wav_stream(), options, self.timer)

    def events(self) -> Iterator[StreamEvent]:
        with torch.inference_mode():
            yield from self._events()

    def _events(self) -> Iterator[StreamEvent]:
        opts, cfg = self.options, self.model.config.talker
        yield from self._thinker_until_ready(ASSISTANT_TEXT_ROWS)   # the first generated token's row
        prefill = talker_prefill_embeds(self.model.talker, cfg, self.model.config.tokens, self.ids, self.prompt_embeds,
                                        self.thinker.prompt_hidden, self.text, opts.speaker_id)
        positions = talker_positions(self.ids, self.media, self.model.config)
        with self.timer("talker prefill"):
            logits, hidden = self.runner.prefill(prefill, positions)
        self.runner.begin_answer(opts.talker_sampler, opts.predictor_sampler)
        code0 = self.runner.sample_code0(logits, opts.talker_sampler)
        if opts.talker_max_new_tokens == 1 or int(code0) == cfg.codec_eos:
            return (yield from self._finish())
        # The first frame's predictor runs alone, so that its audio leaves before the next talker step; every later
        # frame is one call: talker step, codebook-0 draw, predictor (one graph replay on a GPU).
        with self.timer("code predictor"):
            residuals, frame_embed = self.runner.predict_residuals(hidden, code0, opts.predictor_sampler)
        for step in range(opts.talker_max_new_tokens - 1):
            self.packets.add(torch.cat([code0, residuals]))
            yield from self.packets.events(final=False)
            if step == opts.talker_max_new_tokens - 2:
                break
            yield from self._thinker_until_ready(ASSISTANT_TEXT_ROWS + 1 + step)
            with self.timer("talker frame"):
                code0, residuals, frame_embed = self.runner.frame(
                    frame_embed, self.text.row(ASSISTANT_TEXT_ROWS + 1 + step), opts.talker_sampler,
                    opts.predictor_sampler)
            if int(code0) == cfg.codec_eos:   # the frame's predictor ran for nothing: one frame per answer
                break
        yield from self._finish()

    def _finish(self) -> Iterator[StreamEvent]:
        yield from self.packets.events(final=True)
        while not self.thinker.finished:   # the talker ended before the text
            yield self._text_event(self.thinker.step())

    def _thinker_until_ready(self, row: int) -> Iterator[StreamEvent]:
        while not self.text.ready(row):
            token = self.thinker.step()
            self.text.add_token(token, is_last=self.thinker.finished)
            yield self._text_event(token)

    def _text_event(self, token: torch.Tensor) -> StreamEvent:
        return text_event(int(token), self.thinker, self.detokenizer)


def text_event(value: int, thinker: ThinkerStream, detokenizer: IncrementalText | None) -> StreamEvent:
    """The event of the token ``value`` that ``thinker`` just drew (with its finish reason when it was the last)."""
    return StreamEvent(text_ids=[value], text=detokenizer.push([value], thinker.finished) if detokenizer else None,
                       finish_reason=thinker.finish_reason)


class PacketSchedule:
    """An answer's finished frames, in packets for Code2Wav: ``first_chunk_frames``, that many again, then twice as
    many each packet up to ``chunk_frames`` (1, 1, 2, 4, 4, ... by default). The ramp keeps a client that plays
    from the first packet on fed while packets grow: it has the audio of all earlier packets, less the 555 samples
    the first one lacks, to wait for the next. With 1, 1, 2, 4 a frame may take up to ~42 ms to make without a gap
    (1, 4 would allow ~14 ms); from then on a packet of ``chunk_frames`` frames buys that many ticks."""

    def __init__(self, options: SpeechOptions):
        self.options = options
        self.pending: list[torch.Tensor] = []   # finished frames not yet sent to Code2Wav, each [16]
        self.frames_sent = 0
        self.packets = 0

    def add(self, frame: torch.Tensor) -> None:
        self.pending.append(frame)

    def wanted(self) -> int:
        """Frames the next packet waits for: packet k (from 0) ``first_chunk_frames * 2 ** (k - 1)``, the first two
        ``first_chunk_frames``, at most ``chunk_frames`` after the first."""
        first = self.options.first_chunk_frames
        if self.packets == 0:
            return first
        return min(self.options.chunk_frames, first << min(self.packets - 1, 16))

    def take(self, final: bool, on_beat: bool = False) -> torch.Tensor | None:
        """The packet due now, [16, n], or None. ``final``: whatever is pending. ``on_beat``: a packet after the
        first goes out short, so that concurrent answers' packets fall on the same ticks and decode together
        (speech_batch.py); a packet is never later than it would be without it."""
        if not self.pending or not (final or len(self.pending) >= self.wanted() or (on_beat and self.packets)):
            return None
        codes = torch.stack(self.pending, dim=1)                           # [16, n]
        self.frames_sent += codes.shape[1]
        self.packets += 1
        self.pending = []
        return codes


class AudioPackets(PacketSchedule):
    """An answer's finished frames -> its Code2Wav stream, in packets; each push's samples are final (the stream
    carries its state, nothing is decoded twice)."""

    def __init__(self, code2wav, options: SpeechOptions, timer: StageTimer):
        super().__init__(options)
        self.code2wav, self.timer = code2wav, timer

    def events(self, final: bool) -> Iterator[StreamEvent]:
        """The packet due now (``final``: whatever is pending). The stream holds nothing back: its pushes' samples
        are all the audio (the last 555 samples would need a next frame, and the reference drops them too)."""
        codes = self.take(final)
        if codes is not None:
            with self.timer("code2wav"):
                audio = self.code2wav.push(codes[None])[0, 0]
            yield StreamEvent(audio=audio, codes=codes)
