"""The public API: ``OmniModel.from_pretrained(path)``, ``model.generate(...)`` and ``model.stream(...)``."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omni_runtime.chat import load_tokenizer, prepare_inputs
from omni_runtime.config import OmniConfig
from omni_runtime.engine.code2wav_runner import Code2WavRunner
from omni_runtime.engine.talker_runner import TalkerRunner
from omni_runtime.engine.thinker_batch import BatchedThinkerRunner, RowPrefill
from omni_runtime.engine.thinker_runner import ThinkerRunner
from omni_runtime.layers import fuse_projections
from omni_runtime.loader import check_components, checkpoint_files, load_weights
from omni_runtime.models.audio_encoder import AudioEncoder, AudioEncoderConfig
from omni_runtime.models.code2wav import Code2Wav, Code2WavConfig, Code2WavStream
from omni_runtime.models.talker import Talker
from omni_runtime.models.thinker import Thinker
from omni_runtime.models.vision_encoder import VisionEncoder, VisionEncoderConfig
from omni_runtime.multimodal import MediaInputs, build_prompt
from omni_runtime.preprocess.vision import preprocessor_kwargs
from omni_runtime.pipeline import (IncrementalText, SpeechOptions, SpeechSession, StageTimer, StreamEvent,
                                   ThinkerStream)
from omni_runtime.sampling import Sampler, SamplingParams

# Top-level parts of a Qwen3-Omni checkpoint, and the encoders loaded apart from the thinker's text model.
COMPONENTS = ("thinker.", "talker.", "code2wav.")
AUDIO_PREFIX, VISION_PREFIX = "thinker.audio_tower.", "thinker.visual."
DEFAULT_MAX_SEQ_LEN = 8192
DEFAULT_TALKER_MAX_NEW_TOKENS = 4096
SAMPLE_RATE = 24000
# The reference's speech sampling: talker temperature 0.9, top-k 50, repetition penalty 1.05 over codebook-0
# history; the code predictor samples with top-k 50, top-p 0.8 (both greedy when the talker is greedy).
DEFAULT_TALKER_SAMPLING = SamplingParams(temperature=0.9, top_k=50, repetition_penalty=1.05)
DEFAULT_PREDICTOR_SAMPLING = SamplingParams(temperature=1.0, top_k=50, top_p=0.8)


@dataclass
class GenerationOutput:
    text_ids: list[int] = field(default_factory=list)   # generated tokens, ending with the EOS when one came
    finish_reason: str = "length"                        # "eos" or "length"
    codes: torch.Tensor | None = None                    # LongTensor [16, frames] when audio was asked for
    audio: torch.Tensor | None = None                    # float32 [samples] at ``sample_rate``
    sample_rate: int = SAMPLE_RATE


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
        self.talker_runner = None
        if talker is not None:
            talker_len = min(config.talker.text.max_position_embeddings, max_seq_len + DEFAULT_TALKER_MAX_NEW_TOKENS)
            self.talker_runner = TalkerRunner(talker, config.talker, talker_len, device, dtype)
        # On a GPU one static stream for every answer, its pushes replaying CUDA graphs once its buffers exist; on a
        # CPU a fresh exact stream per answer.
        self.code2wav_runner = None
        if self.code2wav is not None and device.type == "cuda":
            self.code2wav_runner = Code2WavRunner(self.code2wav)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, max_seq_len: int | None = None) -> OmniModel:
        """Load a Qwen3-Omni checkpoint folder (config.json + safetensors). ``max_seq_len`` sizes the thinker's KV
        cache (default: the model's maximum position or 8192, whichever is smaller); the talker's holds that plus
        4096 frames."""
        device = torch.device(device)
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
            load_weights(modules[name], files, prefix, dtype, device, exclude=encoders)
            modules[name].eval().requires_grad_(False)
        return cls(config, modules, device, dtype, max_seq_len or min(limit, DEFAULT_MAX_SEQ_LEN))

    @classmethod
    def random(cls, config: dict, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               seed: int = 0, max_seq_len: int | None = None) -> OmniModel:
        """A model with random weights built straight on ``device`` from a ``config.json``-shaped dict (no
        checkpoint, no encoders): the built-in demo model, and full-size benchmarks (``demo.RELEASED_CONFIG``)."""
        from omni_runtime.demo import random_module

        device = torch.device(device)
        parsed = OmniConfig.from_dict(config)
        generator = torch.Generator(device=device).manual_seed(seed)
        modules = {name: random_module(build, dtype, device, generator).eval().requires_grad_(False)
                   for name, _, build in _components(parsed, files={})}
        limit = parsed.thinker_text.max_position_embeddings
        return cls(parsed, modules, device, dtype, max_seq_len or min(limit, DEFAULT_MAX_SEQ_LEN))

    def prepare(self, messages: list[dict], use_audio_in_video: bool = False) -> dict:
        """A chat (system/user/assistant turns of text, audio, image and video parts) -> the keyword arguments of
        :meth:`generate`/:meth:`stream`: ``input_ids`` with the right placeholders and the media inputs, equal to
        what the reference processor produces. Text parts need the checkpoint's tokenizer.json."""
        merge = self.vision_encoder.cfg.spatial_merge_size if self.vision_encoder is not None else 2
        return prepare_inputs(messages, self.tokenizer, self.config.tokens, spatial_merge_size=merge,
                              image_kwargs=self.image_kwargs, use_audio_in_video=use_audio_in_video,
                              position_id_per_seconds=self.config.position_id_per_seconds, device=self.device)

    def decode(self, ids: list[int]) -> str | None:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if self.tokenizer else None

    def code2wav_stream(self) -> Code2WavStream | Code2WavRunner:
        """A new Code2Wav stream (``push``/``flush``); on a GPU the runner's, restarted."""
        return self.code2wav_runner.start() if self.code2wav_runner is not None else Code2WavStream(self.code2wav)

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
        media = MediaInputs.from_kwargs(media)
        if not return_audio:
            thinker = self._start_thinker(input_ids, max_new_tokens, eos_token_id, thinker_sampling, media)[0]
            while not thinker.finished:
                thinker.step()
            return GenerationOutput(text_ids=thinker.tokens, finish_reason=thinker.finish_reason)
        session = self._speech_session(input_ids, media, max_new_tokens, eos_token_id, thinker_sampling, speaker,
                                       talker_max_new_tokens, talker_sampling, code_predictor_sampling)
        text, codes, audio = [], [], []
        for event in session.events():
            text += event.text_ids
            codes += [] if event.codes is None else [event.codes]
            audio += [] if event.audio is None else [event.audio]
        return GenerationOutput(
            text_ids=text, finish_reason=session.thinker.finish_reason,
            codes=torch.cat(codes, dim=1) if codes else torch.zeros(self.config.talker.num_code_groups, 0,
                                                                    dtype=torch.int64, device=self.device),
            audio=torch.cat(audio) if audio else torch.zeros(0))

    def generate_batch(
        self,
        prompts: Sequence[torch.Tensor | Sequence[int] | dict],
        max_new_tokens: int = 32,
        eos_token_id: int | Sequence[int] | None = None,
        thinker_sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        max_batch: int = 8,
    ) -> list[GenerationOutput]:
        """Text answers to several prompts, decoded together: up to ``max_batch`` sequences share each thinker step
        (a CUDA graph per batch bucket on a GPU). A prompt is ``input_ids`` as :meth:`generate` takes them, or a
        dict of :meth:`generate`'s ``input_ids`` and media arguments (what :meth:`prepare` returns). A prompt waits
        for a free row and takes it as soon as an answer ends. ``thinker_sampling``: one setting for all, or one per
        prompt (each seeded stream draws as it would alone). Each answer is :meth:`generate`'s for that prompt, up
        to the rounding of GEMMs over more rows (the same greedy tokens in the tests)."""
        count = len(prompts)
        samplings = (list(thinker_sampling) if isinstance(thinker_sampling, Sequence)
                     else [thinker_sampling] * count)
        if len(samplings) != count:
            raise ValueError(f"thinker_sampling holds {len(samplings)} settings for {count} prompts")
        runner = self._batched_thinker(max_batch)
        checked = []
        for i, prompt in enumerate(prompts):   # every prompt is checked before any work starts
            kwargs = dict(prompt) if isinstance(prompt, dict) else {"input_ids": prompt}
            try:
                if "input_ids" not in kwargs:
                    raise ValueError("a prompt dict needs input_ids")
                ids = self._check_prompt(kwargs.pop("input_ids"), max_new_tokens, runner.max_len)
                checked.append((ids, MediaInputs.from_kwargs(kwargs)))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        eos = self._eos_ids(eos_token_id)
        outputs: list[GenerationOutput | None] = [None] * count
        waiting = list(range(count))[::-1]
        live: dict[int, tuple[int, ThinkerStream]] = {}                 # row -> (prompt index, its stream)
        try:
            with torch.inference_mode():
                while waiting or live:
                    while waiting and runner.free_rows():
                        index = waiting.pop()
                        ids, media = checked[index]
                        try:   # media that disagree with their placeholders fail here
                            prompt = build_prompt(ids, media, self.config, self.thinker.model.embed_tokens,
                                                  self.audio_encoder, self.vision_encoder)
                        except ValueError as e:
                            raise ValueError(f"prompt {index}: {e}") from None
                        sampler = Sampler(samplings[index] or SamplingParams(temperature=0.0), self.device)
                        row = runner.acquire()
                        try:
                            stream = ThinkerStream(RowPrefill(runner, row), sampler, ids, prompt, eos, max_new_tokens)
                        except BaseException:
                            runner.release(row)
                            raise
                        live[row] = index, stream
                    self._batch_step(runner, live, outputs)
        finally:   # an error (or an interrupt) leaves every row free for the next batch
            for row in live:
                runner.release(row)
        return outputs

    @staticmethod
    def _batch_step(runner: BatchedThinkerRunner, live: dict, outputs: list) -> None:
        """Draws every live row's next token (one host read for all), retires finished answers, decodes the rest."""
        rows = sorted(live)
        tokens = torch.cat([live[row][1].draw() for row in rows])                               # [n]
        for row, token, value in zip(rows, tokens, tokens.tolist()):
            index, stream = live[row]
            stream.record(token.view(1), value)
            if stream.finished:
                outputs[index] = GenerationOutput(text_ids=stream.tokens, finish_reason=stream.finish_reason)
                runner.release(row)
                del live[row]
        going = [i for i, row in enumerate(rows) if row in live]
        if going:
            logits = runner.decode([rows[i] for i in going], tokens[going])
            for i, logit in zip(going, logits):
                live[rows[i]][1].logits = logit.view(1, -1)

    def _batched_thinker(self, max_batch: int) -> BatchedThinkerRunner:
        """The batched thinker, built on first use (its cache holds ``max_batch`` rows of the thinker's length)."""
        if self.batched_thinker is None or self.batched_thinker.max_batch != max_batch:
            self.batched_thinker = None   # the old cache goes before the new one is allocated
            self.batched_thinker = BatchedThinkerRunner(self.thinker, self.config.thinker_text, max_batch,
                                                        self.thinker_runner.max_len, self.device, self.dtype)
        return self.batched_thinker

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
        ``pipeline.StageTimer``) collects the time of each stage. ``media`` as for :meth:`generate`."""
        media = MediaInputs.from_kwargs(media)
        if not return_audio:
            thinker = self._start_thinker(input_ids, max_new_tokens, eos_token_id, thinker_sampling, media,
                                          timer=timer)[0]
            detokenizer = IncrementalText(self.decode) if self.tokenizer else None
            while not thinker.finished:
                ids = [int(thinker.step())]
                yield StreamEvent(text_ids=ids, text=detokenizer.push(ids) if detokenizer else None)
            return
        if first_chunk_frames < 1 or chunk_frames < 1:
            raise ValueError(f"chunk sizes must be >= 1 frame, got {first_chunk_frames} and {chunk_frames}")
        session = self._speech_session(input_ids, media, max_new_tokens, eos_token_id, thinker_sampling, speaker,
                                       talker_max_new_tokens, talker_sampling, code_predictor_sampling,
                                       first_chunk_frames, chunk_frames, timer)
        yield from session.events()

    def _start_thinker(self, input_ids, max_new_tokens, eos_token_id, sampling, media: MediaInputs,
                       capture_layer=None, timer=None):
        ids = self._check_prompt(input_ids, max_new_tokens)
        sampler = Sampler(sampling or SamplingParams(temperature=0.0), self.device)
        with torch.inference_mode():
            prompt = build_prompt(ids, media, self.config, self.thinker.model.embed_tokens, self.audio_encoder,
                                  self.vision_encoder)
            thinker = ThinkerStream(self.thinker_runner, sampler, ids, prompt, self._eos_ids(eos_token_id),
                                    max_new_tokens, capture_layer, timer)
        return thinker, ids, prompt.embeds

    def _speech_session(self, input_ids, media, max_new_tokens, eos_token_id, thinker_sampling, speaker,
                        talker_max_new_tokens, talker_sampling, predictor_sampling, first_chunk_frames=1,
                        chunk_frames=4, timer=None) -> SpeechSession:
        if self.talker is None:
            raise ValueError("return_audio=True needs a checkpoint with a talker and Code2Wav; this one has none")
        cfg = self.config.talker
        speaker_id = cfg.speaker_id(speaker)
        if talker_max_new_tokens < 1:
            raise ValueError(f"talker_max_new_tokens must be >= 1, got {talker_max_new_tokens}")
        talker_sampling = talker_sampling or DEFAULT_TALKER_SAMPLING
        if predictor_sampling is None:
            predictor_sampling = talker_sampling if talker_sampling.greedy else DEFAULT_PREDICTOR_SAMPLING
            if talker_sampling.seed is not None:
                predictor_sampling = SamplingParams(**{**predictor_sampling.__dict__, "seed": talker_sampling.seed + 1})
        thinker, ids, embeds = self._start_thinker(input_ids, max_new_tokens, eos_token_id, thinker_sampling, media,
                                                   capture_layer=cfg.accept_hidden_layer, timer=timer)
        needed = ids.numel() + 9 + talker_max_new_tokens
        if needed > self.talker_runner.max_len:
            raise ValueError(f"prompt ({ids.numel()} tokens) + talker_max_new_tokens ({talker_max_new_tokens}) "
                             f"exceeds the {self.talker_runner.max_len} positions of the talker's KV cache")
        suppress = self.talker_runner.code0_suppress   # codec specials are never drawn, except the end of speech
        options = SpeechOptions(speaker_id, Sampler(talker_sampling, self.device, suppress),
                                Sampler(predictor_sampling, self.device), talker_max_new_tokens,
                                first_chunk_frames, chunk_frames)
        return SpeechSession(self, thinker, ids, embeds, media, options, self.decode if self.tokenizer else None)

    def _check_prompt(self, input_ids, max_new_tokens: int, max_len: int | None = None) -> torch.Tensor:
        ids = torch.as_tensor(input_ids)
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
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        max_len = max_len or self.thinker_runner.max_len
        if ids.numel() + max_new_tokens > max_len:
            raise ValueError(f"prompt ({ids.numel()} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"{max_len} positions the KV cache was sized for "
                             "(from_pretrained(max_seq_len=...))")
        return ids.to(device=self.device, dtype=torch.int64)

    def _eos_ids(self, eos_token_id) -> set[int]:
        if eos_token_id is None:
            return set(self.config.eos_token_ids)
        return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)


def _components(config: OmniConfig, files: dict) -> list[tuple[str, str, callable]]:
    """(name, checkpoint prefix, constructor) of every part the checkpoint and its config hold."""
    thinker_raw = config.raw.get("thinker_config", {})
    has = lambda prefix: any(key.startswith(prefix) for key in files)  # noqa: E731
    parts = [("thinker", Thinker.checkpoint_prefix, lambda: Thinker(config.thinker_text))]
    if "audio_config" in thinker_raw and has(AUDIO_PREFIX):
        parts.append(("audio_encoder", AUDIO_PREFIX,
                      lambda: AudioEncoder(AudioEncoderConfig.from_dict(thinker_raw["audio_config"]))))
    if "vision_config" in thinker_raw and has(VISION_PREFIX):
        parts.append(("vision_encoder", VISION_PREFIX,
                      lambda: VisionEncoder(VisionEncoderConfig.from_dict(thinker_raw["vision_config"]))))
    if config.talker is not None:
        parts.append(("talker", Talker.checkpoint_prefix, lambda: Talker(config.talker)))
        parts.append(("code2wav", "code2wav.",
                      lambda: Code2Wav(Code2WavConfig.from_dict(config.raw.get("code2wav_config", {})))))
    return parts
