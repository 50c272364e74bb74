"""Load a Hugging Face Qwen3-Omni checkpoint (safetensors only) into modules built on the meta device.

The checkpoint stores one Linear per expert (``...mlp.experts.{e}.gate_proj.weight`` etc.); the runtime keeps them
fused per layer as ``experts.gate_up_proj`` (E, 2I, H), gate rows first, and ``experts.down_proj`` (E, H, I), the
layout the MoE kernels read. Every other tensor keeps its on-disk name below the component's prefix. Shards are
memory-mapped and resolved through ``model.safetensors.index.json``; nothing is unpickled, ever.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"
_EXPERT_KEY = re.compile(
    r"^(?P<layer>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


# Rotary inverse frequencies some exports save (transformers keeps them as non-persistent buffers, recomputed from
# the config, and loads past them): not weights, so not tensors of the checkpoint.
_DERIVED_BUFFER = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Map every tensor name of the checkpoint in ``path`` to the safetensors file holding it (derived buffers
    left out)."""
    files = _tensor_files(Path(path))
    return {name: shard for name, shard in files.items() if not _DERIVED_BUFFER.search(name)}


def _tensor_files(path: Path) -> dict[str, Path]:
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from e
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise ValueError(f"{index}: not a valid safetensors index (weight_map must map tensor names to "
                             "shard file names)")
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise FileNotFoundError(f"shard {shard.name} listed in {INDEX_FILE} is missing from {path}")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(f"{path} holds only pickle checkpoints ({', '.join(pickles)}); omni-runtime loads "
                             "safetensors only, since unpickling can run arbitrary code. Convert them first.")
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    files = {}
    for shard in shards:
        with _open(shard) as f:
            files.update({name: shard for name in f.keys()})
    return files


def _open(shard: Path):
    try:
        return safe_open(shard, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{shard}: corrupt or unreadable safetensors file ({e})") from e


@dataclass(frozen=True, slots=True)
class _Target:
    param: str
    index: tuple  # where in the parameter the on-disk tensor goes; () for the whole tensor
    shape: tuple[int, ...]


def _target(name: str, params: dict[str, nn.Parameter]) -> _Target | None:
    match = _EXPERT_KEY.match(name)
    if match is None:
        return _Target(name, (), tuple(params[name].shape)) if name in params else None
    layer, expert, proj = match["layer"], int(match["expert"]), match["proj"]
    fused = f"{layer}.down_proj" if proj == "down_proj" else f"{layer}.gate_up_proj"
    if fused not in params or expert >= params[fused].shape[0]:
        return None
    shape = tuple(params[fused].shape[1:])
    if proj == "down_proj":
        return _Target(fused, (expert,), shape)
    inter = shape[0] // 2
    rows = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
    return _Target(fused, (expert, rows), (inter, shape[1]))


def load_weights(
    module: nn.Module,
    files: dict[str, Path],
    prefix: str,
    dtype: torch.dtype,
    device: torch.device,
    exclude: Iterable[str] = (),
    tied: dict[str, str] | None = None,
) -> None:
    """Fill ``module`` (built on the meta device) with the tensors named ``prefix + <param name>``.

    ``tied`` maps parameters to the ones they share (``tie_word_embeddings``: transformers does not save them, and
    ties them whether saved or not).

    The module owns every tensor under ``prefix`` except those under the ``exclude`` prefixes (sub-components
    loaded on their own, e.g. the audio tower inside ``thinker.``). An owned tensor the module has no place for, a
    parameter the checkpoint lacks and a shape mismatch are errors naming the tensor.
    """
    params = dict(module.named_parameters())
    tensors = {name: torch.empty(p.shape, dtype=dtype, device=device) for name, p in params.items()}
    expected = {name: p.numel() for name, p in params.items()}
    loaded = dict.fromkeys(params, 0)
    unknown = []
    by_shard: dict[Path, list[tuple[str, _Target]]] = {}
    for key, shard in files.items():
        if not key.startswith(prefix) or any(key.startswith(p) for p in exclude):
            continue
        target = _target(key[len(prefix):], params)
        if target is None:
            unknown.append(key)
        else:
            by_shard.setdefault(shard, []).append((key, target))
    if unknown:
        raise ValueError(f"checkpoint has {len(unknown)} unknown tensors, e.g. {', '.join(sorted(unknown)[:5])}")

    total_bytes = sum(shard.stat().st_size for shard in by_shard)
    for shard, entries in tqdm(sorted(by_shard.items()), desc=f"loading {prefix.rstrip('.')}", unit="shard",
                               disable=total_bytes < 2**30):
        with _open(shard) as f:
            present = set(f.keys())
            for key, target in entries:
                if key not in present:
                    raise _not_in_shard(key, shard)
                shape = tuple(f.get_slice(key).get_shape())
                if shape != target.shape:
                    raise ValueError(f"tensor {key} has shape {shape}, the config expects {target.shape}")
                try:
                    tensor = f.get_tensor(key)
                except SafetensorError as e:
                    raise ValueError(f"{shard}: corrupt or unreadable safetensors file ({e})") from e
                tensors[target.param][target.index].copy_(tensor)
                loaded[target.param] += torch.Size(shape).numel()
    for name, source in (tied or {}).items():
        tensors[name], loaded[name] = tensors[source], expected[name]
    missing = [f"{prefix}{name}" for name, count in loaded.items() if count != expected[name]]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors (or parts of fused ones), "
                         f"e.g. {', '.join(missing[:5])}")
    module.load_state_dict(tensors, strict=True, assign=True)


def _not_in_shard(key: str, shard: Path) -> ValueError:
    index = shard.parent / INDEX_FILE
    if index.is_file():
        return ValueError(f"{index} maps tensor {key} to shard {shard.name}, which does not contain it")
    return ValueError(f"{shard} does not contain tensor {key}")


def check_components(files: dict[str, Path], prefixes: Iterable[str]) -> None:
    """Every tensor of the checkpoint must belong to one of the model's components."""
    prefixes = tuple(prefixes)
    unknown = sorted(key for key in files if not key.startswith(prefixes))
    if unknown:
        raise ValueError(f"checkpoint has {len(unknown)} unknown tensors, e.g. {', '.join(unknown[:5])}")
