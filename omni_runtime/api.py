"""The public API: ``OmniModel.from_pretrained(path)`` and ``model.generate(...)``."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omni_runtime.config import OmniConfig
from omni_runtime.engine.thinker_runner import ThinkerRunner
from omni_runtime.loader import check_components, checkpoint_files, load_weights
from omni_runtime.models.thinker import Thinker
from omni_runtime.sampling import Sampler, SamplingParams

# Top-level parts of a Qwen3-Omni checkpoint, and the sub-components loaded apart from the thinker's text model.
COMPONENTS = ("thinker.", "talker.", "code2wav.")
THINKER_SUBCOMPONENTS = ("thinker.audio_tower.", "thinker.visual.")
DEFAULT_MAX_SEQ_LEN = 8192


@dataclass
class GenerationOutput:
    text_ids: list[int] = field(default_factory=list)   # generated tokens, ending with the EOS when one came
    finish_reason: str = "length"                        # "eos" or "length"


class OmniModel:
    def __init__(self, config: OmniConfig, thinker: Thinker, device: torch.device, dtype: torch.dtype,
                 max_seq_len: int):
        self.config, self.device, self.dtype = config, device, dtype
        self.thinker = thinker
        self.thinker_runner = ThinkerRunner(thinker, config.thinker_text, max_seq_len, device, dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, max_seq_len: int | None = None) -> OmniModel:
        """Load a Qwen3-Omni checkpoint folder (config.json + safetensors). ``max_seq_len`` sizes the KV cache
        (default: the model's maximum position or 8192, whichever is smaller)."""
        device = torch.device(device)
        config = OmniConfig.from_pretrained(path)
        files = checkpoint_files(path)
        check_components(files, COMPONENTS)
        with torch.device("meta"):
            thinker = Thinker(config.thinker_text)
        load_weights(thinker, files, Thinker.checkpoint_prefix, dtype, device, exclude=THINKER_SUBCOMPONENTS)
        thinker.eval()
        limit = config.thinker_text.max_position_embeddings
        if max_seq_len is not None and not 1 <= max_seq_len <= limit:
            raise ValueError(f"max_seq_len={max_seq_len} must lie in [1, {limit}] (the model's max positions)")
        return cls(config, thinker, device, dtype, max_seq_len or min(limit, DEFAULT_MAX_SEQ_LEN))

    def generate(
        self,
        input_ids: torch.Tensor | Sequence[int],
        max_new_tokens: int = 32,
        eos_token_id: int | Sequence[int] | None = None,
        thinker_sampling: SamplingParams | None = None,
        return_audio: bool = False,
    ) -> GenerationOutput:
        """Generate the thinker's answer to ``input_ids`` (1-D or [1, T] ids, or a list of ints)."""
        if return_audio:
            raise ValueError("return_audio=True needs the talker and Code2Wav, which this runtime does not load yet")
        ids = self._check_prompt(input_ids, max_new_tokens)
        eos = self._eos_ids(eos_token_id)
        sampler = Sampler(thinker_sampling or SamplingParams(temperature=0.0), self.device)
        runner = self.thinker_runner
        prompt_len = ids.shape[1]
        positions = torch.arange(prompt_len, device=self.device).view(1, 1, -1).expand(3, 1, -1)
        logits, _ = runner.prefill(runner.embed(ids), positions)
        history, out = ids, GenerationOutput()
        for step in range(max_new_tokens):
            token = sampler(logits, history)                              # [1]
            out.text_ids.append(int(token))
            if out.text_ids[-1] in eos:
                out.finish_reason = "eos"
                break
            if step + 1 < max_new_tokens:
                history = torch.cat([history, token.view(1, 1)], dim=1)
                logits = runner.decode(token.view(1, 1))
        return out

    def _check_prompt(self, input_ids, max_new_tokens: int) -> torch.Tensor:
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
        if ids.numel() + max_new_tokens > self.thinker_runner.max_len:
            raise ValueError(f"prompt ({ids.numel()} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"{self.thinker_runner.max_len} positions the KV cache was sized for "
                             "(from_pretrained(max_seq_len=...))")
        return ids.to(device=self.device, dtype=torch.int64).view(1, -1)

    def _eos_ids(self, eos_token_id) -> set[int]:
        if eos_token_id is None:
            return set(self.config.eos_token_ids)
        return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
