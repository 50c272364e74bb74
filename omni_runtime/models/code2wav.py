"""Code2Wav: 16-codebook codec frames at 12.5 Hz -> 24 kHz waveform, offline and as an exact stream.

codes -> mean of the 16 RVQ embeddings -> sliding-window transformer (8 layers, window 72, LayerScale, 1-D RoPE)
-> 2 x [transposed conv x2, ConvNeXt] -> causal conv -> 4 decoder blocks [SnakeBeta, transposed conv x r
(r = 8, 5, 4, 3), 3 dilated residual units] -> SnakeBeta -> causal conv -> clamp(-1, 1). 1920 samples per frame.

Everything is causal in frames, and the decoder blocks' transposed convs (kernel 2r) read one input sample ahead,
so a call on T frames yields 1920 T - 555 samples, each final: the prefix of the decode of any longer sequence.
``Code2WavStream`` carries what makes that exact across pushes: the last ``window - 1`` keys/values of every
transformer layer, the RoPE position, the left context of every causal conv and the last input of every transposed
conv. With it, pushes concatenate to ``forward(all codes)`` and nothing is held back for a flush.

Shape legend: B batch, Q quantizers, T frames, H hidden, C channels, L samples at the current rate, nh heads,
D head_dim, S cached frames.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import omni_kernels as ok
from omni_kernels.causal_conv import causal_conv1d, causal_conv_transpose1d, snake_beta
from omni_kernels.rvq_lookup import rvq_embed_mean
from omni_runtime.layers import DenseMLP, RMSNorm
from omni_runtime.loader import checkpoint_files, load_weights


@dataclass(frozen=True)
class Code2WavConfig:
    """``config["code2wav_config"]``; the defaults are the transformers class defaults (= the released model)."""
    codebook_size: int = 2048
    num_quantizers: int = 16
    hidden_size: int = 1024
    num_hidden_layers: int = 8
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int = 64
    intermediate_size: int = 3072
    attention_bias: bool = False
    sliding_window: int = 72
    rope_theta: float = 1e4
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8000
    upsample_rates: tuple[int, ...] = (8, 5, 4, 3)
    upsampling_ratios: tuple[int, ...] = (2, 2)
    decoder_dim: int = 1536

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.upsample_rates + self.upsampling_ratios)

    @property
    def lost_samples(self) -> int:
        """Samples a decode of T frames yields fewer than ``T * samples_per_frame``: each decoder block's
        transposed conv drops one input's worth (555 for the released rates)."""
        total, later = 0, math.prod(self.upsample_rates)
        for rate in self.upsample_rates:
            later //= rate                # output samples per sample of this block's output
            total += rate * later
        return total

    @classmethod
    def from_dict(cls, d: dict) -> Code2WavConfig:
        base = cls()
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"code2wav_config: hidden_act {d['hidden_act']!r} is not supported (only silu)")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        heads = d.get("num_attention_heads", base.num_attention_heads)
        hidden = d.get("hidden_size", base.hidden_size)
        get = lambda key: d.get(key, getattr(base, key))  # noqa: E731
        return cls(
            codebook_size=get("codebook_size"), num_quantizers=get("num_quantizers"), hidden_size=hidden,
            num_hidden_layers=get("num_hidden_layers"), num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads", heads), head_dim=d.get("head_dim") or hidden // heads,
            intermediate_size=get("intermediate_size"), attention_bias=bool(get("attention_bias")),
            sliding_window=get("sliding_window"),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", base.rope_theta))),
            rms_norm_eps=get("rms_norm_eps"), max_position_embeddings=get("max_position_embeddings"),
            upsample_rates=tuple(get("upsample_rates")), upsampling_ratios=tuple(get("upsampling_ratios")),
            decoder_dim=get("decoder_dim"),
        )


@dataclass
class StreamState:
    """What a stream carries between pushes: the RoPE position of the next frame and, per stateful module, its
    carried tensors (keys/values of the last window - 1 frames, conv left context, transposed-conv lookahead).

    ``static``: every carried tensor keeps its shape and address from the first push on (keys/values sit in a
    window - 1 frame buffer, the empty part masked; later pushes write into the same tensors, and the position is
    read from ``position_tensor``), so a CUDA graph captured on one push replays the next ones. ``position_tensor``
    holds one position for all rows ([1]) or one per row ([B]: rows of independent streams decoded together,
    engine/code2wav_batch.py)."""
    position: int = 0
    batch: int | None = None
    carried: dict[nn.Module, object] = field(default_factory=dict)
    static: bool = False
    position_tensor: torch.Tensor | None = None   # static: [1] or [B] int64 on the model's device
    fresh: bool = True                             # no push yet: modules see no carried state (buffers may be stale)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the stream carries (static mode: what a captured push reads and writes)."""
        return [t for value in self.carried.values() for t in _as_tuple(value)] + \
            ([self.position_tensor] if self.position_tensor is not None else [])


def _as_tuple(value) -> tuple[torch.Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


def _carried(stream: StreamState | None, module: nn.Module):
    return None if stream is None or stream.fresh else stream.carried.get(module)


def _carry(stream: StreamState | None, module: nn.Module, value) -> None:
    if stream is None:
        return
    old = stream.carried.get(module)
    if not stream.static or old is None:
        stream.carried[module] = value
        return
    for buffer, new in zip(_as_tuple(old), _as_tuple(value)):   # in place: a replayed graph writes these addresses
        if buffer.shape != new.shape:
            raise RuntimeError(f"static Code2Wav stream: carried {tuple(buffer.shape)} became {tuple(new.shape)}")
        buffer.copy_(new)


# --- convolutions -------------------------------------------------------------------------------------------------

class CausalConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: int, dilation: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, dilation=dilation, groups=groups)

    def forward(self, x: torch.Tensor, stream: StreamState | None = None,
                snake: SnakeBeta | None = None) -> torch.Tensor:
        """``snake``: a SnakeBeta applied to the input first, fused into the conv (the state holds its output)."""
        y, context = causal_conv1d(x, self.conv.weight, self.conv.bias, self.conv.dilation[0], self.conv.groups,
                                   _carried(stream, self), **_snake(snake))
        _carry(stream, self, context)
        return y   # [B, C_out, L]


class CausalTransConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel, stride=stride)

    def forward(self, x: torch.Tensor, stream: StreamState | None = None,
                snake: SnakeBeta | None = None) -> torch.Tensor:
        y, lookahead = causal_conv_transpose1d(x, self.conv.weight, self.conv.bias, self.conv.stride[0],
                                               _carried(stream, self), **_snake(snake))
        _carry(stream, self, lookahead)
        return y   # [B, C_out, L * stride] (minus stride on the first call for kernel 2 * stride)


def _snake(activation: SnakeBeta | None) -> dict:
    return {} if activation is None else {"snake": (activation.alpha, activation.beta)}


class SnakeBeta(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.empty(channels))   # log frequency
        self.beta = nn.Parameter(torch.empty(channels))    # log inverse magnitude

    def forward(self, x: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        return snake_beta(x, self.alpha, self.beta)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = CausalConv(dim, dim, 7, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        h = self.dwconv(x, stream).permute(0, 2, 1)                          # [B, L, C]
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).permute(0, 2, 1)                         # [B, C, L]


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.act1 = SnakeBeta(dim)
        self.conv1 = CausalConv(dim, dim, 7, dilation=dilation)
        self.act2 = SnakeBeta(dim)
        self.conv2 = CausalConv(dim, dim, 1)

    def forward(self, x: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        h = self.conv1(x, stream, snake=self.act1)
        return self.conv2(h, stream, snake=self.act2) + x


class DecoderBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, rate: int):
        super().__init__()
        self.block = nn.ModuleList([SnakeBeta(in_dim), CausalTransConv(in_dim, out_dim, 2 * rate, rate),
                                    *(ResidualUnit(out_dim, dilation) for dilation in (1, 3, 9))])

    def forward(self, x: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        snake, upsample, *residual_units = self.block
        x = upsample(x, stream, snake=snake)
        for unit in residual_units:
            x = unit(x, stream)
        return x


# --- pre-transformer ----------------------------------------------------------------------------------------------

def static_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int,
                            position: torch.Tensor) -> torch.Tensor:
    """The static stream's attention. k/v: [B, nkv, window - 1 + Tq, D], a window - 1 frame buffer of earlier keys
    (its last ``min(position, window - 1)`` frames real, the rest empty) then the Tq new ones; the same visibility
    as ``sliding_window_attention`` on the real keys, with lengths from the device tensor ``position`` ([1] for
    every row, or [B] one per row)."""
    q_len, kv_len = q.shape[2], k.shape[2]
    query_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
    key_pos = torch.arange(kv_len, device=q.device)[None, :]
    first_real = (window - 1) - torch.clamp(position, max=window - 1)[:, None, None, None]   # [B or 1, 1, 1, 1]
    mask = (key_pos <= query_pos) & (key_pos > query_pos - window) & (key_pos >= first_real)  # [B or 1, 1, Tq, Tk]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                             window: int) -> torch.Tensor:
    """q: [B, nh, Tq, D], the last Tq of the Tk positions of k/v: [B, nkv, Tk, D] -> [B, nh, Tq, D].

    Key j is visible to query i iff i - window < j <= i. Like the reference, a whole sequence shorter than the window
    is plain causal attention (SDPA's ``is_causal``); anything else gets a boolean mask.
    """
    q_len, kv_len = q.shape[2], k.shape[2]
    if q_len == kv_len and kv_len < window:
        return ok.attention(q, k, v, scale)
    query_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
    key_pos = torch.arange(kv_len, device=q.device)[None, :]
    mask = (key_pos <= query_pos) & (key_pos > query_pos - window)                     # [Tq, Tk]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


class SlidingWindowAttention(nn.Module):
    """Multi-head attention with 1-D RoPE and no q/k norm over the last ``sliding_window`` frames."""

    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.head_dim, self.window = cfg.head_dim, cfg.sliding_window
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                stream: StreamState | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)       # [B, nh, T, D]
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)       # [B, nkv, T, D]
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = ok.apply_rope_ref(q, cos, sin), ok.apply_rope_ref(k, cos, sin)
        past = _carried(stream, self)
        if stream is not None and stream.static:
            if past is None:   # the first push: an empty window
                past = tuple(t.new_zeros(B, t.shape[1], self.window - 1, self.head_dim) for t in (k, v))
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)  # [B, nkv, W - 1 + T, D]
            keep = k.shape[2] - (self.window - 1)
            _carry(stream, self, (k[:, :, keep:].clone(), v[:, :, keep:].clone()))
            out = static_window_attention(q, k, v, self.head_dim**-0.5, self.window, stream.position_tensor)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)  # [B, nkv, S + T, D]
        # the next frame's window reaches back window - 1 frames
        keep = max(k.shape[2] - (self.window - 1), 0)
        _carry(stream, self, (k[:, :, keep:].clone(), v[:, :, keep:].clone()))
        out = sliding_window_attention(q, k, v, self.head_dim**-0.5, self.window)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class TransformerLayer(nn.Module):
    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.self_attn = SlidingWindowAttention(cfg)
        self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn_layer_scale = LayerScale(cfg.hidden_size)
        self.mlp_layer_scale = LayerScale(cfg.hidden_size)

    def forward(self, x: torch.Tensor, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                stream: StreamState | None, next_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream, h: its input norm [B, T, H] -> (the stream after the layer, ``next_norm`` of it).
        Each residual add is one kernel with the norm after it (``add_rms_norm``, the reference's roundings)."""
        post = self.post_attention_layernorm
        x, h = ok.add_rms_norm(x, self.self_attn_layer_scale(self.self_attn(h, cos, sin, stream)), post.weight,
                               post.eps)
        return ok.add_rms_norm(x, self.mlp_layer_scale(self.mlp(h)), next_norm.weight, next_norm.eps)


class PreTransformer(nn.Module):
    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.head_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        # made once per device: no host-to-device copy inside a captured push
        if device not in self._inv_freq:
            self._inv_freq[device] = ok.rope_inv_freq(self.head_dim, self.rope_theta).to(device)
        return self._inv_freq[device]

    def forward(self, x: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        if stream is not None and stream.static:   # the position from the device: one graph for every push
            positions = stream.position_tensor[:, None] + torch.arange(x.shape[1], device=x.device)  # [B or 1, T]
        else:
            start = 0 if stream is None else stream.position
            positions = torch.arange(start, start + x.shape[1], device=x.device)[None]
        cos, sin = ok.mrope_cos_sin_ref(positions, self.inv_freq(x.device), None, x.dtype)   # [B or 1, T, D]
        h = self.layers[0].input_layernorm(x)
        for index, layer in enumerate(self.layers):
            following = self.layers[index + 1].input_layernorm if index + 1 < len(self.layers) else self.norm
            x, h = layer(x, h, cos, sin, stream, following)                            # [B, T, H]
        return h


# --- the model ----------------------------------------------------------------------------------------------------

class Code2Wav(nn.Module):
    checkpoint_prefix = "code2wav."

    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.cfg = cfg
        H, rates = cfg.hidden_size, cfg.upsample_rates
        self.code_embedding = nn.Embedding(cfg.num_quantizers * cfg.codebook_size, H)
        self.pre_transformer = PreTransformer(cfg)
        self.upsample = nn.ModuleList(nn.ModuleList([CausalTransConv(H, H, factor, factor), ConvNeXtBlock(H)])
                                      for factor in cfg.upsampling_ratios)
        dims = [cfg.decoder_dim // 2**i for i in range(len(rates) + 1)]
        self.decoder = nn.ModuleList([CausalConv(H, dims[0], 7),
                                      *(DecoderBlock(dims[i], dims[i + 1], rate) for i, rate in enumerate(rates)),
                                      SnakeBeta(dims[-1]), CausalConv(dims[-1], 1, 7)])

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [B, Q, T] -> fp32 waveform [B, 1, T * 1920 - 555] (computed in the model dtype, like the
        reference's forward followed by the ``.float()`` its ``generate`` applies)."""
        self.check_codes(codes)
        return self.decode(codes)

    def decode(self, codes: torch.Tensor, stream: StreamState | None = None) -> torch.Tensor:
        """Checked codes [B, Q, T] -> fp32 [B, 1, L]; continues ``stream`` when given, else decodes from scratch."""
        hidden = rvq_embed_mean(codes, self.code_embedding.weight, self.cfg.codebook_size)   # [B, T, H]
        hidden = self.pre_transformer(hidden, stream).permute(0, 2, 1)                      # [B, H, T]
        for layer in itertools.chain(*self.upsample, self.decoder):
            hidden = layer(hidden, stream)                                                   # [B, C, L]
        return hidden.clamp(min=-1, max=1).float()                                           # [B, 1, L]

    def chunked_decode(self, codes: torch.Tensor, chunk_size: int = 300, left_context_size: int = 25) -> torch.Tensor:
        """The reference's ``chunked_decode`` (what its ``generate`` calls): chunks of ``chunk_size`` frames decoded
        with up to ``left_context_size`` frames of left context whose samples are dropped. Each chunk also loses its
        last 555 samples, and later chunks differ from ``forward`` (too little context for the window)."""
        self.check_codes(codes)
        if chunk_size < 1 or left_context_size < 0:
            raise ValueError(f"chunked_decode: chunk_size {chunk_size} must be >= 1, left_context_size "
                             f"{left_context_size} >= 0")
        wavs, start = [], 0
        while start < codes.shape[-1]:
            end = min(start + chunk_size, codes.shape[-1])
            context = left_context_size if start - left_context_size > 0 else start
            wav = self.decode(codes[..., start - context:end])
            wavs.append(wav[..., context * self.cfg.samples_per_frame:])
            start = end
        return torch.cat(wavs, dim=-1)

    def check_codes(self, codes: torch.Tensor) -> None:
        cfg = self.cfg
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3:
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"code2wav: codes must be a [batch, {cfg.num_quantizers}, frames] tensor, got {shape}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"code2wav: codes must be integers, got {codes.dtype}")
        if codes.shape[1] != cfg.num_quantizers:
            raise ValueError(f"code2wav: expected {cfg.num_quantizers} quantizers (codes [batch, quantizers, "
                             f"frames]), got {codes.shape[1]}")
        if codes.shape[0] == 0 or codes.shape[2] == 0:
            raise ValueError(f"code2wav: codes {tuple(codes.shape)} are empty")
        low, high = torch.stack(torch.aminmax(codes)).tolist()      # one device sync
        if low < 0 or high >= cfg.codebook_size:
            raise ValueError(f"code2wav: code ids must be in [0, {cfg.codebook_size}), got values in "
                             f"[{low}, {high}]")


class Code2WavStream:
    """Exact streaming decode: ``push`` frames as the talker makes them and get back every sample that no later frame
    can change. The concatenation of all pushes equals ``Code2Wav.forward`` on all frames up to float rounding: the
    convs see the same sums, but the transformer's GEMMs and attention run on other shapes (1 frame, a key window
    that starts elsewhere), which round differently. State is bounded: ``window - 1`` frames of keys/values per
    layer plus a few samples per conv, never the history."""

    def __init__(self, model: Code2Wav, static: bool = False):
        """``static``: carried tensors keep their shapes and addresses (see ``StreamState``); a CUDA graph of one
        push replays the next ones (engine/graphs.py). Attention then runs over a masked fixed-size window, which
        rounds differently from the exact slices (within float rounding of the exact stream)."""
        self.model, self.static = model, static
        self.state = self._new_state()

    def _new_state(self) -> StreamState:
        if not self.static:
            return StreamState()
        device = self.model.code_embedding.weight.device
        return StreamState(static=True, position_tensor=torch.zeros(1, dtype=torch.int64, device=device))

    @property
    def frames(self) -> int:
        return self.state.position

    @torch.inference_mode()
    def push(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [B, Q, n] the next n frames -> fp32 [B, 1, samples]: 1920 n, less 555 on the first push."""
        self.check(codes)
        wav = self.decode_checked(codes)
        self.advance(codes.shape[-1])
        return wav

    def check(self, codes: torch.Tensor) -> None:
        """Refuses codes this push cannot take (bad shape or ids, another batch size than the stream's)."""
        self.model.check_codes(codes)
        if self.state.batch not in (None, codes.shape[0]):
            raise ValueError(f"Code2WavStream: this stream decodes a batch of {self.state.batch}, got "
                             f"{codes.shape[0]} rows")
        self.state.batch = codes.shape[0]

    def decode_checked(self, codes: torch.Tensor) -> torch.Tensor:
        """The push's work on checked codes, without advancing the position (what a CUDA graph captures)."""
        return self.model.decode(codes, self.state)

    def advance(self, frames: int) -> None:
        self.state.position += frames
        self.state.fresh = False
        if self.state.position_tensor is not None:
            self.state.position_tensor.fill_(self.state.position)

    def reset(self) -> None:
        """Start a new stream. A static stream keeps its buffers (their addresses, which captured graphs hold); the
        first push overwrites them."""
        if not self.static:
            self.state = StreamState()
            return
        self.state.position, self.state.batch, self.state.fresh = 0, None, True
        self.state.position_tensor.zero_()

    def flush(self) -> torch.Tensor:
        """End the stream and reset it. Returns the samples still held back: none, because the last 555 samples of
        ``forward`` on all frames would need the next frame and ``forward`` drops them too: an empty [B, 1, 0]
        (B = 1 when nothing was pushed)."""
        batch = self.state.batch or 1
        device = self.model.code_embedding.weight.device
        self.reset()
        return torch.zeros(batch, 1, 0, device=device)


def load_code2wav(path: str | Path, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> Code2Wav:
    """Code2Wav of the Qwen3-Omni checkpoint folder ``path`` (its ``config.json`` and safetensors)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: malformed JSON config: {e}") from e
    if not isinstance(config.get("code2wav_config"), dict):
        raise ValueError(f"{config_file} has no code2wav_config: the checkpoint has no speech output")
    with torch.device("meta"):
        model = Code2Wav(Code2WavConfig.from_dict(config["code2wav_config"]))
    load_weights(model, checkpoint_files(path), Code2Wav.checkpoint_prefix, dtype, torch.device(device))
    return model.eval()
