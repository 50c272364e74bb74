"""Audio and vision encoder time and peak memory: omni-runtime against transformers' encoders, same weights.

    python bench/encoders.py [--device cpu] [--size tiny|released] [--audio-seconds 10 300 2400]
                             [--skip-reference-over 300]

Audio: 10 s, 5 min and 40 min of log-mel input. Vision: one 1280x720 image and 10 s of 1280x720 video at 2 fps,
preprocessed as the reference processor does. ``--size released`` uses the released encoder widths (GPU); the
default ``tiny`` ones fit a CPU run. Peak memory is CUDA's peak allocation on a GPU, the peak resident set size
(sampled) on CPU. Writes bench/results/encoders_<device>.json.
"""
from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import numpy as np
import torch
from common import environment, save, scratch_dir
from safetensors.torch import save_file

from omni_runtime.loader import checkpoint_files, load_weights
from omni_runtime.models.audio_encoder import AudioEncoder, AudioEncoderConfig
from omni_runtime.models.vision_encoder import VisionEncoder, VisionEncoderConfig
from omni_runtime.preprocess.vision import preprocess_image, preprocess_video

SIZES = {
    "tiny": (dict(encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=256, d_model=128, output_dim=256,
                  downsample_hidden_size=64),
             dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256,
                  deepstack_visual_indexes=[0, 1])),
    "released": (dict(output_dim=2048), dict(out_hidden_size=2048)),
}


class PeakMemory:
    """Peak memory of the block: CUDA's allocator peak, or the process's resident set sampled every 2 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def _rss(self) -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.peak = self._rss()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self.thread.join()
        self.extra_gib = (self.peak - self.base) / 2**30


def measure(fn, device, repeats: int = 3):
    """(output, {ms: median of ``repeats`` timed calls after an untimed one (Triton's JIT, cuBLAS start-up), peak
    memory beyond what was allocated before})."""
    def call():
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - start

    with PeakMemory(device) as memory, torch.no_grad():
        call()
        runs = [call() for _ in range(repeats)]
    out, seconds = runs[0][0], sorted(t for _, t in runs)[len(runs) // 2]
    return out, {"ms": 1e3 * seconds, "peak_extra_gib": round(memory.extra_gib, 3)}


def ours_from(reference: torch.nn.Module, build, prefix: str, dtype, device):
    """Our encoder loaded through the checkpoint loader from the reference module's weights."""
    folder = scratch_dir("omni-enc-")
    save_file({prefix + k: v.contiguous() for k, v in reference.state_dict().items()}, folder / "model.safetensors")
    with torch.device("meta"):
        module = build()
    load_weights(module, checkpoint_files(folder), prefix, dtype, device)
    return module.eval()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--size", choices=SIZES, default="tiny")
    p.add_argument("--audio-seconds", type=float, nargs="+", default=[10, 300, 2400])
    p.add_argument("--skip-reference-over", type=float, default=300,
                   help="audio longer than this many seconds runs ours only (the reference's full-length mask "
                        "would take tens of GB)")
    args = p.parse_args()
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
        Qwen3OmniMoeAudioEncoderConfig, Qwen3OmniMoeVisionEncoderConfig)
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoeAudioEncoder, Qwen3OmniMoeVisionEncoder)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    audio_cfg, vision_cfg = SIZES[args.size]
    torch.manual_seed(0)
    ref_audio = Qwen3OmniMoeAudioEncoder(Qwen3OmniMoeAudioEncoderConfig(**audio_cfg)).to(device, dtype).eval()
    ref_vision = Qwen3OmniMoeVisionEncoder(Qwen3OmniMoeVisionEncoderConfig(**vision_cfg)).to(device, dtype).eval()
    our_audio = ours_from(ref_audio, lambda: AudioEncoder(AudioEncoderConfig.from_dict(ref_audio.config.to_dict())),
                          "thinker.audio_tower.", dtype, device)
    build_vision = lambda: VisionEncoder(VisionEncoderConfig.from_dict(ref_vision.config.to_dict()))  # noqa: E731
    our_vision = ours_from(ref_vision, build_vision, "thinker.visual.", dtype, device)
    rows = []
    for seconds in args.audio_seconds:
        frames = int(seconds * 100)
        features = torch.randn(128, frames, device=device, dtype=dtype)
        out, mine = measure(lambda: our_audio([features]), device)
        row = {"input": f"audio {seconds:g} s", "omni_runtime": mine, "tokens": out.shape[0]}
        if seconds <= args.skip_reference_over:
            ref_out, theirs = measure(lambda: ref_audio(features, feature_lens=torch.tensor([frames], device=device))
                                      .last_hidden_state, device)
            row |= {"transformers": theirs, "max_abs_diff": (ref_out.float() - out.float()).abs().max().item()}
        rows.append(row)
        print(row)
    frame = np.random.default_rng(0).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
    media = {"image 1280x720": preprocess_image(frame),
             "video 10 s 1280x720 @2fps": preprocess_video(np.stack([frame] * 20), fps=2.0)[:2]}
    for name, (pixels, grid) in media.items():
        pixels, grid = pixels.to(device, dtype), grid.to(device)
        (out, _), mine = measure(lambda: our_vision(pixels, grid), device)
        ref_out, theirs = measure(lambda: ref_vision(pixels, grid_thw=grid).pooler_output, device)
        ref_out = torch.cat(ref_out) if isinstance(ref_out, (list, tuple)) else ref_out
        row = {"input": name, "grid_thw": grid.tolist(), "omni_runtime": mine, "transformers": theirs,
               "max_abs_diff": (ref_out.float() - out.float()).abs().max().item()}
        rows.append(row)
        print(row)
    path = save("encoders", {"bench": "encoders", "env": environment(device), "dtype": args.dtype,
                             "size": args.size, "rows": rows})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
