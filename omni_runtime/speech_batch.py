"""Concurrent spoken answers: up to ``max_batch`` requests share every thinker step, every talker frame and every
Code2Wav push.

``SpeechEngine`` is a server's loop: ``submit`` queues a request at any time, each ``step()`` is one tick, ``cancel``
drops a request (a client that went away) and frees its rows. A tick advances every live answer by one thinker token
(one batched step of the thinker's rows) and one speech frame (one batched frame of the talker's rows: talker step,
codebook-0 draws, the predictor's 15 steps), then decodes the audio packets due: each answer's Code2Wav stream is a
row of ``Code2WavRows``, and the packets due in one tick decode in one batched push per packet size. After its first
packet an answer sends its frames on the engine's beat (ticks that are multiples of ``chunk_frames``), so answers
that started at different ticks still decode together; its second packet may go out short for that, never late.

A request is admitted as soon as a thinker row, a talker row and a Code2Wav row are free and ``PrefillPacer`` has room
for its audio/vision encoders, which run whole at admission (a request held back waits at most the pacer's
``patience`` ticks; text requests behind it are admitted meanwhile). The thinker prefills of the requests admitted in
one tick run together. A tick prefills what the pacer allows: the engine's ``prefill_tokens`` at most, fewer when an
answer already speaking has little audio in hand; a longer prompt prefills a chunk per tick (``ChunkedPrefill``), so
a long prompt's thinker prefill does not stall the answers already speaking. Its talker prefill (the user turn's
rows) follows each chunk in the same tick, so the tick its speech starts prefills only the last chunk's rows and the
9 assistant rows; a short prompt's talker prefill (all of it) runs in the tick of its first token.

As in the single-request pipeline (pipeline.py) the talker starts after the thinker's first token (in the tick that
draws it) and never waits for the whole text, and the first frame's predictor runs right after the talker's prefill;
the answers that start speaking in the same tick prefill the talker as one padded forward and run their first
predictors together. An answer keeps its thinker row until its text ends, its talker row until its speech ends and
its Code2Wav row until its last packet is decoded; the engine forgets a request once it is done or cancelled. Every
answer is the one the single-request pipeline gives its prompt: the same rows of text conditioning in the same
order, its own samplers and seeds, its own codebook-0 history.

A request whose encoders fail at admission, or whose own talker input fails, is dropped and its error (naming the
request) leaves ``step()``; the others go on from the next tick. A batched forward that fails (out of memory, say)
leaves every answer as it was, to be tried again next tick.

The engine drives the model's batched runners, whose rows, generators and histories it owns while it lives: it
holds their lease (engine/lease.py) from its start to ``close()``, so a second engine (or a ``stream_batch`` or
``generate_batch``) meanwhile is refused instead of corrupting its answers.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from omni_runtime.engine.code2wav_batch import Code2WavRows
from omni_runtime.engine.lease import RunnerLease
from omni_runtime.engine.prefill_pacer import PrefillPacer, attention_pairs
from omni_runtime.engine.talker_batch import BatchedTalkerRunner
from omni_runtime.engine.talker_prompt import (ASSISTANT_TEXT_ROWS, TextConditioner, assistant_start,
                                               talker_assistant_embeds, talker_user_embeds)
from omni_runtime.engine.thinker_batch import BatchedThinkerRunner
from omni_runtime.multimodal import MediaInputs, talker_positions
from omni_runtime.pipeline import (SAMPLE_RATE, ChunkedPrefill, IncrementalText, PacketSchedule, SpeechOptions,
                                   StageTimer, StreamEvent, ThinkerStream, advance_prefills, start_thinker_rows,
                                   step_thinker_rows, text_event)
from omni_runtime.profiling import stage_range
from omni_runtime.sampling import Sampler


@dataclass
class SpeechRequest:
    ids: torch.Tensor                 # [P] checked prompt ids
    media: MediaInputs
    thinker_sampler: Sampler
    eos: set[int]
    max_new_tokens: int
    options: SpeechOptions
    media_tokens: int                 # its audio/image/video placeholders: what its encoders make


@dataclass
class SpokenAnswer:
    """One admitted request: its thinker stream (or, while a long prompt prefills in chunks, its ``prefill``) and
    row, its talker row while it speaks, its Code2Wav row until its last packet, its audio packets."""
    index: int
    request: SpeechRequest
    thinker: ThinkerStream | None
    thinker_row: int | None                         # until its text ends
    talker_row: int | None
    code2wav_row: int | None
    prompt_embeds: torch.Tensor
    text: TextConditioner
    packets: PacketSchedule
    detokenizer: IncrementalText | None
    frames: int = 0                                 # frames made so far
    frame_embed: torch.Tensor | None = None         # the last frame's embedding [1, 1, H] (next talker input)
    started: bool = False                           # the talker has prefilled
    speech_done: bool = False
    events: list[StreamEvent] = field(default_factory=list)
    prefill: ChunkedPrefill | None = None           # the long prompt's prefill until its last chunk
    talker_prompt: int = 0                          # prompt tokens whose user-turn rows its talker cache holds
    talker_cached: int = 0                          # those rows
    talker_positions: torch.Tensor | None = None    # [3, 1, U + 9] of its talker prefill, once needed
    first_audio_at: float | None = None             # the engine's clock when its first packet went out
    audio_seconds: float = 0.0                      # audio sent so far

    def slack(self, now: float) -> float | None:
        """How long a client that plays the answer from its first packet on can wait for the next one (None before
        the first packet and after the last)."""
        if self.first_audio_at is None or self.speech_done:
            return None
        return self.audio_seconds - (now - self.first_audio_at)


class SpeechEngine:
    def __init__(self, model, thinker: BatchedThinkerRunner, talker: BatchedTalkerRunner, code2wav: Code2WavRows,
                 timer: StageTimer | None = None, lease: RunnerLease | None = None,
                 prefill_tokens: int | None = None):
        """``lease``: the batched runners' (taken now, released by ``close``); ``prefill_tokens``: prompt tokens
        per prefill forward and tick at most (default: the thinker's)."""
        self.model, self.thinker_rows, self.talker_rows, self.code2wav_rows = model, thinker, talker, code2wav
        self.timer = timer or StageTimer()   # StageTimer(model.device) to time the stages on a GPU (it syncs)
        self.waiting: dict[int, SpeechRequest] = {}    # request id -> request, oldest first
        self.live: list[SpokenAnswer] = []
        self.lease = lease
        self._hold()
        self.prefill_tokens = prefill_tokens or thinker.prefill_tokens
        self.next_id = 0
        self.ticks = 0
        self.pacer = PrefillPacer()
        self.prefill_budget = 0                        # prompt tokens this tick may still prefill
        self.prefill_seconds = 0.0                     # spent on prompt work (encoders, prefill) in this tick
        self.encoder_waits: dict[int, int] = {}        # request id -> ticks its encoders were held back
        self.chunk_advanced = False                    # whether a long prompt's chunk prefilled in this tick

    @property
    def busy(self) -> bool:
        """Whether a request waits or runs."""
        return bool(self.waiting or self.live)

    def submit(self, prompt, **options) -> int:
        """Queues a request (a prompt as ``OmniModel.generate_batch`` takes one, options as ``OmniModel.stream``
        takes them; checked now, a ValueError names what is wrong) -> its id, the index of its events."""
        return self.submit_request(self.model.speech_request(prompt, **options))

    def submit_request(self, request: SpeechRequest) -> int:
        """Queues a checked request (``OmniModel.speech_request``) -> its id."""
        self._hold()
        request_id, self.next_id = self.next_id, self.next_id + 1
        self.waiting[request_id] = request
        return request_id

    def cancel(self, request_id: int) -> None:
        """Drops a waiting or running request: its rows are free for the next tick; it yields nothing more."""
        self.waiting.pop(request_id, None)
        self.encoder_waits.pop(request_id, None)
        for answer in [a for a in self.live if a.index == request_id]:
            self._drop(answer)

    @torch.inference_mode()
    def step(self) -> list[tuple[int, StreamEvent]]:
        """One tick -> the (request id, event) pairs it made final, each request's in order. The event of an
        answer's last text token carries its finish reason."""
        self._hold()
        with stage_range("engine tick"):
            self._tick()
        out = []
        for answer in list(self.live):
            out += [(answer.index, event) for event in answer.events]
            answer.events.clear()
            if answer.speech_done and answer.thinker is not None and answer.thinker.finished:
                self._drop(answer)
        return out

    def _tick(self) -> None:
        clock = self.pacer.clock
        start = clock()
        slacks = [s for s in (a.slack(start) for a in self.live) if s is not None]
        beat = max((a.request.options.chunk_frames for a in self.live), default=1)
        self.prefill_seconds, self.chunk_advanced = 0.0, False
        admitted = self._admit(slacks, beat)     # their encoders run here
        prefix = next((a.prefill.done for a in self.live if a.prefill is not None), 0)   # the next chunk's row
        self.prefill_budget = self.pacer.budget(slacks, self.prefill_tokens, beat, spent=self.prefill_seconds,
                                                prefix=prefix)
        if admitted:
            self._start(*admitted)
        self._prefill_chunks()
        self._thinker_step()
        self._talker_frames()    # answers already speaking
        self._talker_starts()    # answers whose speech starts now: their first frame
        self._decode_packets()
        self.ticks += 1
        # A long prompt waited if no chunk of it ran, even when short prompts prefilled whole in this tick.
        waited = not self.chunk_advanced and any(a.prefill is not None for a in self.live)
        self.pacer.record_tick(clock() - start - self.prefill_seconds, waited)

    def events(self) -> Iterator[tuple[int, StreamEvent]]:
        """Ticks until every request is done, yielding what each makes final; stopping early frees every row."""
        try:
            while self.busy:
                yield from self.step()
        finally:
            self.close()

    def close(self) -> None:
        """Drops every request, freeing all rows, and gives the batched runners back (a later ``submit`` or
        ``step`` takes them again, if no one else has meanwhile)."""
        for answer in list(self.live):
            self._drop(answer)
        self.waiting.clear()
        self.encoder_waits.clear()
        if self.lease is not None:
            self.lease.release(self)

    def __del__(self):   # an engine dropped without close(): its rows go back with the lease
        self.close()

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def _hold(self) -> None:
        if self.lease is not None:
            self.lease.take(self, "a SpeechEngine (close() it first)")

    def _admit(self, slacks: list[float], beat: int) -> tuple[list, list, list] | None:
        """Every waiting request that finds a free thinker, talker and Code2Wav row, and whose encoders the pacer
        has room for, is admitted: its encoders run now -> (ids, requests, thinker starts) to prefill together."""
        free = min(self.thinker_rows.free_rows(), self.talker_rows.free_rows(), self.code2wav_rows.free_rows())
        indices, requests, starts = [], [], []
        for index, request in list(self.waiting.items()):
            if len(indices) == free:
                break
            media_tokens = request.media_tokens
            waited = self.encoder_waits.get(index, 0)
            if not self.pacer.admits_encoders(media_tokens, slacks, beat, self.prefill_seconds, waited):
                self.encoder_waits[index] = waited + 1
                continue
            self.waiting.pop(index)
            self.encoder_waits.pop(index, None)
            try:
                with self._timed() if media_tokens else nullcontext() as elapsed:
                    prompt = self.model._build_prompt(index, request.ids, request.media)
            except Exception as e:   # e.g. media that disagree with their placeholders: that request alone is dropped
                self.waiting = {**dict(zip(indices, requests)), **self.waiting}   # the others wait again
                if not isinstance(e, ValueError):   # a ValueError names its prompt already
                    e.add_note(f"request {index}'s media failed; it is dropped, the others go on")
                raise
            if media_tokens:
                self.prefill_seconds += elapsed()
                self.pacer.record_encoders(media_tokens, elapsed())
            indices.append(index)
            requests.append(request)
            starts.append((request.ids, prompt, request.thinker_sampler, request.eos, request.max_new_tokens))
        return (indices, requests, starts) if starts else None

    def _start(self, indices: list[int], requests: list[SpeechRequest], starts: list[tuple]) -> None:
        model, cfg = self.model, self.model.config
        limit = max(self.prefill_budget, min(self.pacer.min_tokens, self.prefill_tokens))
        whole = [s for s in starts if s[1].positions.shape[-1] <= limit]
        with self._prefilling() as work:
            work.update(tokens=sum(s[1].positions.shape[-1] for s in whole),
                        pairs=sum(attention_pairs(s[1].positions.shape[-1], 0) for s in whole))
            streams = start_thinker_rows(self.thinker_rows, starts, cfg.talker.accept_hidden_layer, self.timer,
                                         whole_tokens=limit, forward_tokens=self.prefill_tokens)
        decode = model.decode if model.tokenizer else None
        for index, request, (_, prompt, *_), (row, thinker) in zip(indices, requests, starts, streams):
            text = TextConditioner(model.talker, model.thinker.model.embed_tokens, cfg.tokens)
            text.add_prompt(prompt.embeds[:, assistant_start(request.ids, cfg.tokens):])
            chunked = isinstance(thinker, ChunkedPrefill)
            self.live.append(SpokenAnswer(
                index, request, None if chunked else thinker, row, self.talker_rows.acquire(),
                self.code2wav_rows.acquire(), prompt.embeds, text, PacketSchedule(request.options),
                IncrementalText(decode) if decode else None, prefill=thinker if chunked else None))

    def _prefill_chunks(self) -> None:
        """The next chunks of the long prompts still prefilling, what is left of the tick's budget in all; a prompt
        whose last chunk ran starts decoding in this tick."""
        prefilling = {id(a.prefill): a for a in self.live if a.prefill is not None}
        if not prefilling or self.prefill_budget <= 0:
            return
        before = {key: a.prefill.done for key, a in prefilling.items()}
        with self._prefilling() as work:
            finished = advance_prefills([a.prefill for a in prefilling.values()], self.prefill_budget)
            chunks = [(a.prefill.done - before[key], before[key]) for key, a in prefilling.items()]
            work.update(tokens=sum(n for n, _ in chunks), pairs=sum(attention_pairs(n, p) for n, p in chunks))
            for prefill, stream in finished:
                answer = prefilling[id(prefill)]
                answer.thinker, answer.prefill = stream, None
            for answer in prefilling.values():
                if answer.prefill is not None:
                    self._talker_follows(answer)
        self.chunk_advanced = True

    def _talker_follows(self, answer: SpokenAnswer) -> None:
        """The talker rows of the user-turn tokens the thinker has prefilled since the last call, into the answer's
        talker row: a long prompt's talker prefill runs behind its chunks, in ticks the pacer has room in, and only
        the last chunk's rows and the 9 assistant rows are left for the tick its speech starts (which the first
        packet waits for). Its cost is counted as the chunk's."""
        start, end = answer.talker_prompt, answer.prefill.done
        if end <= start:
            return
        model, cfg, cached = self.model, self.model.config, answer.talker_cached
        with self._alone(answer):   # what this answer's input makes (a forward that fails is tried again)
            embeds = talker_user_embeds(model.talker, cfg.talker, cfg.tokens, answer.request.ids, answer.prompt_embeds,
                                        answer.prefill.captured_between(start, end), start, end)   # [1, u, H]
            positions = self._talker_positions(answer)[..., cached:cached + embeds.shape[1]]
        if embeds.shape[1]:
            self.talker_rows.extend(answer.talker_row, embeds, positions, cached)
        answer.talker_prompt, answer.talker_cached = end, answer.talker_cached + embeds.shape[1]

    def _talker_prompt(self, answer: SpokenAnswer) -> torch.Tensor:
        """The rest of the answer's talker prefill: the user-turn rows its talker row lacks, then the 9 assistant
        rows."""
        model, cfg = self.model, self.model.config
        start, hidden = answer.talker_prompt, answer.thinker.prompt_hidden
        user = talker_user_embeds(model.talker, cfg.talker, cfg.tokens, answer.request.ids, answer.prompt_embeds,
                                  None if hidden is None else hidden[:, start:], start)
        assistant = talker_assistant_embeds(model.talker, cfg.talker, answer.text, answer.request.options.speaker_id)
        return torch.cat([user, assistant], dim=1)

    @contextmanager
    def _alone(self, answer: SpokenAnswer):
        """Work of this answer alone: if it fails, the answer is dropped (its rows freed) and the error, naming its
        request, leaves the tick; the other answers go on with the next."""
        try:
            yield
        except Exception as e:
            self._drop(answer)
            if isinstance(e, ValueError):
                raise ValueError(f"request {answer.index}: {e}; it is dropped, the others go on") from e
            e.add_note(f"request {answer.index} failed; it is dropped, the others go on")
            raise

    def _talker_positions(self, answer: SpokenAnswer) -> torch.Tensor:
        if answer.talker_positions is None:
            answer.talker_positions = talker_positions(answer.request.ids, answer.request.media, self.model.config)
        return answer.talker_positions

    @contextmanager
    def _timed(self):
        """Yields a function giving the seconds the block took. On a GPU the host runs ahead of the kernels: the
        pacer needs their time, so this waits for them at both ends."""
        self._sync()
        start, end = self.pacer.clock(), None
        yield lambda: end - start
        self._sync()
        end = self.pacer.clock()

    @contextmanager
    def _prefilling(self):
        """Times a prefill for the pacer and takes its tokens from the tick's budget: the block fills in the
        yielded dict's ``tokens`` and ``pairs`` (``attention_pairs``) before it ends."""
        work = {"tokens": 0, "pairs": 0}
        with self._timed() as elapsed:
            yield work
        self.prefill_seconds += elapsed()
        self.prefill_budget -= work["tokens"]
        self.pacer.record_prefill(work["tokens"], elapsed(), work["pairs"])

    def _thinker_step(self) -> None:
        going = {a.thinker_row: a for a in self.live if a.thinker is not None and not a.thinker.finished}
        if not going:
            return
        for row, token, value in step_thinker_rows(self.thinker_rows, {r: a.thinker for r, a in going.items()}):
            answer = going[row]
            answer.text.add_token(token, is_last=answer.thinker.finished)
            answer.events.append(text_event(value, answer.thinker, answer.detokenizer))
            if answer.thinker.finished:   # nothing reads its cache any more (the talker has its text rows)
                self.thinker_rows.release(row)
                answer.thinker_row = None

    def _talker_starts(self) -> None:
        """Prefills the talker of every answer whose text has reached the first frame's row, the first generated
        token's (together, as one padded forward); their first frames' predictors run together. The answers change
        only once all of it succeeded: after an error they start again in the next tick."""
        cfg = self.model.config.talker
        starting = [a for a in self.live
                    if not a.started and a.thinker is not None and a.text.ready(ASSISTANT_TEXT_ROWS)]
        if not starting:
            return
        embeds, positions = [], []
        for answer in starting:
            with self._alone(answer):   # what this answer's input makes (a forward that fails is tried again)
                embeds.append(self._talker_prompt(answer))             # [1, U + 9 - rows it holds, H]
                positions.append(self._talker_positions(answer)[..., answer.talker_cached:])
        # prompt work: its seconds are not a tick's (which the pacer expects the next ticks to take)
        with self.timer("talker prefill"), self._timed() as elapsed:
            prefilled = self.talker_rows.prefill_many([a.talker_row for a in starting], embeds, positions,
                                                      [a.talker_cached for a in starting])
        self.prefill_seconds += elapsed()
        code0 = []
        for answer, (logits, _) in zip(starting, prefilled):
            opts = answer.request.options
            self.talker_rows.begin_answer(answer.talker_row, opts.talker_sampler, opts.predictor_sampler)
            code0.append(self.talker_rows.sample_code0(answer.talker_row, logits))
        speaking = [i for i, (a, value) in enumerate(zip(starting, torch.cat(code0).tolist()))
                    if a.request.options.talker_max_new_tokens > 1 and value != cfg.codec_eos]
        if speaking:
            with self.timer("code predictor"):
                residuals, frame_embeds = self.talker_rows.predict([starting[i].talker_row for i in speaking],
                                                                   torch.cat([prefilled[i][1] for i in speaking]),
                                                                   torch.cat([code0[i] for i in speaking]))
        for answer in starting:   # the prompt's embeddings and hidden states are needed no more
            answer.started, answer.prompt_embeds, answer.thinker.prompt_hidden = True, None, None
        for n, i in enumerate(speaking):
            self._add_frame(starting[i], torch.cat([code0[i], residuals[n]]), frame_embeds[n:n + 1])
        for answer in [a for i, a in enumerate(starting) if i not in speaking]:   # no frame: its speech is over
            self._end_speech(answer)

    def _talker_frames(self) -> None:
        """One frame of every speaking answer whose next text row is known."""
        speaking = [a for a in self.live if a.frame_embed is not None and a.text.ready(ASSISTANT_TEXT_ROWS + a.frames)]
        if not speaking:
            return
        embeds = torch.cat([a.frame_embed + a.text.row(ASSISTANT_TEXT_ROWS + a.frames) for a in speaking])
        with self.timer("talker frame"):
            code0, residuals, frame_embeds = self.talker_rows.frame([a.talker_row for a in speaking], embeds)
        eos = self.model.config.talker.codec_eos
        for i, (answer, value) in enumerate(zip(speaking, code0.tolist())):
            if value == eos:   # the frame's predictor ran for nothing
                self._end_speech(answer)
            else:
                self._add_frame(answer, torch.cat([code0[i:i + 1], residuals[i]]), frame_embeds[i:i + 1])

    def _add_frame(self, answer: SpokenAnswer, frame: torch.Tensor, frame_embed: torch.Tensor) -> None:
        answer.frames += 1
        answer.packets.add(frame)
        if answer.frames == answer.request.options.talker_max_new_tokens - 1:
            self._end_speech(answer)
        else:
            answer.frame_embed = frame_embed

    def _end_speech(self, answer: SpokenAnswer) -> None:
        answer.speech_done, answer.frame_embed = True, None
        self.talker_rows.release(answer.talker_row)
        answer.talker_row = None

    def _decode_packets(self) -> None:
        """Decodes every packet due this tick: one batched Code2Wav push per (frames, first packet or not); an
        answer whose speech has ended sends what is left and gives its row back."""
        groups = defaultdict(list)
        for answer in self.live:
            if answer.code2wav_row is None:
                continue
            on_beat = self.ticks % answer.request.options.chunk_frames == 0
            codes = answer.packets.take(final=answer.speech_done, on_beat=on_beat)
            if codes is not None:
                first = self.code2wav_rows.frames[answer.code2wav_row] == 0
                groups[codes.shape[1], first].append((answer, codes))
        for group in groups.values():
            with self.timer("code2wav"):
                audio = self.code2wav_rows.push([a.code2wav_row for a, _ in group], torch.stack([c for _, c in group]))
            now = self.pacer.clock()
            for (answer, codes), samples in zip(group, audio[:, 0]):
                answer.events.append(StreamEvent(audio=samples, codes=codes))
                if answer.first_audio_at is None:
                    answer.first_audio_at = now
                answer.audio_seconds += samples.numel() / SAMPLE_RATE
        for answer in self.live:
            if answer.speech_done and answer.code2wav_row is not None:
                self.code2wav_rows.release(answer.code2wav_row)
                answer.code2wav_row = None

    def _drop(self, answer: SpokenAnswer) -> None:
        """The answer is done or cancelled: the rows it still holds are free, and the engine forgets it."""
        for rows, row in ((self.thinker_rows, answer.thinker_row), (self.talker_rows, answer.talker_row),
                          (self.code2wav_rows, answer.code2wav_row)):
            if row is not None:
                rows.release(row)
        answer.thinker_row = answer.talker_row = answer.code2wav_row = None
        self.live.remove(answer)
