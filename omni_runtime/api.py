"""The public API: ``OmniModel.from_pretrained(path)``, ``model.generate(...)`` and ``model.stream(...)``."""
from __future__ import annotations

import numbers

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from omni_runtime.chat import load_tokenizer, prepare_inputs
from omni_runtime.config import OmniConfig
from omni_runtime.engine.code2wav_batch import Code2WavRows
from omni_runtime.engine.code2wav_runner import Code2WavRunner
from omni_runtime.engine.lease import RunnerLease
from omni_runtime.engine.talker_batch import BatchedTalkerRunner
from omni_runtime.engine.talker_prompt import assistant_start
from omni_runtime.engine.talker_runner import TalkerRunner
from omni_runtime.engine.thinker_batch import BatchedThinkerRunner
from omni_runtime.engine.thinker_runner import ThinkerRunner
from omni_runtime.layers import fuse_projections
from omni_runtime.loader import check_components, checkpoint_files, load_weights
from omni_runtime.models.audio_encoder import AudioEncoder, AudioEncoderConfig
from omni_runtime.models.code2wav import Code2Wav, Code2WavConfig, Code2WavStream
from omni_runtime.models.talker import Talker
from omni_runtime.models.thinker import Thinker
from omni_runtime.models.vision_encoder import VisionEncoder, VisionEncoderConfig
from omni_runtime.multimodal import MediaInputs, PromptInputs, build_prompt, check_media, media_token_count
from omni_runtime.preprocess.vision import preprocessor_kwargs
from omni_runtime.profiling import stage_range
from omni_runtime.pipeline import (SAMPLE_RATE, ChunkedPrefill, IncrementalText, SpeechOptions, SpeechSession,
                                   StageTimer, StreamEvent, ThinkerStream, advance_prefills, start_thinker_rows,
                                   step_thinker_rows, text_event)
from omni_runtime.sampling import Sampler, SamplingParams
from omni_runtime.speech_batch import SpeechEngine, SpeechRequest

# Top-level parts of a Qwen3-Omni checkpoint, and the encoders loaded apart from the thinker's text model.
COMPONENTS = ("thinker.", "talker.", "code2wav.")
AUDIO_PREFIX, VISION_PREFIX = "thinker.audio_tower.", "thinker.visual."
DEFAULT_MAX_SEQ_LEN = 8192
DEFAULT_TALKER_MAX_NEW_TOKENS = 4096
# The reference's speech sampling: talker temperature 0.9, top-k 50, repetition penalty 1.05 over codebook-0
# history; the code predictor samples with top-k 50, top-p 0.8 (both greedy when the talker is greedy).
DEFAULT_TALKER_SAMPLING = SamplingParams(temperature=0.9, top_k=50, repetition_penalty=1.05)
DEFAULT_PREDICTOR_SAMPLING = SamplingParams(temperature=1.0, top_k=50, top_p=0.8)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class GenerationOutput:
    text_ids: list[int] = field(default_factory=list)   # generated tokens, ending with the EOS when one came
    finish_reason: str = "length"                        # "eos" or "length"
    codes: torch.Tensor | None = None                    # LongTensor [16, frames] when audio was asked for
    audio: torch.Tensor | None = None                    # float32 [samples] at ``sample_rate``
    sample_rate: int = SAMPLE_RATE


@dataclass
class SpokenParts:
    """One spoken answer's events, gathered into a ``GenerationOutput``."""
    text: list[int] = field(default_factory=list)
    codes: list[torch.Tensor] = field(default_factory=list)
    audio: list[torch.Tensor] = field(default_factory=list)
    finish_reason: str | None = None   # the thinker's, once its last token came

    def add(self, event: StreamEvent) -> None:
        self.text += event.text_ids
        self.finish_reason = event.finish_reason or self.finish_reason
        self.codes += [] if event.codes is None else [event.codes]
        self.audio += [] if event.audio is None else [event.audio]

    def output(self, finish_reason: str, code_groups: int, device: torch.device) -> GenerationOutput:
        codes = (torch.cat(self.codes, dim=1) if self.codes else
                 torch.zeros(code_groups, 0, dtype=torch.int64, device=device))
        audio = torch.cat(self.audio) if self.audio else torch.zeros(0)
        return GenerationOutput(self.text, finish_reason, codes, audio)


class OmniModel:
    def __init__(self, config: OmniConfig, modules: dict, device: torch.device,
                 dtype: torch.dtype, max_seq_len: int):
        self.config, self.device, self.dtype = config, device, dtype
        thinker, talker = modules["thinker"], modules.get("talker")
        self.thinker, self.talker, self.code2wav = thinker, talker, modules.get("code2wav")
        self.audio_encoder, self.vision_encoder = modules.get("audio_encoder"), modules.get("vision_encoder")
        self.tokenizer, self.image_kwargs = modules.get("tokenizer"), modules.get("image_kwargs")
        if device.type == "cuda":   # one GEMM for q/k/v and one for gate/up: fewer decode kernels (CPU: exact GEMMs)
            for decoder in (thinker, talker):
                if decoder is not None:
                    fuse_projections(decoder)
        self.thinker_runner = ThinkerRunner(thinker, config.thinker_text, max_seq_len, device, dtype)
        self.batched_thinker: BatchedThinkerRunner | None = None   # generate_batch's, built on first use
        self.batched_talker: BatchedTalkerRunner | None = None     # the same, for spoken answers
        self.talker_runner = None
        if talker is not None:
            talker_len = min(config.talker.text.max_position_embeddings, max_seq_len + DEFAULT_TALKER_MAX_NEW_TOKENS)
            self.talker_runner = TalkerRunner(talker, config.talker, talker_len, device, dtype)
        # On a GPU one static stream for every answer, its pushes replaying CUDA graphs once its buffers exist; on a
        # CPU a fresh exact stream per answer.
        self.code2wav_runner = None
        self.batched_code2wav: Code2WavRows | None = None        # the same, one stream per concurrent answer
        if self.code2wav is not None and device.type == "cuda":
            self.code2wav_runner = Code2WavRunner(self.code2wav)
        # Each runner set serves one user at a time (its caches hold that user's state): see engine/lease.py.
        self.single_lease = RunnerLease(
            "single-request runners", "one generate() or stream() at a time: finish or close() that stream first, "
            "or for concurrent answers use stream_batch(), generate_batch() or speech_engine()")
        self.batched_lease = RunnerLease(
            "batched runners", "one SpeechEngine, stream_batch() or generate_batch() at a time: submit concurrent "
            "requests to one speech_engine() instead")

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str = torch.float32, max_seq_len: int | None = None) -> OmniModel:
        """Load a Qwen3-Omni checkpoint folder (config.json + safetensors). ``dtype``: a floating-point torch dtype
        or its name ("float32", "bfloat16", "float16"). ``max_seq_len`` sizes the thinker's KV cache (default: the
        model's maximum position or 8192, whichever is smaller); the talker's holds that plus 4096 frames."""
        device, dtype = _check_device_dtype(device, dtype)
        config = OmniConfig.from_pretrained(path)
        limit = config.thinker_text.max_position_embeddings
        if max_seq_len is not None and not 1 <= max_seq_len <= limit:
            raise ValueError(f"max_seq_len={max_seq_len} must lie in [1, {limit}] (the model's max positions)")
        files = checkpoint_files(path)
        check_components(files, COMPONENTS)
        modules = {"tokenizer": load_tokenizer(path), "image_kwargs": preprocessor_kwargs(path)}
        for name, prefix, build in _components(config, files):
            with torch.device("meta"):
                modules[name] = build()
            encoders = tuple(p for p in (AUDIO_PREFIX, VISION_PREFIX) if p != prefix)   # loaded on their own
            part = config.raw.get(prefix.rstrip(".") + "_config", {})
            tied = getattr(modules[name], "tied_weights", {}) if part.get("tie_word_embeddings") is True else {}
            load_weights(modules[name], files, prefix, dtype, device, exclude=encoders, tied=tied)
            modules[name].eval().requires_grad_(False)
        return cls(config, modules, device, dtype, max_seq_len or min(limit, DEFAULT_MAX_SEQ_LEN))

    @classmethod
    def random(cls, config: dict, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
               seed: int = 0, max_seq_len: int | None = None, encoders: bool = False) -> OmniModel:
        """A model with random weights built straight on ``device`` from a ``config.json``-shaped dict (no
        checkpoint): the built-in demo model, and full-size benchmarks (``demo.RELEASED_CONFIG``). ``encoders``:
        also the audio and vision encoders of the config's ``audio_config``/``vision_config``."""
        from omni_runtime.demo import random_module

        device, dtype = _check_device_dtype(device, dtype)
        parsed = OmniConfig.from_dict(config)
        generator = torch.Generator(device=device).manual_seed(seed)
        modules = {name: random_module(build, dtype, device, generator).eval().requires_grad_(False)
                   for name, _, build in _components(parsed, files={}, encoders=encoders)}
        limit = parsed.thinker_text.max_position_embeddings
        return cls(parsed, modules, device, dtype, max_seq_len or min(limit, DEFAULT_MAX_SEQ_LEN))

    def prepare(self, messages: list[dict], use_audio_in_video: bool = False) -> dict:
        """A chat (system/user/assistant turns of text, audio, image and video parts) -> the keyword arguments of
        :meth:`generate`/:meth:`stream`: ``input_ids`` with the right placeholders and the media inputs, equal to
        what the reference processor produces (an audio-in-video group interleaves at the processor's own 13
        positions a second, whatever the config's rope layout uses). Text parts need the checkpoint's
        tokenizer.json."""
        merge = self.vision_encoder.cfg.spatial_merge_size if self.vision_encoder is not None else 2
        with stage_range("preprocess"):
            return prepare_inputs(messages, self.tokenizer, self.config.tokens, spatial_merge_size=merge,
                                  image_kwargs=self.image_kwargs, use_audio_in_video=use_audio_in_video,
                                  device=self.device)

    def decode(self, ids: list[int]) -> str | None:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if self.tokenizer else None

    def code2wav_stream(self) -> Code2WavStream | Code2WavRunner:
        """A new Code2Wav stream (``push``); on a GPU the runner's, restarted (its graphs replay)."""
        if self.code2wav_runner is None:
            return Code2WavStream(self.code2wav)
        return self.code2wav_runner.start()

    def generate(
        self,
        input_ids: torch.Tensor | Sequence[int],
        max_new_tokens: int = 32,
        eos_token_id: int | Sequence[int] | None = None,
        thinker_sampling: SamplingParams | None = None,
        return_audio: bool = False,
        speaker: str = "ethan",
        talker_max_new_tokens: int = DEFAULT_TALKER_MAX_NEW_TOKENS,
        talker_sampling: SamplingParams | None = None,
        code_predictor_sampling: SamplingParams | None = None,
        **media,
    ) -> GenerationOutput:
        """The thinker's answer to ``input_ids`` (1-D or [1, T] ids, or a list of ints) and, with
        ``return_audio=True``, its speech: the concatenation of what :meth:`stream` yields. ``media`` takes the
        reference processor's names (``input_features``, ``feature_attention_mask``, ``pixel_values``,
        ``image_grid_thw``, ``pixel_values_videos``, ``video_grid_thw``, ``video_second_per_grid``,
        ``use_audio_in_video``), as :meth:`prepare` returns them."""
        if not return_audio:
            ids, media = self._check_entry({"input_ids": input_ids, **media}, max_new_tokens)
            with self.single_lease.held("generate()"):
                thinker, _ = self._start_thinker(ids, media, self._thinker_sampler(thinker_sampling),
                                                 self._eos_ids(eos_token_id), max_new_tokens)
                while not thinker.finished:
                    thinker.step()
            return GenerationOutput(text_ids=thinker.tokens, finish_reason=thinker.finish_reason)
        request = self.speech_request({"input_ids": input_ids, **media}, max_new_tokens, eos_token_id,
                                      thinker_sampling, speaker, talker_max_new_tokens, talker_sampling,
                                      code_predictor_sampling)
        parts = SpokenParts()
        for event in self._speak(request, "generate()"):
            parts.add(event)
        return parts.output(parts.finish_reason, self.config.talker.num_code_groups, self.device)

    def generate_batch(
        self,
        prompts: Sequence[torch.Tensor | Sequence[int] | dict],
        max_new_tokens: int = 32,
        eos_token_id: int | Sequence[int] | None = None,
        thinker_sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        max_batch: int = 8,
        return_audio: bool = False,
        speaker: str | Sequence[str] = "ethan",
        talker_max_new_tokens: int = DEFAULT_TALKER_MAX_NEW_TOKENS,
        talker_sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        code_predictor_sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationOutput]:
        """Answers to several prompts, decoded together: up to ``max_batch`` sequences share each thinker step
        (a CUDA graph per batch bucket on a GPU) and, with ``return_audio=True``, each talker frame (see
        :meth:`stream_batch`). A prompt is ``input_ids`` as :meth:`generate` takes them, or a dict of
        :meth:`generate`'s ``input_ids`` and media arguments (what :meth:`prepare` returns). A prompt waits for a
        free row and takes it as soon as an answer ends. ``thinker_sampling``, ``speaker``, ``talker_sampling`` and
        ``code_predictor_sampling``: one for all, or one per prompt (each seeded stream draws as it would alone).
        Each answer is :meth:`generate`'s for that prompt, up to the rounding of GEMMs over more rows (the same
        greedy tokens and codes in the tests)."""
        if return_audio:
            parts = [SpokenParts() for _ in prompts]
            requests = self._speech_requests(prompts, max_new_tokens, eos_token_id, thinker_sampling, speaker,
                                             talker_max_new_tokens, talker_sampling, code_predictor_sampling)
            for index, event in self._speak_batch(requests, max_batch):
                parts[index].add(event)
            return [p.output(p.finish_reason, self.config.talker.num_code_groups, self.device) for p in parts]
        samplings = [_check_sampling(s, "thinker_sampling")
                     for s in _per_prompt(thinker_sampling, len(prompts), "thinker_sampling")]
        checked = self._check_prompts(prompts, max_new_tokens)
        eos = self._eos_ids(eos_token_id)
        with self.batched_lease.held("generate_batch()"):
            return self._generate_text_batch(checked, samplings, eos, max_new_tokens, max_batch)

    @torch.inference_mode()
    def _generate_text_batch(self, checked: list[tuple[torch.Tensor, MediaInputs]], samplings: list, eos: set[int],
                             max_new_tokens: int, max_batch: int) -> list[GenerationOutput]:
        """``generate_batch``'s text answers to checked prompts: each takes a row when one is free."""
        runner = self._batched_thinker(max_batch)
        outputs: list[GenerationOutput | None] = [None] * len(checked)
        waiting = list(range(len(checked)))[::-1]
        live: dict[int, tuple[int, ThinkerStream]] = {}                 # row -> (prompt index, its stream)
        prefilling: dict[int, tuple[int, ChunkedPrefill]] = {}          # the same, for long prompts' prefills
        try:
            while waiting or live or prefilling:
                starts, indices = [], []
                while waiting and len(starts) < runner.free_rows():
                    indices.append(waiting.pop())
                    ids, media = checked[indices[-1]]
                    starts.append((ids, self._build_prompt(indices[-1], ids, media),
                                   self._thinker_sampler(samplings[indices[-1]]), eos, max_new_tokens))
                if starts:
                    for index, (row, stream) in zip(indices, start_thinker_rows(runner, starts)):
                        (prefilling if isinstance(stream, ChunkedPrefill) else live)[row] = index, stream
                chunks = [prefill for _, prefill in prefilling.values()]
                for prefill, stream in advance_prefills(chunks, runner.prefill_tokens):
                    live[prefill.row] = prefilling.pop(prefill.row)[0], stream
                if live:
                    self._batch_step(runner, live, outputs)
        finally:   # an error (or an interrupt) leaves every row free for the next batch
            for row in [*live, *prefilling]:
                runner.release(row)
        return outputs

    def stream_batch(
        self,
        prompts: Sequence[torch.Tensor | Sequence[int] | dict],
        max_new_tokens: int = 32,
        eos_token_id: int | Sequence[int] | None = None,
        thinker_sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        max_batch: int = 8,
        speaker: str | Sequence[str] = "ethan",
        talker_max_new_tokens: int = DEFAULT_TALKER_MAX_NEW_TOKENS,
        talker_sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        code_predictor_sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        first_chunk_frames: int = 1,
        chunk_frames: int = 4,
        timer: StageTimer | None = None,
    ) -> Iterator[tuple[int, StreamEvent]]:
        """Spoken answers to several prompts at once: yields ``(prompt index, event)`` as each answer's text and
        audio become final; per prompt, the events concatenate to what :meth:`stream` yields for it alone. Up to
        ``max_batch`` answers share every thinker step and every talker frame (speech_batch.py); a prompt waits for
        free rows and takes them as soon as an answer ends. Arguments as for :meth:`generate_batch` and
        :meth:`stream`. Bad arguments raise here, before the first event; stopping the iteration early releases
        everything."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        requests = self._speech_requests(prompts, max_new_tokens, eos_token_id, thinker_sampling, speaker,
                                         talker_max_new_tokens, talker_sampling, code_predictor_sampling,
                                         first_chunk_frames, chunk_frames)
        return self._speak_batch(requests, max_batch, timer)

    def _speak_batch(self, requests: list[SpeechRequest], max_batch: int,
                     timer: StageTimer | None = None) -> Iterator[tuple[int, StreamEvent]]:
        """The events of checked requests spoken together, each named by its index."""
        engine = self.speech_engine(max_batch, timer=timer)
        for request in requests:
            engine.submit_request(request)
        yield from engine.events()

    def speech_engine(self, max_batch: int = 8, *, prefill_tokens: int | None = None,
                      timer: StageTimer | None = None) -> SpeechEngine:
        """A server's loop for spoken answers (speech_batch.py): ``engine.submit(prompt, **options)`` queues a
        request whenever one arrives (options as :meth:`stream` takes them) and returns its id; each
        ``engine.step()`` runs one tick over up to ``max_batch`` live answers and returns the ``(id, event)`` pairs
        it made final; ``engine.cancel(id)`` drops a request; ``engine.busy`` says whether any waits or runs;
        ``engine.close()`` drops every request. The engine drives the model's batched runners: one engine at a time
        (a second one, or a ``stream_batch``/``generate_batch`` meanwhile, raises a RuntimeError until the first is
        closed or collected). ``prefill_tokens`` (this engine's, default the batched thinker's 4096): prompt tokens
        per prefill forward; a longer prompt prefills that many per tick, so the answers already speaking wait for
        no more than one such forward a tick."""
        self._require_talker()
        if prefill_tokens is not None and prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be >= 1, got {prefill_tokens}")
        self.batched_lease.check()   # before any runner is rebuilt under the engine that holds them
        return SpeechEngine(self, self._batched_thinker(max_batch), self._batched_talker(max_batch),
                            self._batched_code2wav(max_batch), timer, self.batched_lease, prefill_tokens)

    def speech_request(
        self,
        prompt: torch.Tensor | Sequence[int] | dict,
        max_new_tokens: int = 32,
        eos_token_id: int | Sequence[int] | None = None,
        thinker_sampling: SamplingParams | None = None,
        speaker: str = "ethan",
        talker_max_new_tokens: int = DEFAULT_TALKER_MAX_NEW_TOKENS,
        talker_sampling: SamplingParams | None = None,
        code_predictor_sampling: SamplingParams | None = None,
        first_chunk_frames: int = 1,
        chunk_frames: int = 4,
    ) -> SpeechRequest:
        """One spoken request, checked (a ValueError names what is wrong) with its own samplers: what
        ``SpeechEngine.submit`` queues."""
        self._require_talker()
        if first_chunk_frames < 1 or chunk_frames < 1:
            raise ValueError(f"chunk sizes must be >= 1 frame, got {first_chunk_frames} and {chunk_frames}")
        options = self._speech_options(speaker, talker_max_new_tokens, talker_sampling, code_predictor_sampling,
                                       first_chunk_frames, chunk_frames)
        ids, media = self._check_entry(prompt, max_new_tokens)
        assistant_start(ids, self.config.tokens)
        self._check_talker_room(ids, talker_max_new_tokens, self.talker_runner.max_len)
        return SpeechRequest(ids, media, self._thinker_sampler(thinker_sampling), self._eos_ids(eos_token_id),
                             max_new_tokens, options, media_token_count(ids, self.config.tokens))

    def _speech_requests(self, prompts, max_new_tokens, eos_token_id, thinker_sampling, speaker,
                         talker_max_new_tokens, talker_sampling, predictor_sampling, first_chunk_frames=1,
                         chunk_frames=4) -> list[SpeechRequest]:
        """Every prompt of a batch checked as a spoken request (a ValueError names the prompt by its index)."""
        count = len(prompts)
        settings = zip(_per_prompt(thinker_sampling, count, "thinker_sampling"),
                       [speaker] * count if isinstance(speaker, str) else _per_prompt(speaker, count, "speaker"),
                       _per_prompt(talker_sampling, count, "talker_sampling"),
                       _per_prompt(predictor_sampling, count, "code_predictor_sampling"))
        requests = []
        for i, (prompt, (thinker, voice, talker, predictor)) in enumerate(zip(prompts, settings)):
            try:
                requests.append(self.speech_request(prompt, max_new_tokens, eos_token_id, thinker, voice,
                                                    talker_max_new_tokens, talker, predictor, first_chunk_frames,
                                                    chunk_frames))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        return requests

    def _build_prompt(self, index: int, ids: torch.Tensor, media: MediaInputs) -> PromptInputs:
        """Prompt ``index`` of a batch as the thinker takes it; media that disagree with their placeholders fail
        here, named by the prompt's index."""
        try:
            return build_prompt(ids, media, self.config, self.thinker.model.embed_tokens, self.audio_encoder,
                                self.vision_encoder)
        except ValueError as e:
            raise ValueError(f"prompt {index}: {e}") from None

    def _check_prompts(self, prompts, max_new_tokens: int) -> list[tuple[torch.Tensor, MediaInputs]]:
        """Every prompt of a batch checked before any work starts: (ids, media) each, or a ValueError naming it."""
        checked = []
        for i, prompt in enumerate(prompts):
            try:
                checked.append(self._check_entry(prompt, max_new_tokens))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        return checked

    def _check_entry(self, prompt, max_new_tokens: int) -> tuple[torch.Tensor, MediaInputs]:
        """A prompt (ids, or a dict of input_ids and media) -> (checked ids, media)."""
        kwargs = dict(prompt) if isinstance(prompt, dict) else {"input_ids": prompt}
        if "input_ids" not in kwargs:
            raise ValueError("a prompt dict needs input_ids")
        ids = self._check_prompt(kwargs.pop("input_ids"), max_new_tokens)
        media = MediaInputs.from_kwargs(kwargs)
        check_media(ids, media, self.config, self.audio_encoder, self.vision_encoder)
        return ids, media

    @staticmethod
    def _batch_step(runner: BatchedThinkerRunner, live: dict, outputs: list) -> None:
        """Every live row's next token; finished answers give back their rows."""
        for row, *_ in step_thinker_rows(runner, {row: stream for row, (_, stream) in live.items()}):
            index, stream = live[row]
            if stream.finished:
                outputs[index] = GenerationOutput(text_ids=stream.tokens, finish_reason=stream.finish_reason)
                runner.release(row)
                del live[row]

    def _batched_thinker(self, max_batch: int) -> BatchedThinkerRunner:
        """The batched thinker, built on first use (its cache holds ``max_batch`` rows of the thinker's length)."""
        if self.batched_thinker is None or self.batched_thinker.max_batch != max_batch:
            _check_idle(self.batched_thinker)
            self.batched_thinker = None   # the old cache goes before the new one is allocated
            self.batched_thinker = BatchedThinkerRunner(self.thinker, self.config.thinker_text, max_batch,
                                                        self.thinker_runner.max_len, self.device, self.dtype)
        return self.batched_thinker

    def _batched_talker(self, max_batch: int) -> BatchedTalkerRunner:
        """The batched talker, built on first use (``max_batch`` rows of the talker's length)."""
        self._require_talker()
        if self.batched_talker is None or self.batched_talker.max_batch != max_batch:
            _check_idle(self.batched_talker)
            self.batched_talker = None
            single = self.talker_runner
            self.batched_talker = BatchedTalkerRunner(self.talker, self.config.talker, max_batch, single.max_len,
                                                      self.device, self.dtype, single.code0_suppress,
                                                      single.frame_weights)
        return self.batched_talker

    def _batched_code2wav(self, max_batch: int) -> Code2WavRows:
        """One Code2Wav stream per concurrent answer, built on first use."""
        if self.batched_code2wav is None or self.batched_code2wav.max_batch != max_batch:
            _check_idle(self.batched_code2wav)
            self.batched_code2wav = Code2WavRows(self.code2wav, max_batch)
        return self.batched_code2wav

    def stream(
        self,
        input_ids: torch.Tensor | Sequence[int],
        max_new_tokens: int = 32,
        eos_token_id: int | Sequence[int] | None = None,
        thinker_sampling: SamplingParams | None = None,
        return_audio: bool = True,
        speaker: str = "ethan",
        talker_max_new_tokens: int = DEFAULT_TALKER_MAX_NEW_TOKENS,
        talker_sampling: SamplingParams | None = None,
        code_predictor_sampling: SamplingParams | None = None,
        first_chunk_frames: int = 1,
        chunk_frames: int = 4,
        timer: StageTimer | None = None,
        **media,
    ) -> Iterator[StreamEvent]:
        """Yield text tokens and audio samples as they become final. Their concatenations equal :meth:`generate`'s
        ``text_ids`` and ``audio``. Stopping the iteration early releases everything. ``timer`` (a
        ``pipeline.StageTimer``) collects the time of each stage. ``media`` as for :meth:`generate`. Bad arguments
        raise here, before the first event. One stream at a time: the model's single-request runners hold its state
        until it ends or is closed (concurrent answers: :meth:`stream_batch`, :meth:`speech_engine`)."""
        if not return_audio:
            ids, media = self._check_entry({"input_ids": input_ids, **media}, max_new_tokens)
            return self._stream_text(ids, media, self._thinker_sampler(thinker_sampling), self._eos_ids(eos_token_id),
                                     max_new_tokens, timer)
        request = self.speech_request({"input_ids": input_ids, **media}, max_new_tokens, eos_token_id,
                                      thinker_sampling, speaker, talker_max_new_tokens, talker_sampling,
                                      code_predictor_sampling, first_chunk_frames, chunk_frames)
        return self._speak(request, "a stream() (finish or close() it first)", timer)

    def _stream_text(self, ids: torch.Tensor, media: MediaInputs, sampler: Sampler, eos: set[int],
                     max_new_tokens: int, timer: StageTimer | None) -> Iterator[StreamEvent]:
        with self.single_lease.held("a stream() (finish or close() it first)"):
            thinker, _ = self._start_thinker(ids, media, sampler, eos, max_new_tokens, timer=timer)
            detokenizer = IncrementalText(self.decode) if self.tokenizer else None
            while not thinker.finished:
                yield text_event(int(thinker.step()), thinker, detokenizer)

    def _speak(self, request: SpeechRequest, holder: str, timer: StageTimer | None = None) -> Iterator[StreamEvent]:
        """The events of one checked spoken request, on the single-request runners (``holder`` names the user for
        the lease's error)."""
        with self.single_lease.held(holder):
            thinker, embeds = self._start_thinker(request.ids, request.media, request.thinker_sampler, request.eos,
                                                  request.max_new_tokens, self.config.talker.accept_hidden_layer,
                                                  timer)
            session = SpeechSession(self, thinker, request.ids, embeds, request.media, request.options,
                                    self.decode if self.tokenizer else None)
            yield from session.events()

    @torch.inference_mode()
    def _start_thinker(self, ids: torch.Tensor, media: MediaInputs, sampler: Sampler, eos: set[int],
                       max_new_tokens: int, capture_layer: int | None = None,
                       timer: StageTimer | None = None) -> tuple[ThinkerStream, torch.Tensor]:
        """The encoders and the thinker's prefill of checked ids -> (its stream, the prompt's embeddings)."""
        prompt = build_prompt(ids, media, self.config, self.thinker.model.embed_tokens, self.audio_encoder,
                              self.vision_encoder)
        thinker = ThinkerStream(self.thinker_runner, sampler, ids, prompt, eos, max_new_tokens, capture_layer, timer)
        return thinker, prompt.embeds

    def _thinker_sampler(self, sampling: SamplingParams | None) -> Sampler:
        return Sampler(_check_sampling(sampling, "thinker_sampling") or SamplingParams(temperature=0.0), self.device)

    def _require_talker(self) -> None:
        if self.talker is None:
            raise ValueError("return_audio=True needs a checkpoint with a talker and Code2Wav; this one has none "
                             "(enable_audio_output is false, or it holds no talker.* and code2wav.* tensors)")

    def _speech_options(self, speaker, talker_max_new_tokens, talker_sampling, predictor_sampling,
                        first_chunk_frames, chunk_frames) -> SpeechOptions:
        """One answer's speech settings (fresh samplers: each answer draws from its own seeds)."""
        if not isinstance(speaker, str):
            raise ValueError(f"speaker must be a speaker's name, got {speaker!r}")
        speaker_id = self.config.talker.speaker_id(speaker)
        _check_count(talker_max_new_tokens, "talker_max_new_tokens")
        talker_sampling = _check_sampling(talker_sampling, "talker_sampling") or DEFAULT_TALKER_SAMPLING
        predictor_sampling = _check_sampling(predictor_sampling, "code_predictor_sampling")
        if predictor_sampling is None:
            predictor_sampling = talker_sampling if talker_sampling.greedy else DEFAULT_PREDICTOR_SAMPLING
            if talker_sampling.seed is not None:
                predictor_sampling = replace(predictor_sampling, seed=talker_sampling.seed + 1)
        suppress = self.talker_runner.code0_suppress   # codec specials are never drawn, except the end of speech
        return SpeechOptions(speaker_id, Sampler(talker_sampling, self.device, suppress),
                             Sampler(predictor_sampling, self.device), talker_max_new_tokens, first_chunk_frames,
                             chunk_frames)

    @staticmethod
    def _check_talker_room(ids: torch.Tensor, talker_max_new_tokens: int, max_len: int) -> None:
        if ids.numel() + 9 + talker_max_new_tokens > max_len:
            raise ValueError(f"prompt ({ids.numel()} tokens) + talker_max_new_tokens ({talker_max_new_tokens}) "
                             f"exceeds the {max_len} positions of the talker's KV cache")

    def _check_prompt(self, input_ids, max_new_tokens: int, max_len: int | None = None) -> torch.Tensor:
        try:
            ids = None if isinstance(input_ids, (str, bytes, dict)) else torch.as_tensor(input_ids)
        except (TypeError, ValueError, RuntimeError):
            ids = None
        if ids is None:
            raise ValueError(f"input_ids must be token ids (a tensor or a list of ints), got "
                             f"{type(input_ids).__name__}; use prepare() for text/chat messages")
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"input_ids must be 1-D or [1, T], got shape {tuple(torch.as_tensor(input_ids).shape)}")
        if ids.numel() == 0:
            raise ValueError("input_ids is empty: the prompt needs at least one token")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be integer token ids, got {ids.dtype}")
        vocab = self.config.thinker_text.vocab_size
        bad = ids[(ids < 0) | (ids >= vocab)]
        if bad.numel():
            raise ValueError(f"input_ids holds ids outside the vocabulary [0, {vocab}): {bad[:5].tolist()}")
        _check_count(max_new_tokens, "max_new_tokens")
        max_len = max_len or self.thinker_runner.max_len
        if ids.numel() + max_new_tokens > max_len:
            raise ValueError(f"prompt ({ids.numel()} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"{max_len} positions the KV cache was sized for "
                             "(from_pretrained(max_seq_len=...))")
        return ids.to(device=self.device, dtype=torch.int64)

    def _eos_ids(self, eos_token_id) -> set[int]:
        if eos_token_id is None:
            return set(self.config.eos_token_ids)
        ids = [eos_token_id] if isinstance(eos_token_id, numbers.Integral) else eos_token_id
        if isinstance(ids, (str, bytes, dict)) or not isinstance(ids, Iterable) or not all(
                isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"eos_token_id must be a token id or a list of them, got {eos_token_id!r}")
        return {int(i) for i in ids}


def _check_count(value, name: str) -> None:
    """A token budget: an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    """``from_pretrained``/``random``'s device and dtype, checked before any work: a ValueError names a bad one."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but CUDA is not available (torch {torch.__version__}"
                         f"{', built without CUDA' if torch.version.cuda is None else ', no GPU visible'})")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={str(device)!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} must be a floating-point torch dtype or one of {', '.join(DTYPES)}")
    return device, dtype


def _check_sampling(sampling, name: str) -> SamplingParams | None:
    if sampling is not None and not isinstance(sampling, SamplingParams):
        raise ValueError(f"{name} must be a SamplingParams (e.g. SamplingParams(temperature=0.5)) or None, got "
                         f"{type(sampling).__name__}")
    return sampling


def _check_idle(runner) -> None:
    if runner is not None and any(runner.live):
        raise ValueError(f"the {runner.name} is in use with max_batch={runner.max_batch}: finish or close its batch "
                         "(or engine) before one with another max_batch")


def _per_prompt(value, count: int, name: str) -> list:
    """One setting for every prompt, or a sequence of one per prompt."""
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value] * count
    if len(values) != count:
        raise ValueError(f"{name} holds {len(values)} settings for {count} prompts")
    return values


def _components(config: OmniConfig, files: dict, encoders: bool | None = None) -> list[tuple[str, str, callable]]:
    """(name, checkpoint prefix, constructor) of every part the checkpoint and its config hold; ``encoders``: build
    the encoders the config describes (True) or none (False) whatever ``files`` hold."""
    thinker_raw = config.raw.get("thinker_config", {})
    has = lambda prefix: any(key.startswith(prefix) for key in files) if encoders is None else encoders  # noqa: E731
    parts = [("thinker", Thinker.checkpoint_prefix, lambda: Thinker(config.thinker_text))]
    if "audio_config" in thinker_raw and has(AUDIO_PREFIX):
        parts.append(("audio_encoder", AUDIO_PREFIX,
                      lambda: AudioEncoder(AudioEncoderConfig.from_dict(thinker_raw["audio_config"]))))
    if "vision_config" in thinker_raw and has(VISION_PREFIX):
        parts.append(("vision_encoder", VISION_PREFIX,
                      lambda: VisionEncoder(VisionEncoderConfig.from_dict(thinker_raw["vision_config"]))))
    # A checkpoint without a single talker or Code2Wav tensor is text-only whatever its config says (a config may
    # keep talker_config after the speech weights were stripped); one with some of them fails on the missing ones.
    speaks = encoders is not None or any(key.startswith(("talker.", "code2wav.")) for key in files)
    if config.talker is not None and speaks:
        parts.append(("talker", Talker.checkpoint_prefix, lambda: Talker(config.talker)))
        parts.append(("code2wav", "code2wav.",
                      lambda: Code2Wav(Code2WavConfig.from_dict(config.raw.get("code2wav_config", {})))))
    return parts
