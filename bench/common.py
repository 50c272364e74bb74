"""Shared pieces of the benchmark scripts: environment rows, timing, result files."""
from __future__ import annotations

import argparse
import atexit
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
sys.path.insert(0, str(ROOT / "tests"))  # hf_checkpoints: random reference checkpoints written by transformers


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "git_sha": sha.strip() or None, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def timed(fn, device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, synchronising the GPU around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def median_of(fn, device: torch.device, repeats: int) -> float:
    return statistics.median(timed(fn, device) for _ in range(repeats))


def scratch_dir(prefix: str) -> Path:
    """A temporary folder (the random checkpoints a benchmark writes, ~1 GB with the real vocabulary), removed when
    the script exits."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


# Datasheet peaks by the device name's model: HBM bytes/s and dense bf16 FLOP/s
PEAK_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}


def peak(table: dict, device_name: str) -> float | None:
    return next((value for key, value in table.items() if key in device_name), None)


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in result["env"]["device"].split(" (")[0]).lower()
    path = RESULTS / f"{name}_{slug}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def model_parser(doc: str) -> argparse.ArgumentParser:
    """Arguments shared by the scripts that build a random checkpoint: device, dtype, thinker size, repeats."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch CPU threads for both runtimes (default: torch's choice)")
    return p


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def model_config(args: argparse.Namespace, **overrides) -> dict:
    """``tests/hf_checkpoints.omni_config_dict`` arguments for the thinker size the flags ask for."""
    return dict(hidden=args.hidden, layers=args.layers, heads=8, kv_heads=2, head_dim=args.hidden // 8,
                experts=args.experts, top_k=args.top_k, moe_intermediate=args.hidden // 2,
                mrope_section=(args.hidden // 48, args.hidden // 64, args.hidden // 64)) | overrides
