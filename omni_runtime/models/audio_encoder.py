"""The audio encoder "AuT" (spec 1.1): Whisper log-mel frames -> 3 stride-2 convs (x8 fewer frames) -> pre-LN
transformer layers with bidirectional attention inside fixed windows -> projection to the thinker's hidden size.

Frames are cut into chunks of ``2 * n_window`` = 100 (1 s); every chunk goes through the convs on its own, with
sinusoidal positions restarting at 0, and yields 13 tokens (fewer for a short last chunk). Attention is block-diagonal
over windows of ``13 * n_window_infer // 100`` = 104 tokens (8 s), so memory grows linearly with the audio: the convs
run over bounded groups of chunks and attention over batches of equal-size windows.

Shape legend: M mel bins, F frames (100 per second), C chunks, L frames per (padded) chunk, Dc conv channels,
M' and L' mel bins and frames after the convs, D d_model, N tokens, W windows, S tokens per window,
h heads, hd head_dim, O output_dim.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import omni_kernels as ok

# Windows per SDPA call: bounds the [W, h, S, S] score tensor of kernels that materialise it.
MAX_WINDOWS_PER_CALL = 128


@dataclass(frozen=True)
class AudioEncoderConfig:
    """``thinker_config.audio_config``; defaults are transformers' class defaults (the release has output_dim 2048)."""
    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    output_dim: int = 3584
    n_window: int = 50
    n_window_infer: int = 800
    conv_chunksize: int = 500
    downsample_hidden_size: int = 480
    max_source_positions: int = 1500

    def __post_init__(self):
        if self.d_model % self.encoder_attention_heads or self.d_model % 2:
            raise ValueError(f"audio_config: d_model {self.d_model} must be even and divisible by "
                             f"encoder_attention_heads {self.encoder_attention_heads}")
        if self.n_window < 1 or self.n_window_infer < 2 * self.n_window:
            raise ValueError(f"audio_config: need n_window >= 1 and n_window_infer >= 2 * n_window, got n_window "
                             f"{self.n_window} and n_window_infer {self.n_window_infer}")
        if self.conv_chunksize < 1:
            raise ValueError(f"audio_config: conv_chunksize must be >= 1, got {self.conv_chunksize}")
        if self.max_source_positions < self.tokens_per_chunk:
            raise ValueError(f"audio_config: max_source_positions {self.max_source_positions} is below the "
                             f"{self.tokens_per_chunk} positions of a {self.chunk_frames}-frame chunk")

    @property
    def chunk_frames(self) -> int:
        return 2 * self.n_window

    @property
    def tokens_per_chunk(self) -> int:
        return conv_stack_length(self.chunk_frames)

    @classmethod
    def from_dict(cls, d: dict) -> AudioEncoderConfig:
        activation = d.get("activation_function", "gelu")
        if activation != "gelu":
            raise ValueError(f"audio_config: activation_function {activation!r} is not supported (only 'gelu')")
        names = cls.__dataclass_fields__
        return cls(**{key: d[key] for key in names if d.get(key) is not None})


def conv_stack_length(frames: int) -> int:
    """Frames left after the three Conv2d(k3, s2, p1): ``L -> (L - 1) // 2 + 1`` each (and 0 -> 0)."""
    for _ in range(3):
        frames = (frames - 1) // 2 + 1
    return frames


def audio_token_count(feature_len: int, n_window: int = 50) -> int:
    """Tokens the encoder emits for ``feature_len`` mel frames (spec 1.1: 250 -> 33, 950 -> 124)."""
    full_chunks, tail = divmod(int(feature_len), 2 * n_window)
    return full_chunks * conv_stack_length(2 * n_window) + conv_stack_length(tail)


def _split(total: int, size: int) -> list[int]:
    """``total`` as consecutive pieces of ``size``, the last one holding the remainder."""
    return [size] * (total // size) + ([total % size] if total % size else [])


def _sinusoid_table(length: int, channels: int) -> torch.Tensor:
    # The reference's fp32 table, evaluated on CPU over the same [length, channels/2] shape (even inside a meta-device
    # build): sin/cos of another shape or device can round differently in the last bit.
    log_timescale_increment = np.log(10000) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2, device="cpu").float())
    scaled_time = torch.arange(length, device="cpu")[:, np.newaxis] * inv_timescales[np.newaxis, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)   # [length, D]


def _window_indices(sizes: list[int], device: torch.device) -> list[torch.Tensor]:
    """Token indices of consecutive windows of ``sizes`` tokens, grouped by size: a list of [W, S] tensors."""
    starts = np.cumsum([0, *sizes[:-1]])
    groups = []
    for size in sorted(set(sizes)):
        first = torch.as_tensor(starts[np.asarray(sizes) == size], device=device)
        index = first[:, None] + torch.arange(size, device=device)                  # [W, S]
        groups.extend(index.split(MAX_WINDOWS_PER_CALL))
    return groups


class AudioAttention(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.encoder_attention_heads, cfg.d_model // cfg.encoder_attention_heads
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, windows: list[torch.Tensor]) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = (proj(x).view(N, self.num_heads, self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = torch.empty_like(q)                                                         # [N, h, hd]
        for index in windows:                                                             # [W, S]
            q_w, k_w, v_w = (t[index].transpose(1, 2) for t in (q, k, v))                 # [W, h, S, hd]
            out[index] = ok.attention(q_w, k_w, v_w, self.head_dim**-0.5, causal=False).transpose(1, 2)
        return self.out_proj(out.view(N, -1))


class AudioEncoderLayer(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.self_attn = AudioAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, windows: list[torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), windows)                    # [N, D]
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:
            bound = torch.finfo(torch.float16).max - 1000
            x = x.clamp(-bound, bound)
        return x


class AudioEncoder(nn.Module):
    """Parameter names are the checkpoint's below ``thinker.audio_tower.``."""
    checkpoint_prefix = "thinker.audio_tower."

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.cfg = cfg
        channels, d = cfg.downsample_hidden_size, cfg.d_model
        self.conv2d1 = nn.Conv2d(1, channels, 3, 2, padding=1)
        self.conv2d2 = nn.Conv2d(channels, channels, 3, 2, padding=1)
        self.conv2d3 = nn.Conv2d(channels, channels, 3, 2, padding=1)
        self.conv_out = nn.Linear(channels * conv_stack_length(cfg.num_mel_bins), d, bias=False)
        self.layers = nn.ModuleList(AudioEncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.ln_post = nn.LayerNorm(d)
        self.proj1 = nn.Linear(d, d)
        self.proj2 = nn.Linear(d, cfg.output_dim)
        # each encoder's own table (not a checkpoint tensor), fp32 on the CPU until the module is moved
        self.register_buffer("positions", _sinusoid_table(cfg.max_source_positions, d), persistent=False)

    def forward(self, features: torch.Tensor | Sequence[torch.Tensor],
                lengths: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """features: [M, F] (audios concatenated, ``lengths`` frames each; one audio when None) or a list of
        [M, F_i] -> [N, O], the audios' tokens in order (``audio_token_count`` each).

        Audios encoded in one call influence each other exactly as in the reference's batched call: every chunk is
        zero-padded to the call's longest chunk, which changes the conv outputs at a short chunk's edge."""
        features, lengths = self._check_input(features, lengths)                         # [M, F]
        chunks, chunk_lens = self._chunk(features, lengths)                              # [C, M, L], [C]
        token_lens = [conv_stack_length(n) for n in chunk_lens]
        group = self.cfg.conv_chunksize
        x = torch.cat([self._embed_chunks(chunks[i:i + group], token_lens[i:i + group])
                       for i in range(0, len(chunks), group)])                          # [N, D]
        windows = _window_indices(self._window_sizes(lengths, max(token_lens)), x.device)
        for layer in self.layers:
            x = layer(x, windows)
        return self.proj2(F.gelu(self.proj1(self.ln_post(x))))                           # [N, O]

    def _chunk(self, features: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Cut each audio into chunks of ``chunk_frames`` (the last one shorter) and right-pad all to the longest."""
        size = self.cfg.chunk_frames
        chunk_lens = [n for length in lengths for n in _split(length, size)]
        chunks = nn.utils.rnn.pad_sequence(features.T.split(chunk_lens), batch_first=True)  # [C, L, M]
        return chunks.transpose(1, 2), chunk_lens

    def _embed_chunks(self, chunks: torch.Tensor, token_lens: list[int]) -> torch.Tensor:
        """chunks: [C, M, L] -> the valid tokens of every chunk, in order: [N_group, D]."""
        x = chunks.unsqueeze(1).to(self.conv2d1.weight.dtype)                            # [C, 1, M, L]
        x = F.gelu(self.conv2d3(F.gelu(self.conv2d2(F.gelu(self.conv2d1(x))))))          # [C, Dc, M', L']
        C, Dc, mel_out, frames_out = x.shape
        x = self.conv_out(x.permute(0, 3, 1, 2).reshape(C, frames_out, Dc * mel_out))      # [C, L', D]
        x = x + self.positions[:frames_out].to(device=x.device, dtype=x.dtype)                  # per chunk
        valid = torch.arange(frames_out) < torch.tensor(token_lens)[:, None]              # [C, L']
        return x[valid.to(x.device)]

    def _window_sizes(self, lengths: list[int], max_chunk_tokens: int) -> list[int]:
        # The reference sizes windows from the call's longest chunk (spec 6.17): 13 tokens as soon as one audio has a
        # full 100-frame chunk. When none has, every audio is shorter than one window anyway, so each audio is cut
        # into windows of tokens_per_chunk * n_window_infer // chunk_frames tokens whatever else is in the call.
        window = max_chunk_tokens * (self.cfg.n_window_infer // self.cfg.chunk_frames)
        return [n for length in lengths for n in _split(audio_token_count(length, self.cfg.n_window), window)]

    def _check_input(self, features, lengths) -> tuple[torch.Tensor, list[int]]:
        mel_bins = self.cfg.num_mel_bins
        if isinstance(features, (list, tuple)):
            if not features:
                raise ValueError("audio encoder: got an empty list of audios")
            if any(not isinstance(f, torch.Tensor) or f.ndim != 2 or f.shape[0] != mel_bins for f in features):
                shapes = [tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__ for f in features]
                raise ValueError(f"audio encoder: every audio must be a [{mel_bins}, frames] tensor, got {shapes}")
            if lengths is not None and [int(n) for n in lengths] != [f.shape[1] for f in features]:
                raise ValueError(f"audio encoder: lengths {list(lengths)} disagree with the audios' frame counts "
                                 f"{[f.shape[1] for f in features]}")
            lengths = [f.shape[1] for f in features]
            features = torch.cat(list(features), dim=1)
        elif not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != mel_bins:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"audio encoder: features must be [{mel_bins}, frames] or a list of such, got {shape}")
        lengths = [features.shape[1]] if lengths is None else [int(n) for n in lengths]
        if not lengths or min(lengths) < 1 or sum(lengths) != features.shape[1]:
            raise ValueError(f"audio encoder: lengths {lengths} must be >= 1 each and sum to the "
                             f"{features.shape[1]} frames given")
        if not features.is_floating_point():
            raise ValueError(f"audio encoder: features must be floating point, got {features.dtype}")
        if not torch.isfinite(features).all():
            raise ValueError("audio encoder: features contain NaN or Inf")
        return features.to(self.conv2d1.weight.device), lengths
