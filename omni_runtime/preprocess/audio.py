"""Waveform -> the audio encoder's input: Whisper-style log-mel features as Qwen3-Omni's processor computes them.

``WhisperFeatureExtractor(feature_size=128)`` with the processor's settings (16 kHz, n_fft 400, hop 160, Hann window,
power spectrum, Slaney mel filters up to 8 kHz, ``log10``, floor at max - 8, ``(x + 4) / 4``; no truncation, and for
one audio no padding). The torch ops mirror transformers' torch path so that the features match it to float rounding.
"""
from __future__ import annotations

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 128
MAX_SECONDS = 40 * 60
MAX_CHANNELS = 8
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 4_000, 384_000   # speech needs more than 2 kHz of bandwidth; the top of pro audio
MIN_SAMPLES = N_FFT // 2 + 1  # the centred STFT reflects n_fft/2 samples at each end


def _hertz_to_mel(freq: float | np.ndarray) -> float | np.ndarray:
    # Slaney scale: linear (3 mel per 200 Hz) below 1 kHz, logarithmic (27 mel per factor 6.4) above.
    mels = 3.0 * np.asarray(freq, dtype=np.float64) / 200.0
    log_region = np.asarray(freq) >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(freq, 1000.0) / 1000.0) * (27.0 / np.log(6.4)), mels)


def _mel_to_hertz(mels: np.ndarray) -> np.ndarray:
    freq = 200.0 * mels / 3.0
    log_region = mels >= 15.0
    return np.where(log_region, 1000.0 * np.exp(np.log(6.4) / 27.0 * (np.maximum(mels, 15.0) - 15.0)), freq)


def mel_filter_bank(num_frequency_bins: int = N_FFT // 2 + 1, num_mel_filters: int = N_MELS,
                    min_frequency: float = 0.0, max_frequency: float = 8000.0,
                    sampling_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Triangular mel filters on the Slaney scale with Slaney (constant energy) normalisation: float64
    [num_frequency_bins, num_mel_filters], transformers' ``mel_filter_bank(norm="slaney", mel_scale="slaney")``."""
    mel_freqs = np.linspace(_hertz_to_mel(min_frequency), _hertz_to_mel(max_frequency), num_mel_filters + 2)
    filter_freqs = _mel_to_hertz(mel_freqs)                                   # filter edges and centres, Hz
    fft_freqs = np.linspace(0, sampling_rate // 2, num_frequency_bins)
    filter_diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]                       # [bins, mels + 2]
    down_slopes = -slopes[:, :-2] / filter_diff[:-1]
    up_slopes = slopes[:, 2:] / filter_diff[1:]
    filters = np.maximum(np.zeros(1), np.minimum(down_slopes, up_slopes))
    return filters * (2.0 / (filter_freqs[2:num_mel_filters + 2] - filter_freqs[:num_mel_filters]))[None, :]


def _mel_filters_t(device: torch.device) -> torch.Tensor:
    # a fresh tensor per call (under a millisecond): nothing shared that a caller could modify
    return torch.from_numpy(mel_filter_bank()).to(device, torch.float32).T    # [mels, bins]


def log_mel_features(waveform: np.ndarray | torch.Tensor, sample_rate: int) -> tuple[torch.Tensor, int]:
    """One audio -> (features [128, T] float32, T) with T = samples // 160 (100 frames per second).

    ``waveform``: mono float samples in [-1, 1], 1-D; or 2-D multichannel, mixed down to mono by averaging the
    channels: [channels, samples] when the first dimension is at most 8, else [samples, channels] when the second is.
    Computed on the tensor's device (CPU for numpy input)."""
    samples = mono_waveform_16k(waveform, sample_rate)                             # [S]
    window = torch.hann_window(N_FFT, device=samples.device)
    stft = torch.stft(samples[None], N_FFT, HOP_LENGTH, window=window, return_complex=True)  # [1, bins, T + 1]
    power = (stft[..., :-1].abs() ** 2).contiguous()
    mel = _mel_filters_t(samples.device) @ power                               # [1, mels, T]
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)                   # 80 dB dynamic range
    features = ((log_spec + 4.0) / 4.0)[0]
    return features, features.shape[1]


def mono_waveform_16k(waveform: np.ndarray | torch.Tensor, sample_rate: int) -> torch.Tensor:
    """A validated mono float32 waveform at 16 kHz (mixed down and resampled as needed), or a ValueError."""
    if isinstance(sample_rate, (float, np.floating)) and float(sample_rate).is_integer():
        sample_rate = int(sample_rate)   # 16000.0 is a rate too
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:   # a rate in kHz or seconds, not Hz
        raise ValueError(f"sample_rate {sample_rate} Hz is outside the supported {MIN_SAMPLE_RATE // 1000}-"
                         f"{MAX_SAMPLE_RATE // 1000} kHz")
    if not isinstance(waveform, (np.ndarray, torch.Tensor)):
        raise ValueError(f"waveform must be a numpy array or a torch tensor, got {type(waveform).__name__}")
    if not (waveform.is_floating_point() if isinstance(waveform, torch.Tensor) else waveform.dtype.kind == "f"):
        raise ValueError(f"waveform must hold float samples in [-1, 1], got {waveform.dtype} (scale integer PCM "
                         "first, e.g. int16 / 32768)")
    if isinstance(waveform, np.ndarray):
        waveform = torch.from_numpy(np.require(waveform, np.float32, ["C", "W"]))
    if waveform.ndim == 2:
        waveform = _mix_down(waveform)
    elif waveform.ndim != 1:
        raise ValueError(f"waveform must be 1-D (mono) or 2-D (multichannel), got shape {tuple(waveform.shape)}")
    if waveform.numel() == 0:
        raise ValueError("waveform is empty")
    if waveform.numel() > MAX_SECONDS * sample_rate:
        raise ValueError(f"audio too long: {waveform.numel() / sample_rate:.1f} s, the supported maximum is "
                         f"{MAX_SECONDS // 60} minutes ({MAX_SECONDS * SAMPLE_RATE} samples at 16 kHz)")
    if not torch.isfinite(waveform).all():
        raise ValueError("waveform contains NaN or Inf samples")
    waveform = resample_to_16k(waveform.to(torch.float32), sample_rate)
    if waveform.numel() < MIN_SAMPLES:
        raise ValueError(f"audio too short: {waveform.numel()} samples at 16 kHz, at least {MIN_SAMPLES} "
                         f"({1000 * MIN_SAMPLES / SAMPLE_RATE:.1f} ms) are needed")
    return waveform


def resample_to_16k(waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Band-limited resampling (libsoxr, high quality) of mono float samples to the model's 16 kHz."""
    if sample_rate == SAMPLE_RATE:
        return waveform
    import soxr

    resampled = soxr.resample(waveform.cpu().numpy(), sample_rate, SAMPLE_RATE, quality="HQ")
    return torch.from_numpy(np.ascontiguousarray(resampled, dtype=np.float32)).to(waveform.device)


def _mix_down(waveform: torch.Tensor) -> torch.Tensor:
    rows, cols = waveform.shape
    if rows <= MAX_CHANNELS:
        return waveform.to(torch.float32).mean(dim=0)
    if cols <= MAX_CHANNELS:
        return waveform.to(torch.float32).mean(dim=1)
    raise ValueError(f"2-D waveform of shape {(rows, cols)}: expected [channels, samples] or [samples, channels] "
                     f"with at most {MAX_CHANNELS} channels")
