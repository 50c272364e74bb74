"""Sweep launch configs of the Triton fused MoE on this GPU; write omni_kernels/configs/fused_moe/*.json.

    python bench/tune_fused_moe.py [--shapes thinker,talker] [--dtype bfloat16] [--tokens 1,2,4,...] [--quick]

Per token count T, on one random routing: decode sizes (T <= DECODE_MAX_TOKENS) time each GEMM (gate_up, down) over
its candidates on the decode rows; prefill sizes do so per BLOCK_M on the expert-sorted rows and keep the BLOCK_M
with the least align + gate_up + down time. Candidates that overflow shared memory or fail to compile are skipped.
Each GEMM is timed with triton.testing.do_bench, which flushes L2 between calls, so decode weights come from HBM.
The heuristic's own config (omni_kernels.moe.default_config) is always a candidate: a table never loses to it.
The winner is checked against fused_moe_ref before it is written. One file per (E, N=I, K=H, device, dtype), keyed
by token count; fused_moe picks the nearest token count on the same side of the decode/prefill split.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from common import ROOT

sys.path.insert(0, str(ROOT))
import omni_kernels as ok  # noqa: E402
from omni_kernels import moe  # noqa: E402

SHAPES = {"thinker": dict(E=128, top_k=8, I=768, H=2048), "talker": dict(E=128, top_k=6, I=384, H=1024)}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TOKENS = "1,2,4,8,16,24,32,48,64,96,128,256,512,1024,1536,2048,3072,4096"


def search_space(num_tokens: int, quick: bool) -> tuple[list[int], list[dict]]:
    """(BLOCK_M candidates, per-GEMM candidates) for a token count."""
    if num_tokens == 1:   # GEMV: no tensor cores, the tile is weight rows x columns per step
        space = dict(BLOCK_N=[16, 32] if quick else [8, 16, 32, 64], BLOCK_K=[128, 256, 512] if quick else
                     [64, 128, 256, 512, 1024], GROUP_M=[1], num_warps=[4] if quick else [2, 4, 8],
                     num_stages=[2] if quick else [1, 2, 3])
        block_ms = [1]
    elif num_tokens <= moe.DECODE_MAX_TOKENS:
        space = dict(BLOCK_N=[32, 64] if quick else [16, 32, 64, 128], BLOCK_K=[128] if quick else [64, 128, 256],
                     GROUP_M=[1], num_warps=[4] if quick else [4, 8], num_stages=[3] if quick else [2, 3, 4, 5])
        block_ms = [16]
    else:
        space = dict(BLOCK_N=[64, 128] if quick else [32, 64, 128, 256], BLOCK_K=[64] if quick else [32, 64, 128],
                     GROUP_M=[1, 8] if quick else [1, 8, 16], num_warps=[4, 8],
                     num_stages=[3] if quick else [2, 3, 4, 5])
        block_ms = [16, 64] if quick else [16, 32, 64, 128]
    return block_ms, [dict(zip(space, values)) for values in itertools.product(*space.values())]


def bench_ms(fn) -> float:
    import triton
    try:
        fn()  # compile
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=5, rep=25)
    except Exception as error:  # OutOfResources, a compile failure: not a candidate here
        print(f"    skip ({type(error).__name__})", flush=True)
        return float("inf")


def best_config(label: str, make_call, candidates: list[dict]) -> tuple[dict, float]:
    timed = [(bench_ms(make_call(cfg)), cfg) for cfg in candidates]
    ms, cfg = min(timed, key=lambda t: t[0])
    print(f"  {label}: {ms * 1e3:8.1f} us  {cfg}  ({len(candidates)} tried)", flush=True)
    return cfg, ms


def tune_tokens(shape: dict, num_tokens: int, dtype: torch.dtype, quick: bool, target: moe.GpuTarget,
                device="cuda") -> dict:
    E, top_k, inter, H = shape["E"], shape["top_k"], shape["I"], shape["H"]
    g = torch.Generator(device).manual_seed(num_tokens)
    rnd = lambda *s, scale=0.02: (torch.randn(*s, generator=g, device=device) * scale).to(dtype)  # noqa: E731
    router, w_gate_up, w_down = rnd(E, H), rnd(E, 2 * inter, H), rnd(E, H, inter)
    x = rnd(num_tokens, H, scale=1.0)
    weights, ids = moe.moe_route(torch.nn.functional.linear(x, router), top_k, True)
    block_ms, candidates = search_space(num_tokens, quick)
    decode = num_tokens <= moe.DECODE_MAX_TOKENS
    default = moe.default_config(num_tokens, top_k, E, inter, H, dtype, target)
    if not decode and default["BLOCK_M"] not in block_ms:
        block_ms = sorted(block_ms + [default["BLOCK_M"]])
    best = None
    for block_m in block_ms:
        rows = moe.moe_decode_rows(ids) if decode else moe.moe_align(ids, E, block_m)
        align_ms = 0.0 if decode else bench_ms(lambda: moe.moe_align(ids, E, block_m))

        def tried(role: str, weight_tiles: int) -> list[dict]:  # those that fit, and the heuristic's own
            fit = [c for c in candidates if moe.gemm_shared_memory(rows.block_m, c, weight_tiles, x.element_size(),
                                                                   target.capability) <= target.shared_memory]
            own = default[role] if decode or default["BLOCK_M"] == block_m else None
            return fit + [own] if own and own not in fit else fit

        h = moe.moe_gate_up(x, w_gate_up, rows, default["gate_up"])
        gate_up, gate_up_ms = best_config(f"T={num_tokens} BLOCK_M={rows.block_m} gate_up",
                                          lambda cfg: lambda: moe.moe_gate_up(x, w_gate_up, rows, cfg),
                                          tried("gate_up", 2))
        down, down_ms = best_config(f"T={num_tokens} BLOCK_M={rows.block_m} down",
                                    lambda cfg: lambda: moe.moe_down(h, w_down, weights, rows, cfg),
                                    tried("down", 1))
        total = align_ms + gate_up_ms + down_ms
        if best is None or total < best[0]:
            best = total, dict(BLOCK_M=block_m, gate_up=gate_up, down=down)
    config = best[1]
    # the experts on our routing (torch.topk breaks bf16 ties its own way, so the whole op may pick other experts)
    out = moe.fused_moe_triton(x, router, w_gate_up, w_down, top_k, True, config=config)
    tol = 1e-2 if dtype != torch.float32 else 1e-4
    torch.testing.assert_close(out, ok.moe_experts_ref(x, w_gate_up, w_down, weights, ids.long()), atol=tol, rtol=tol)
    print(f"T={num_tokens}: {best[0] * 1e3:.1f} us with {config}", flush=True)
    return config


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="thinker,talker")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--tokens", default=TOKENS)
    p.add_argument("--quick", action="store_true", help="a small search space (minutes instead of hours)")
    p.add_argument("--out-dir", default=str(moe.CONFIG_DIR))
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_fused_moe.py needs a CUDA GPU: it times the Triton kernels on the device it writes configs for")
    device = torch.device("cuda")
    target = moe.gpu_target(device)
    dtype = DTYPES[args.dtype]
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        start = time.time()
        path = Path(args.out_dir) / moe.config_file_name(shape["E"], shape["I"], shape["H"], dtype,
                                                         torch.cuda.get_device_name(device))
        path.parent.mkdir(parents=True, exist_ok=True)
        # written after every token count to <table>.partial, which the runtime never reads (the nearest entry of a
        # partial table could be far from a token count it lacks): a cut-short run keeps what it measured
        partial, table = path.with_name(path.name + ".partial"), {}
        for t in map(int, args.tokens.split(",")):
            table[str(t)] = tune_tokens(shape, t, dtype, args.quick, target)
            partial.write_text(json.dumps(table, indent=1) + "\n")
        partial.replace(path)
        print(f"{name}: wrote {path} in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
