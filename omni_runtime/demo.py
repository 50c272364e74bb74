"""The built-in default model: a small random Qwen3-Omni written to disk in the released checkpoint's layout.

It lets the command line and the benchmarks run on a fresh machine with nothing downloaded, through the same loader
a real checkpoint goes through. Its answers are random tokens and its speech is noise; it has no tokenizer.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from omni_runtime.models.code2wav import Code2Wav
from omni_runtime.models.talker import Talker
from omni_runtime.models.thinker import Thinker


def _rope(sections: list[int]) -> dict:
    return {"rope_type": "default", "rope_theta": 1e6, "mrope_section": sections, "interleaved": True}


# Released special ids (spec section 2); small widths: thinker hidden 256 (4 MoE layers, 16 experts, top-4),
# talker hidden 128 (2 layers, 16 experts, top-4, shared expert), code predictor 2 layers, Code2Wav hidden 64.
DEMO_CONFIG = {
    "model_type": "qwen3_omni_moe", "enable_audio_output": True,
    "im_start_token_id": 151644, "im_end_token_id": 151645, "system_token_id": 8948, "user_token_id": 872,
    "assistant_token_id": 77091, "tts_pad_token_id": 151671, "tts_bos_token_id": 151672, "tts_eos_token_id": 151673,
    "thinker_config": {
        "audio_token_id": 151675, "image_token_id": 151655, "video_token_id": 151656,
        "audio_start_token_id": 151669, "vision_start_token_id": 151652, "position_id_per_seconds": 13,
        "text_config": {
            "vocab_size": 152064, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
            "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 512, "moe_intermediate_size": 128,
            "num_experts": 16, "num_experts_per_tok": 4, "norm_topk_prob": True, "rms_norm_eps": 1e-6,
            "rope_parameters": _rope([6, 5, 5]), "max_position_embeddings": 8192,
        },
    },
    "talker_config": {
        "num_code_groups": 16, "accept_hidden_layer": 2, "thinker_hidden_size": 256, "codec_eos_token_id": 2150,
        "codec_pad_id": 2148, "codec_bos_id": 2149, "codec_nothink_id": 2155, "codec_think_bos_id": 2156,
        "codec_think_eos_id": 2157, "speaker_id": {"chelsie": 2301, "ethan": 2302, "aiden": 2303},
        "spatial_merge_size": 2, "position_id_per_seconds": 13,
        "text_config": {
            "vocab_size": 3072, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 256, "moe_intermediate_size": 64,
            "shared_expert_intermediate_size": 128, "num_experts": 16, "num_experts_per_tok": 4,
            "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_parameters": _rope([6, 5, 5]),
            "max_position_embeddings": 16384,
        },
        "code_predictor_config": {
            "vocab_size": 2048, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 256, "num_code_groups": 16,
            "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        },
    },
    "code2wav_config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 4, "intermediate_size": 128, "decoder_dim": 96, "sliding_window": 72},
}


def _released_rope() -> dict:
    return _rope([24, 20, 20])


# The released Qwen3-Omni-30B-A3B sizes (spec section 2), for benchmarks with random weights on a GPU (~35 B
# parameters: 70 GB in bf16). The encoders are built only when asked (OmniModel.random(encoders=True)): the audio
# encoder's class defaults are the release's but for output_dim, the vision encoder's are the release's.
RELEASED_CONFIG = {
    **{k: v for k, v in DEMO_CONFIG.items() if k.endswith("_token_id") or k in ("model_type", "enable_audio_output")},
    "thinker_config": {
        **{k: v for k, v in DEMO_CONFIG["thinker_config"].items() if k != "text_config"},
        "audio_config": {"output_dim": 2048},
        "vision_config": {},
        "text_config": {
            "vocab_size": 152064, "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
            "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 768, "moe_intermediate_size": 768,
            "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "rms_norm_eps": 1e-6,
            "rope_parameters": _released_rope(), "max_position_embeddings": 65536,
        },
    },
    "talker_config": {
        **{k: v for k, v in DEMO_CONFIG["talker_config"].items() if not k.endswith("_config")},
        "accept_hidden_layer": 24, "thinker_hidden_size": 2048,
        "text_config": {
            "vocab_size": 3072, "hidden_size": 1024, "num_hidden_layers": 20, "num_attention_heads": 16,
            "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 2048, "moe_intermediate_size": 384,
            "shared_expert_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 6,
            "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_parameters": _released_rope(),
            "max_position_embeddings": 65536,
        },
        "code_predictor_config": {
            "vocab_size": 2048, "hidden_size": 1024, "num_hidden_layers": 5, "num_attention_heads": 16,
            "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072, "num_code_groups": 16,
            "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        },
    },
    "code2wav_config": {},   # the class defaults are the released Code2Wav
}


def random_init_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Fan-in scaled normal weights, unit norms, zero biases and SnakeBeta exponents, 0.1 residual scales; drawn
    in place on the parameters' device and dtype."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            leaf = name.rpartition(".")[2]
            if leaf == "bias" or leaf in ("alpha", "beta"):
                param.zero_()
            elif leaf in ("scale", "gamma"):
                param.fill_(0.1)
            elif param.dim() == 1:
                param.fill_(1.0)
            else:
                fan_in = param[0].numel() if "experts" not in name else param[0, 0].numel()
                param.normal_(0.0, fan_in**-0.5, generator=generator)
    return module


def random_module(build, dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> nn.Module:
    """``build()`` on the meta device, then its parameters made on ``device`` in ``dtype`` and initialised."""
    with torch.device("meta"):
        module = build()
    module.load_state_dict({n: torch.empty(p.shape, dtype=dtype, device=device) for n, p in module.named_parameters()},
                           assign=True)
    random_init_(module, generator)
    if isinstance(module, Code2Wav):
        with torch.no_grad():
            module.decoder[-1].conv.weight.mul_(0.02)   # keep the noise well inside the final clamp to [-1, 1]
    return module


def checkpoint_tensors(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The module's weights under their on-disk names: ``prefix`` + name, one Linear per expert."""
    tensors = {}
    for name, tensor in module.state_dict().items():
        layer, _, kind = name.rpartition(".")
        if layer.endswith("experts") and kind in ("gate_up_proj", "down_proj"):
            parts = {"gate_proj": 0, "up_proj": 1} if kind == "gate_up_proj" else {"down_proj": None}
            for e in range(tensor.shape[0]):
                for proj, half in parts.items():
                    weight = tensor[e] if half is None else tensor[e].chunk(2, dim=0)[half]
                    tensors[f"{prefix}{layer}.{e}.{proj}.weight"] = weight.contiguous()
        else:
            tensors[f"{prefix}{name}"] = tensor.contiguous()
    return tensors


def write_random_checkpoint(path: str | Path, config: dict | None = None, seed: int = 0) -> Path:
    """Write ``config.json`` and a random ``model.safetensors`` (thinker text, talker, Code2Wav) to ``path``."""
    from omni_runtime.api import OmniModel

    path = Path(path)
    config = copy.deepcopy(config or DEMO_CONFIG)
    model = OmniModel.random(config, seed=seed)
    tensors = checkpoint_tensors(model.thinker, Thinker.checkpoint_prefix)
    if model.talker is not None:
        tensors |= checkpoint_tensors(model.talker, Talker.checkpoint_prefix)
        tensors |= checkpoint_tensors(model.code2wav, "code2wav.")
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def demo_checkpoint(seed: int = 0) -> Path:
    """The built-in model's folder, written once into the user's cache (``OMNI_RUNTIME_CACHE`` overrides)."""
    cache = Path(os.environ.get("OMNI_RUNTIME_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                 / "omni-runtime")
    folder = cache / f"demo-v3-seed{seed}"
    if not (folder / "config.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache))
        write_random_checkpoint(staging, seed=seed)
        try:
            staging.rename(folder)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    return folder
