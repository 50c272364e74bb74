"""Log-mel features equal to transformers' WhisperFeatureExtractor as Qwen3-Omni's processor sets it up, and the audio
encoder (AuT) equal to the reference audio tower on the same checkpoint, loaded from disk as a user would."""
import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from omni_runtime.loader import checkpoint_files, load_weights
from omni_runtime.models import audio_encoder
from omni_runtime.models.audio_encoder import AudioEncoder, AudioEncoderConfig, audio_token_count
from omni_runtime.preprocess import log_mel_features, mel_filter_bank

PREFIX = "thinker.audio_tower."
# (atol, rtol) against the reference; on CPU both dtypes have come out bit-identical so far.
TOLERANCES = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


# ---------------------------------------------------------------------------------------------------------- features

def qwen3_omni_feature_extractor():
    """WhisperFeatureExtractor configured as the released preprocessor_config.json does (no download)."""
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400, chunk_length=300,
                                   padding_value=0.0, dither=0.0, return_attention_mask=True)


def reference_features(waveform: np.ndarray) -> torch.Tensor:
    # The processor's audio_kwargs: padding=True, truncation=False, return_attention_mask=True.
    out = qwen3_omni_feature_extractor()(waveform, sampling_rate=16000, padding=True, truncation=False,
                                         return_attention_mask=True, return_tensors="pt")
    mask = out["attention_mask"][0].bool()
    return out["input_features"][0][:, mask]


def waveform(kind: str, seconds: float, seed: int = 0) -> np.ndarray:
    samples = int(seconds * 16000) + 37  # not a multiple of the hop
    if kind == "sine":
        t = np.arange(samples) / 16000
        return (0.5 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3150 * t)).astype(np.float32)
    return (0.1 * np.random.default_rng(seed).standard_normal(samples)).astype(np.float32)


def test_mel_filter_bank_equals_transformers():
    from transformers.audio_utils import mel_filter_bank as hf_mel_filter_bank

    expected = hf_mel_filter_bank(num_frequency_bins=201, num_mel_filters=128, min_frequency=0.0,
                                  max_frequency=8000.0, sampling_rate=16000, norm="slaney", mel_scale="slaney")
    ours = mel_filter_bank()
    assert ours.shape == (201, 128) and ours.dtype == np.float64
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("seconds", [0.3, 2.5, 9.7])
@pytest.mark.parametrize("kind", ["noise", "sine"])
def test_log_mel_features_match_processor(kind, seconds):
    audio = waveform(kind, seconds)
    expected = reference_features(audio)
    features, length = log_mel_features(audio, 16000)
    assert features.dtype == torch.float32 and length == len(audio) // 160 == features.shape[1]
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)
    features64, _ = log_mel_features(torch.from_numpy(audio.astype(np.float64)), 16000)
    torch.testing.assert_close(features64, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_multichannel_is_mixed_down_by_averaging(layout):
    left, right = waveform("noise", 0.5, seed=1), waveform("sine", 0.5)
    stereo = np.stack([left, right]) if layout == "channels_first" else np.stack([left, right], axis=1)
    features, _ = log_mel_features(stereo, 16000)
    expected, _ = log_mel_features((left + right) / 2, 16000)
    torch.testing.assert_close(features, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("audio, sample_rate, message", [
    (np.zeros(0, np.float32), 16000, "empty"),
    (np.array([0.1] * 800 + [np.nan], np.float32), 16000, "NaN or Inf"),
    (np.array([0.1] * 800 + [np.inf], np.float32), 16000, "NaN or Inf"),
    (np.zeros(800, np.float32), 0, "positive"),
    (np.zeros(800, np.float32), -16000, "positive"),
    (np.zeros(800, np.float32), 16000.5, "positive integer"),
    (np.zeros(800, np.float32), 16, "outside the supported 4-384 kHz"),
    (np.zeros(800, np.float32), 768000, "outside the supported"),
    (np.zeros(40 * 60 * 16000 + 1, np.float32), 16000, "maximum is 40 minutes"),
    (np.zeros(150, np.float32), 16000, "too short"),
    (np.zeros(800, np.int16), 16000, "int16"),
    (np.zeros((2, 2, 800), np.float32), 16000, "1-D"),
    (np.zeros((16, 800), np.float32), 16000, "at most 8 channels"),
    ([0.0] * 800, 16000, "numpy array or a torch tensor"),
], ids=["empty", "nan", "inf", "rate-0", "rate-negative", "rate-fraction", "rate-khz", "rate-high", "over-40-min",
        "too-short", "int16", "3-d", "16-channels", "list"])
def test_log_mel_features_rejects_bad_input(audio, sample_rate, message):
    with pytest.raises(ValueError, match=message):
        log_mel_features(audio, sample_rate)


def test_an_integral_float_rate_is_a_rate():
    audio = np.random.default_rng(0).standard_normal(1600).astype(np.float32) * 0.1
    torch.testing.assert_close(log_mel_features(audio, 16000.0)[0], log_mel_features(audio, 16000)[0])


@pytest.mark.parametrize("sample_rate", [8000, 22050, 44100, 48000])
def test_other_sample_rates_are_resampled_band_limited(sample_rate):
    # A 440 Hz tone at any rate becomes the same 16 kHz tone: features close to those of the tone made at 16 kHz,
    # and the same frame count as its duration gives.
    seconds = 1.3
    tone = lambda rate: (0.5 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)  # noqa: E731
    features, length = log_mel_features(tone(sample_rate), sample_rate)
    expected, expected_length = log_mel_features(tone(16000), 16000)
    assert abs(length - expected_length) <= 1
    n = min(length, expected_length) - 2          # the edges see the resampler's filter transient
    torch.testing.assert_close(features[:, 2:n], expected[:, 2:n], atol=0.05, rtol=0)


def test_too_long_is_judged_at_the_input_rate():
    with pytest.raises(ValueError, match="maximum is 40 minutes"):
        log_mel_features(np.zeros(40 * 60 * 8000 + 8, np.float32), 8000)


# ----------------------------------------------------------------------------------------------------------- encoder

def load_encoder(folder, audio_config: dict, dtype: torch.dtype) -> AudioEncoder:
    with torch.device("meta"):
        encoder = AudioEncoder(AudioEncoderConfig.from_dict(audio_config))
    load_weights(encoder, checkpoint_files(folder), PREFIX, dtype, torch.device("cpu"))
    return encoder.eval()


@pytest.fixture(scope="module")
def tiny(reference_checkpoint):
    """(ours by dtype, reference by dtype) for the shared tiny checkpoint: d_model 32, n_window 50, windows of 104."""
    folder, hf_model = reference_checkpoint()
    audio_config = json.loads((folder / "config.json").read_text())["thinker_config"]["audio_config"]
    tower = hf_model.thinker.model.audio_tower
    ours = {dtype: load_encoder(folder, audio_config, dtype) for dtype in TOLERANCES}
    reference = {torch.float32: tower, torch.bfloat16: copy.deepcopy(tower).to(torch.bfloat16)}
    return ours, reference, hf_model


@pytest.fixture(scope="module")
def wide_weights(tmp_path_factory):
    """A reference encoder with O(1) activations (every weight and bias random), windows of 52 tokens and conv groups
    of 3 chunks, written to disk as the checkpoint lays it out."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeAudioEncoderConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeAudioEncoder

    audio_config = dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=96,
                        d_model=48, output_dim=40, n_window=50, n_window_infer=400, conv_chunksize=3,
                        downsample_hidden_size=8)
    torch.manual_seed(3)
    tower = Qwen3OmniMoeAudioEncoder(Qwen3OmniMoeAudioEncoderConfig(**audio_config)).eval()
    with torch.no_grad():
        for name, param in tower.named_parameters():
            fan_in = param[0].numel() if param.ndim > 1 else 1
            scale = fan_in**-0.5 if param.ndim > 1 else 0.3
            param.copy_(torch.randn(param.shape) * scale + (1.0 if "norm" in name and "weight" in name else 0.0))
    folder = tmp_path_factory.mktemp("audio_tower")
    save_file({PREFIX + name: t.contiguous() for name, t in tower.state_dict().items()}, folder / "model.safetensors")
    return load_encoder(folder, audio_config, torch.float32), tower


def encode_both(ours, reference, lengths, seed=0):
    features = torch.randn(128, sum(lengths), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = reference(features, feature_lens=torch.tensor(lengths)).last_hidden_state
        actual = ours(features, lengths)
    return actual, expected


def test_position_table_is_each_encoders_own():
    # a buffer of each encoder (made on the CPU even in a meta-device build), not a checkpoint tensor, not shared
    cfg = AudioEncoderConfig.from_dict({"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2,
                                        "encoder_ffn_dim": 64, "output_dim": 16, "downsample_hidden_size": 4})
    with torch.device("meta"):
        first, second = AudioEncoder(cfg), AudioEncoder(cfg)
    assert first.positions.device.type == "cpu" and first.positions.shape == (cfg.max_source_positions, 32)
    assert "positions" not in first.state_dict()
    first.positions.zero_()
    assert second.positions.abs().sum() > 0


def test_audio_token_count():
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    assert audio_token_count(250) == 33 and audio_token_count(950) == 124
    lengths = torch.arange(1, 2500)
    assert [audio_token_count(n) for n in lengths.tolist()] == _get_feat_extract_output_lengths(lengths).tolist()


# 1700 frames = 221 tokens: windows of 104, 104 and 13.
@pytest.mark.parametrize("lengths", [[1], [99], [250], [950], [1700], [250, 950, 1700, 37], [37, 80]],
                         ids=lambda lengths: "+".join(map(str, lengths)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_encoder_matches_reference(tiny, dtype, lengths):
    ours, reference, _ = tiny
    actual, expected = encode_both(ours[dtype], reference[dtype], lengths)
    assert actual.shape == (sum(audio_token_count(n) for n in lengths), 64) and actual.dtype == dtype
    atol, rtol = TOLERANCES[dtype]
    # torch 2.11's CPU bf16 kernels give NaN for a one-frame audio in the reference too: NaN must match NaN
    scale = expected.float().nan_to_num().abs().max().item()
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol, equal_nan=True)


@pytest.mark.parametrize("lengths", [[1700], [37], [37, 250], [480, 37, 1010, 99], [37, 80]],
                         ids=lambda lengths: "+".join(map(str, lengths)))
def test_encoder_matches_reference_with_other_windows_and_conv_groups(wide_weights, lengths, monkeypatch):
    # 1700 frames = 221 tokens: four windows of 52 and one of 13; at most two windows per attention call.
    monkeypatch.setattr(audio_encoder, "MAX_WINDOWS_PER_CALL", 2)
    ours, reference = wide_weights
    actual, expected = encode_both(ours, reference, lengths)
    assert expected.abs().max() > 0.3  # O(1) activations, so the tolerance means something
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_batched_call_pads_short_audio_like_reference(wide_weights):
    """A <100-frame audio encoded next to a longer one is zero-padded to 100 frames before the convs, in the reference
    and here; that changes its tokens (nonzero conv biases leak through the padding), so both cases are checked."""
    ours, reference = wide_weights
    alone, expected_alone = encode_both(ours, reference, [37])
    batched, expected_batched = encode_both(ours, reference, [37, 250])
    assert (expected_batched[:alone.shape[0]] - expected_alone).abs().max() > 1e-3
    torch.testing.assert_close(alone, expected_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched, expected_batched, atol=1e-5, rtol=1e-5)


def test_list_input_equals_concatenated_input(tiny):
    ours = tiny[0][torch.float32]
    parts = [torch.randn(128, n, generator=torch.Generator().manual_seed(n)) for n in (250, 37, 1020)]
    with torch.no_grad():
        from_list = ours(parts)
        from_concat = ours(torch.cat(parts, dim=1), [250, 37, 1020])
        from_list_with_lengths = ours(parts, torch.tensor([250, 37, 1020]))
    torch.testing.assert_close(from_list, from_concat, atol=0, rtol=0)
    torch.testing.assert_close(from_list_with_lengths, from_concat, atol=0, rtol=0)


def test_waveform_to_audio_tokens_match_reference(tiny):
    """Waveform -> processor features -> ``get_audio_features`` against log_mel_features -> our encoder."""
    ours, _, hf_model = tiny
    audio = waveform("noise", 2.5, seed=5)
    out = qwen3_omni_feature_extractor()(audio, sampling_rate=16000, padding=True, truncation=False,
                                         return_attention_mask=True, return_tensors="pt")
    with torch.no_grad():
        expected = hf_model.thinker.get_audio_features(
            input_features=out["input_features"], feature_attention_mask=out["attention_mask"]).last_hidden_state
        features, _ = log_mel_features(audio, 16000)
        actual = ours[torch.float32]([features])
    torch.testing.assert_close(actual, expected, atol=1e-6 * expected.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("features, lengths, message", [
    (torch.zeros(80, 100), None, r"\[128, frames\]"),
    (torch.zeros(128), None, r"\[128, frames\]"),
    (np.zeros((128, 100), np.float32), None, r"\[128, frames\]"),
    ([], None, "empty list"),
    ([torch.zeros(128, 10), torch.zeros(64, 10)], None, r"every audio must be a \[128, frames\]"),
    ([torch.zeros(128, 10), torch.zeros(128, 20)], [10, 25], "disagree"),
    (torch.zeros(128, 100), [40, 50], "sum to the 100 frames"),
    (torch.zeros(128, 100), [100, 0], ">= 1"),
    (torch.zeros(128, 0), None, ">= 1"),
    (torch.zeros(128, 100, dtype=torch.long), None, "floating point"),
    (torch.full((128, 100), float("nan")), None, "NaN or Inf"),
], ids=["mel-bins", "1-d", "numpy", "empty-list", "list-mel-bins", "list-lengths", "lengths-sum", "zero-length",
        "no-frames", "integer", "nan"])
def test_encoder_rejects_bad_input(tiny, features, lengths, message):
    with pytest.raises(ValueError, match=message):
        tiny[0][torch.float32](features, lengths)


@pytest.mark.parametrize("overrides, message", [
    (dict(n_window_infer=60), "n_window_infer >= 2 \\* n_window"),
    (dict(activation_function="relu"), "not supported"),
    (dict(d_model=30, encoder_attention_heads=4), "divisible"),
    (dict(conv_chunksize=0), "conv_chunksize"),
])
def test_config_rejects_unsupported_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        AudioEncoderConfig.from_dict({"d_model": 32, "encoder_attention_heads": 4, **overrides})
