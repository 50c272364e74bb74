"""Turning raw inputs into what the encoders take (today: audio waveforms into log-mel features)."""
from omni_runtime.preprocess.audio import log_mel_features, mel_filter_bank

__all__ = ["log_mel_features", "mel_filter_bank"]
