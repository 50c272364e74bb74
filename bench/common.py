"""Shared pieces of the benchmark scripts: environment rows, timing, result files."""
from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
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


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in result["env"]["device"].split(" (")[0]).lower()
    path = RESULTS / f"{name}_{slug}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
