"""The built-in default model: a small random Qwen3-Omni written to disk in the released checkpoint's layout.

It lets the command line and the benchmarks run on a fresh machine with nothing downloaded, through the same loader
a real checkpoint goes through. Its answers are random tokens; it has no tokenizer.
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

from omni_runtime.config import MoeTextConfig, OmniConfig
from omni_runtime.models.thinker import Thinker

# Released special ids (spec section 2); the thinker is small: hidden 256, 4 MoE layers, 16 experts, top-4.
DEMO_CONFIG = {
    "model_type": "qwen3_omni_moe",
    "im_start_token_id": 151644, "im_end_token_id": 151645, "system_token_id": 8948, "user_token_id": 872,
    "assistant_token_id": 77091, "tts_pad_token_id": 151671, "tts_bos_token_id": 151672, "tts_eos_token_id": 151673,
    "thinker_config": {
        "audio_token_id": 151675, "image_token_id": 151655, "video_token_id": 151656,
        "audio_start_token_id": 151669, "vision_start_token_id": 151652, "position_id_per_seconds": 13,
        "text_config": {
            "vocab_size": 152064, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
            "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 512, "moe_intermediate_size": 128,
            "num_experts": 16, "num_experts_per_tok": 4, "norm_topk_prob": True, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [6, 5, 5],
                                "interleaved": True},
            "max_position_embeddings": 8192, "decoder_sparse_step": 1, "mlp_only_layers": [],
        },
    },
}


def random_thinker(cfg: MoeTextConfig, seed: int, std: float = 0.02) -> Thinker:
    generator = torch.Generator().manual_seed(seed)
    thinker = Thinker(cfg)
    with torch.no_grad():
        for name, param in thinker.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return thinker


def checkpoint_tensors(thinker: Thinker) -> dict[str, torch.Tensor]:
    """The thinker's weights under their on-disk names: ``thinker.`` prefix, one Linear per expert."""
    tensors = {}
    for name, tensor in thinker.state_dict().items():
        layer, _, kind = name.rpartition(".")
        if kind == "gate_up_proj":
            gate, up = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                tensors[f"thinker.{layer}.{e}.gate_proj.weight"] = gate[e].contiguous()
                tensors[f"thinker.{layer}.{e}.up_proj.weight"] = up[e].contiguous()
        elif kind == "down_proj" and tensor.dim() == 3:
            for e in range(tensor.shape[0]):
                tensors[f"thinker.{layer}.{e}.down_proj.weight"] = tensor[e].contiguous()
        else:
            tensors[f"thinker.{name}"] = tensor.contiguous()
    return tensors


def write_random_checkpoint(path: str | Path, config: dict | None = None, seed: int = 0) -> Path:
    """Write ``config.json`` and a random ``model.safetensors`` (thinker only) to ``path``."""
    path = Path(path)
    config = copy.deepcopy(config or DEMO_CONFIG)
    thinker = random_thinker(OmniConfig.from_dict(config).thinker_text, seed)
    path.mkdir(parents=True, exist_ok=True)
    save_file(checkpoint_tensors(thinker), path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def demo_checkpoint(seed: int = 0) -> Path:
    """The built-in model's folder, written once into the user's cache (``OMNI_RUNTIME_CACHE`` overrides)."""
    cache = Path(os.environ.get("OMNI_RUNTIME_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                 / "omni-runtime")
    folder = cache / f"demo-v1-seed{seed}"
    if not (folder / "config.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cache))
        write_random_checkpoint(staging, seed=seed)
        try:
            staging.rename(folder)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    return folder
