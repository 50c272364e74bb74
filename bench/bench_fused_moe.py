"""fused_moe on a GPU at Qwen3-Omni shapes: ours (Triton, CUDA) against the torch reference and transformers grouped_mm.

    python bench/bench_fused_moe.py [--dtype bfloat16] [--shapes thinker,talker] [--tokens 1,2,4,8,16,64,512,4096]

Implementations, all on the same weights and tokens:
  triton          the whole op (router GEMM, routing kernel, expert GEMMs, combine) as fused_moe dispatches it
  triton_experts  the experts alone given the routing (sort/align, both GEMMs, combine): the HBM-bound part
  cuda            the whole op on the CUDA extension (torch.ops.omni.fused_moe; opt-in in the dispatch until these
                  rows show it beats triton), when the extension has it
  torch_ref       fused_moe_ref, the whole op
  hf_grouped_mm   transformers' grouped_mm experts forward given the routing (when transformers imports)
Bytes are those that must move: the weights of the experts the tokens select (each once), plus x and the output,
plus the router for whole-op rows. FLOPs are 2 * T * K * 3 * I * H (+ 2 * T * E * H for the router). Token counts
<= 16 are timed as CUDA-graph replays over 16 token sets with different routing, so the weights come from HBM, not
L2; larger ones with triton.testing.do_bench, which flushes L2 between calls. Rows are appended to
bench/results/bench_fused_moe_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import types

import torch
from common import PEAK_BF16_FLOPS, PEAK_BYTES_PER_S, RESULTS, ROOT, environment, peak, save

sys.path.insert(0, str(ROOT))
import omni_kernels as ok  # noqa: E402
from omni_kernels import moe  # noqa: E402
from omni_kernels._extension import has_cuda_op  # noqa: E402

SHAPES = {"thinker": dict(E=128, top_k=8, I=768, H=2048), "talker": dict(E=128, top_k=6, I=384, H=1024)}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
GRAPH_MAX_TOKENS, ROTATIONS = 16, 16


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--shapes", default="thinker,talker")
    p.add_argument("--tokens", default="1,2,4,8,16,64,512,4096")
    p.add_argument("--impls", default="triton,cuda,triton_experts,torch_ref,hf_grouped_mm")
    return p.parse_args()


def hf_experts(w_gate_up, w_down):
    """transformers' Qwen3-Omni experts module on our weights, grouped_mm implementation; None without transformers."""
    try:
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextExperts
    except ImportError:
        return None
    num_experts, two_i, hidden = w_gate_up.shape
    config = types.SimpleNamespace(num_experts=num_experts, hidden_size=hidden, moe_intermediate_size=two_i // 2,
                                   hidden_act="silu", _experts_implementation="grouped_mm")
    with torch.device("meta"):
        module = Qwen3OmniMoeThinkerTextExperts(config)
    module.gate_up_proj = torch.nn.Parameter(w_gate_up, requires_grad=False)
    module.down_proj = torch.nn.Parameter(w_down, requires_grad=False)
    return module


def triton_experts(x, w_gate_up, w_down, weights, ids):
    num_tokens, top_k = ids.shape
    num_experts, inter, hidden = w_gate_up.shape[0], w_down.shape[2], x.shape[1]
    config = moe.moe_launch_config(num_tokens, top_k, num_experts, inter, hidden, x.dtype, x.device)
    rows = moe.moe_decode_rows(ids) if num_tokens <= moe.DECODE_MAX_TOKENS else \
        moe.moe_align(ids, num_experts, config["BLOCK_M"])
    h = moe.moe_gate_up(x, w_gate_up, rows, config["gate_up"])
    return moe.moe_down(h, w_down, weights, rows, config["down"]).view(num_tokens, top_k, hidden).sum(dim=1)


def graph_ms(calls) -> float:
    """ms per call: one CUDA graph replaying every call once (each on its own tokens), median of 20 replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up outside capture: Triton compiles here
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    return sorted(times)[len(times) // 2]


def time_ms(calls, graphable: bool) -> tuple[float, str]:
    import triton
    if graphable and len(calls) > 1:
        try:
            return graph_ms(calls), "cuda_graph"
        except RuntimeError as error:  # not capturable after all: time it eagerly
            print(f"  (no CUDA graph: {str(error).splitlines()[0]})")
            torch.cuda.synchronize()
    return triton.testing.do_bench(calls[0], quantiles=[0.5, 0.2, 0.8])[0], "do_bench"


def bench_shape(name, shape, num_tokens, dtype, impls, device):
    E, top_k, inter, H = shape["E"], shape["top_k"], shape["I"], shape["H"]
    g = torch.Generator(device).manual_seed(0)
    rnd = lambda *s, scale=0.02: (torch.randn(*s, generator=g, device=device) * scale).to(dtype)  # noqa: E731
    router, w_gate_up, w_down = rnd(E, H), rnd(E, 2 * inter, H), rnd(E, H, inter)
    sets = ROTATIONS if num_tokens <= GRAPH_MAX_TOKENS else 1
    xs = [rnd(num_tokens, H, scale=1.0) for _ in range(sets)]
    routes = [ok.moe_route_ref(x, router, top_k, True) for x in xs]
    routes = [(weights, ids, ids.to(torch.int32)) for weights, ids in routes]
    hf = hf_experts(w_gate_up, w_down)
    candidates = {
        "triton": lambda x, w, i, i32: ok.fused_moe(x, router, w_gate_up, w_down, top_k, True),
        "cuda": (lambda x, w, i, i32: moe.fused_moe_cuda(x, router, w_gate_up, w_down, top_k, True))
        if has_cuda_op("fused_moe") else None,
        "triton_experts": lambda x, w, i, i32: triton_experts(x, w_gate_up, w_down, w, i32),
        "torch_ref": lambda x, w, i, i32: ok.fused_moe_ref(x, router, w_gate_up, w_down, top_k, True),
        "hf_grouped_mm": None if hf is None else (lambda x, w, i, i32: hf(x, i, w)),
    }
    unique = sum(len(torch.unique(ids)) for _, ids, _ in routes) / sets
    elt = torch.finfo(dtype).bits // 8
    rows = []
    with ok.use_backend("triton", op="fused_moe"):
        for impl in impls:
            fn = candidates.get(impl)
            if fn is None:
                continue
            whole = impl in ("triton", "cuda", "torch_ref")
            calls = [lambda x=x, r=r, fn=fn: fn(x, *r) for x, r in zip(xs, routes, strict=True)]
            ms, timing = time_ms(calls, graphable=impl != "torch_ref")  # the reference syncs (bincount)
            nbytes = (unique * 3 * inter * H + 2 * num_tokens * H + (E * H if whole else 0)) * elt
            flops = 2 * num_tokens * top_k * 3 * inter * H + (2 * num_tokens * E * H if whole else 0)
            gpu = torch.cuda.get_device_name()
            peak_bw, peak_flops = peak(PEAK_BYTES_PER_S, gpu), peak(PEAK_BF16_FLOPS, gpu)
            rows.append(dict(shape=name, **shape, tokens=num_tokens, dtype=str(dtype).removeprefix("torch."),
                             impl=impl, ms=round(ms, 5), timing=timing, unique_experts=unique,
                             gbps=round(nbytes / ms * 1e-6, 1), tflops=round(flops / ms * 1e-9, 2),
                             pct_peak_bw=peak_bw and round(100 * nbytes / ms * 1e3 / peak_bw, 1),
                             pct_peak_flops=peak_flops and round(100 * flops / ms * 1e3 / peak_flops, 1)))
            print(f"{name:8s} T={num_tokens:<5d} {impl:15s} {ms * 1e3:9.1f} us  {rows[-1]['gbps']:7.0f} GB/s "
                  f"({rows[-1]['pct_peak_bw']}% peak)  {rows[-1]['tflops']:6.1f} TFLOP/s  [{timing}]", flush=True)
    return rows


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_fused_moe.py needs a CUDA GPU (the Triton kernels only run in the interpreter on CPU)")
    device = torch.device("cuda")
    env = environment(device)
    rows = []
    slug = "".join(c if c.isalnum() else "-" for c in env["device"].split(" (")[0]).lower()
    previous = RESULTS / f"bench_fused_moe_{slug}.json"
    old_rows = json.loads(previous.read_text())["rows"] if previous.is_file() else []
    for name in args.shapes.split(","):
        for num_tokens in map(int, args.tokens.split(",")):
            rows += bench_shape(name, SHAPES[name], num_tokens, DTYPES[args.dtype], args.impls.split(","), device)
            # saved after every shape: a run cut short (a GPU lease's deadline) keeps what it measured
            path = save("bench_fused_moe", {"env": env, "rows": old_rows + [dict(env, **r) for r in rows]})
    print("appended to", path)


if __name__ == "__main__":
    main()
