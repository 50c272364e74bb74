"""Random Qwen3-Omni checkpoints written by transformers, for parity tests and benchmarks.

Only tests and benchmarks import this (it needs transformers). Every config keeps the released model's special ids
(spec section 2) so that the runtime is exercised with the ids the real checkpoint uses.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

SPEAKERS = {"chelsie": 2301, "ethan": 2302, "aiden": 2303}


def omni_config_dict(
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    experts: int = 8,
    top_k: int = 2,
    moe_intermediate: int = 32,
    norm_topk_prob: bool = True,
    mrope_section: tuple[int, int, int] = (4, 2, 2),
    mlp_only_layers: list[int] | None = None,
    talker_hidden: int = 48,
    talker_layers: int = 2,
    talker_experts: int = 8,
    vocab: int = 152064,
    max_positions: int = 4096,
    accept_hidden_layer: int = 1,
    talker_position_id_per_seconds: int = 13,
) -> dict:
    """A small Qwen3-Omni config with the released special ids; the thinker text part is what varies."""
    text = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_positions, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(mrope_section),
                         "interleaved": True},
        num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=moe_intermediate,
        norm_topk_prob=norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=list(mlp_only_layers or []),
    )
    audio = dict(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32,
                 output_dim=hidden, n_window=50, n_window_infer=800, downsample_hidden_size=16)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=hidden,
                  deepstack_visual_indexes=[0, 1], patch_size=16, temporal_patch_size=2, spatial_merge_size=2)
    thinker = dict(text_config=text, audio_config=audio, vision_config=vision, position_id_per_seconds=13,
                   audio_token_id=151675, image_token_id=151655, video_token_id=151656,
                   audio_start_token_id=151669, user_token_id=872, vision_start_token_id=151652)
    talker_text = dict(vocab_size=3072, hidden_size=talker_hidden, intermediate_size=2 * talker_hidden,
                       num_hidden_layers=talker_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       num_experts=talker_experts, num_experts_per_tok=2, moe_intermediate_size=talker_hidden // 2 + 8,
                       shared_expert_intermediate_size=talker_hidden + 16,
                       norm_topk_prob=True, max_position_embeddings=max_positions,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                        "mrope_section": list(mrope_section), "interleaved": True})
    code_predictor = dict(vocab_size=2048, hidden_size=talker_hidden, intermediate_size=2 * talker_hidden,
                          num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_code_groups=16,
                          rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    talker = dict(text_config=talker_text, code_predictor_config=code_predictor, num_code_groups=16,
                  thinker_hidden_size=hidden, accept_hidden_layer=min(accept_hidden_layer, layers),
                  codec_eos_token_id=2150, codec_nothink_id=2155, codec_think_bos_id=2156, codec_think_eos_id=2157,
                  codec_pad_id=2148, codec_bos_id=2149, audio_token_id=151675, image_token_id=151655,
                  video_token_id=151656, vision_start_token_id=151652, audio_start_token_id=151669,
                  position_id_per_seconds=talker_position_id_per_seconds,
                  speaker_id=dict(SPEAKERS), spatial_merge_size=2)
    code2wav = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                    intermediate_size=64, decoder_dim=64, sliding_window=72)
    return dict(thinker_config=thinker, talker_config=talker, code2wav_config=code2wav, enable_audio_output=True,
                im_start_token_id=151644, im_end_token_id=151645, tts_pad_token_id=151671,
                tts_bos_token_id=151672, tts_eos_token_id=151673, system_token_id=8948, user_token_id=872,
                assistant_token_id=77091)


def build_reference_model(config: dict, seed: int = 0):
    """A randomly initialised transformers Qwen3-Omni, with what its own init leaves garbage re-initialised."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    torch.manual_seed(seed)
    hf_config = Qwen3OmniMoeConfig(**copy.deepcopy(config))
    model = Qwen3OmniMoeForConditionalGeneration(hf_config).eval()
    _reinit_talker_moe(model, seed)
    _reinit_code2wav(model, seed)
    return model


def _reinit_talker_moe(model, seed: int) -> None:
    # Spec pitfall 1: the talker's experts are torch.empty and its router zeros after the reference's own init.
    generator = torch.Generator().manual_seed(seed + 1)
    std = model.config.talker_config.text_config.initializer_range
    with torch.no_grad():
        for name, param in model.talker.named_parameters():
            if ".mlp.experts." in name or name.endswith("mlp.gate.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def _reinit_code2wav(model, seed: int) -> None:
    # Test-only init (spec section 5): the reference's own (std 0.02 convs, ConvNeXt gamma 1e-6, layer scale 0.01,
    # SnakeBeta alpha = beta = 0) gives a ~1e-7 waveform that tests nothing. Fan-in scaled weights, norms and scales
    # near 1 and random SnakeBeta parameters give an O(0.1) waveform with every block contributing.
    generator = torch.Generator().manual_seed(seed + 2)
    code2wav = model.code2wav
    with torch.no_grad():
        for name, param in code2wav.named_parameters():
            owner, leaf = code2wav.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            mean, std = 0.0, 0.1                                    # biases
            if isinstance(owner, nn.Embedding):
                std = 1.0
            elif isinstance(owner, nn.ConvTranspose1d):
                fan_in = owner.in_channels * owner.kernel_size[0] // owner.stride[0]
                std = 1.0 / fan_in**0.5 if leaf == "weight" else std
            elif leaf == "weight" and param.dim() >= 2:             # Linear [out, in], Conv1d [out, in / groups, k]
                # residual units add a third of their input; the output conv brings O(1) down to O(0.1)
                gain = 0.3 if ".conv2." in name else 0.05 if owner is code2wav.decoder[-1].conv else 1.0
                std = gain / param[0].numel() ** 0.5
            elif leaf in ("alpha", "beta"):                          # SnakeBeta, log scale
                std = 0.2
            elif leaf in ("weight", "scale", "gamma"):              # norms, LayerScale, ConvNeXt gamma
                mean = 1.0 if leaf == "weight" else 0.5
            param.copy_(mean + torch.randn(param.shape, generator=generator) * std)


def save_reference_checkpoint(path: Path, config: dict | None = None, seed: int = 0,
                              max_shard_size: str | None = None):
    """Build a random reference model and write it the way the released checkpoint is laid out on disk."""
    model = build_reference_model(config or omni_config_dict(), seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model
