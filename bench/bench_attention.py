"""Attention hot path on a GPU: the Triton kernels against the torch references (SDPA) and the bandwidth floor.

    python bench/bench_attention.py [--dtype bfloat16] [--contexts 1024,4096,16384,32768] [--batches 1,8]

Shapes are the thinker's: 32 query / 4 KV heads x 128. Rows:
* decode (Tq = 1) at each context and batch: ours (the Triton split-KV kernel, and what the dispatch runs when that
  is another: the CUDA kernel, with the extension built), torch SDPA on the sliced cache
  (what ``attention_ref`` runs), the graph-safe masked reference, and the flash-decoding target = K+V bytes / peak
  HBM bandwidth (a kernel reading the cache once at full bandwidth);
* prefill (causal) at 1k and 4k, plus Code2Wav's sliding window (16 x 64 heads, window 72) and the audio encoder's
  block-diagonal windows (20 x 64 heads, 104-token windows);
* the q/k norm + M-RoPE + KV-write prologue (decode and prefill token counts), Triton and the dispatched kernel.

Three timings per row: ``ms`` from ``triton.testing.do_bench`` (eager, L2 flushed, Python dispatch included when it
dominates), ``ms_graph`` from a CUDA graph of 20 calls back to back (GPU time only, L2 warm: the H200's 60 MB hold
most of these operands) and ``ms_graph_cold``, the same graph with an L2 flush before every call, less a graph of the
flushes alone (GPU time only, operands from HBM, as a decode step's layers read theirs). GB/s counts the bytes the op
must move once, over the faster of the two L2-cold timings; % of peak uses H100 3.35 TB/s, H200 4.8 TB/s. Writes
bench/results/attention_<gpu>.json.
"""
from __future__ import annotations

import argparse
import sys

import torch
from common import PEAK_BF16_FLOPS, PEAK_BYTES_PER_S, environment, peak, save

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
HQ, HKV, D = 32, 4, 128


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--contexts", default="1024,4096,16384,32768")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prefill", default="1024,4096")
    return p.parse_args()


def _replay_ms(graph: torch.cuda.CUDAGraph, replays: int = 5) -> float:
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def _capture(body) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def graph_ms(fn, calls: int = 20, cold: bool = False) -> float:
    """GPU ms per call of ``fn``, from a CUDA graph of ``calls`` calls; ``cold``: each after an L2 flush (a write of
    twice the L2), the flushes' own time (a graph of them alone) taken off."""
    fn()                                                   # compile outside the capture
    torch.cuda.synchronize()
    if not cold:
        return _replay_ms(_capture(lambda: [fn() for _ in range(calls)])) / calls
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    scratch = torch.empty(2 * l2, dtype=torch.int8, device="cuda")
    both = _capture(lambda: [(scratch.zero_(), fn()) for _ in range(calls)])
    flushes = _capture(lambda: [scratch.zero_() for _ in range(calls)])
    return max(_replay_ms(both) - _replay_ms(flushes), 0.0) / calls


def measure(fn, nbytes: float | None = None, flops: float | None = None, graph: bool = True) -> dict:
    import triton.testing

    ms = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])[0]
    row = {"ms": ms, "ms_graph": graph_ms(fn) if graph else None,
           "ms_graph_cold": graph_ms(fn, cold=True) if graph else None}
    best = min(t for t in (row["ms"], row["ms_graph_cold"]) if t)   # L2-cold: what HBM bandwidth means
    if nbytes is not None:
        row["GB/s"] = nbytes / best / 1e6
    if flops is not None:
        row["TFLOP/s"] = flops / best / 1e9
    return row


class Table:
    def __init__(self, device_name: str):
        self.rows: list[dict] = []
        self.bw = peak(PEAK_BYTES_PER_S, device_name)
        self.flops = peak(PEAK_BF16_FLOPS, device_name)

    def add(self, op: str, case: dict, impl: str, row: dict, max_diff: float | None = None) -> None:
        if self.bw and "GB/s" in row:
            row["pct_peak_bw"] = 100 * row["GB/s"] * 1e9 / self.bw
        if self.flops and "TFLOP/s" in row:
            row["pct_peak_flops"] = 100 * row["TFLOP/s"] * 1e12 / self.flops
        self.rows.append({"op": op, **case, "impl": impl, **row, "max_abs_diff_vs_ref": max_diff})
        graph = "".join(f"{row[k] * 1e3:9.1f}" if row.get(k) is not None else f"{'-':>9}"
                        for k in ("ms_graph", "ms_graph_cold"))
        extra = "".join(f"  {k} {row[k]:8.1f}" for k in ("GB/s", "pct_peak_bw", "TFLOP/s", "pct_peak_flops")
                        if row.get(k) is not None)
        shape = " ".join(f"{k}={v}" for k, v in case.items())
        print(f"{op:17} {shape:30} {impl:18} {row['ms'] * 1e3:9.1f} us {graph} us{extra}")


def bench_decode(table: Table, dtype, contexts, batches):
    import omni_kernels as ok
    from omni_kernels.attention import attention_ref, decode_attention_ref, decode_attention_triton

    scale = D**-0.5
    for B in batches:
        for ctx in contexts:
            q = torch.randn(B, HQ, 1, D, device="cuda", dtype=dtype)
            k = torch.randn(B, HKV, ctx, D, device="cuda", dtype=dtype)
            v = torch.randn(B, HKV, ctx, D, device="cuda", dtype=dtype)
            seq_lens = torch.full((B,), ctx, device="cuda", dtype=torch.int32)
            nbytes = 2 * k.numel() * k.element_size() + 2 * q.numel() * q.element_size()
            case = {"B": B, "ctx": ctx}
            ref = attention_ref(q, k, v, scale)
            ours = decode_attention_triton(q, k, v, seq_lens, scale)
            diff = (ours.float() - ref.float()).abs().max().item()
            table.add("decode", case, "triton split-kv", measure(lambda: decode_attention_triton(q, k, v, seq_lens,
                                                                                                 scale), nbytes), diff)
            dispatched = ok.selected_backend("decode_attention", "cuda")
            if dispatched != "triton":   # what the decoder layers run: the CUDA kernel when the extension has it
                out = ok.decode_attention(q, k, v, seq_lens, scale)
                table.add("decode", case, f"dispatch ({dispatched})",
                          measure(lambda: ok.decode_attention(q, k, v, seq_lens, scale), nbytes),
                          (out.float() - ref.float()).abs().max().item())
            table.add("decode", case, "torch sdpa", measure(lambda: attention_ref(q, k, v, scale), nbytes))
            table.add("decode", case, "torch masked ref",
                      measure(lambda: decode_attention_ref(q, k, v, seq_lens, scale), nbytes))
            try:
                from flash_attn import flash_attn_with_kvcache  # optional: the flash-decoding kernel itself

                kt, vt = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()   # [B, S, Hkv, D]
                qt = q.transpose(1, 2).contiguous()
                cache_seqlens = seq_lens.clone()
                table.add("decode", case, "flash_attn kvcache", measure(
                    lambda: flash_attn_with_kvcache(qt, kt, vt, cache_seqlens=cache_seqlens, softmax_scale=scale),
                    nbytes))
            except ImportError:
                pass
            if table.bw:
                ms = nbytes / table.bw * 1e3
                table.add("decode", case, "target (HBM floor)", {"ms": ms, "ms_graph": ms, "GB/s": table.bw / 1e9})


def bench_prefill(table: Table, dtype, lengths):
    from omni_kernels.attention import attention_ref, attention_triton

    cases = [("prefill", dict(T=T, heads=f"{HQ}/{HKV}x{D}"), HQ, HKV, D, {}) for T in lengths]
    cases += [("prefill-sw72", dict(T=T, heads="16/16x64"), 16, 16, 64, {"window": 72}) for T in lengths]
    cases += [("prefill-blockdiag", dict(T=T, heads="20/20x64"), 20, 20, 64,
               {"causal": False, "cu_seqlens": torch.arange(0, T + 104, 104, device="cuda").clamp(max=T).unique()})
              for T in lengths]
    for op, case, hq, hkv, d, kwargs in cases:
        T = case["T"]
        q = torch.randn(1, hq, T, d, device="cuda", dtype=dtype)
        k, v = (torch.randn(1, hkv, T, d, device="cuda", dtype=dtype) for _ in range(2))
        visible = {"prefill": T * (T + 1) / 2, "prefill-sw72": T * 72,
                   "prefill-blockdiag": T * 104}[op]                          # score entries that count
        flops = 4 * hq * visible * d
        nbytes = (q.numel() * 2 + k.numel() + v.numel()) * q.element_size()
        ref = attention_ref(q, k, v, d**-0.5, **kwargs)
        diff = (attention_triton(q, k, v, d**-0.5, **kwargs).float() - ref.float()).abs().max().item()
        table.add(op, case, "triton flash", measure(lambda: attention_triton(q, k, v, d**-0.5, **kwargs), nbytes,
                                                    flops, graph=False), diff)
        table.add(op, case, "torch sdpa", measure(lambda: attention_ref(q, k, v, d**-0.5, **kwargs), nbytes, flops,
                                                  graph=False))


def bench_prologue(table: Table, dtype, lengths):
    import omni_kernels as ok
    from omni_kernels.qk_norm_rope import qk_norm_rope_ref, qk_norm_rope_triton

    for B, T in [(1, 1), (8, 1)] + [(1, t) for t in lengths]:
        q = torch.randn(B, T, HQ, D, device="cuda", dtype=dtype)
        k, v = (torch.randn(B, T, HKV, D, device="cuda", dtype=dtype) for _ in range(2))
        w = torch.ones(D, device="cuda", dtype=dtype)
        positions = torch.arange(T, device="cuda")[None, None].expand(3, B, T)
        cos, sin = ok.mrope_cos_sin_ref(positions, ok.rope_inv_freq(D, 1e6), (24, 20, 20), dtype)
        kc, vc = (torch.zeros(B, HKV, max(T, 4096), D, device="cuda", dtype=dtype) for _ in range(2))
        slots = torch.arange(T, device="cuda")
        nbytes = 2 * (q.numel() + k.numel() + v.numel()) * q.element_size() + 2 * cos.numel() * cos.element_size()
        ref = qk_norm_rope_ref(q, k, v, w, w, 1e-6, cos, sin, kc, vc, slots)
        ours = qk_norm_rope_triton(q, k, v, w, w, 1e-6, cos, sin, kc, vc, slots)
        diff = (ours.float() - ref.float()).abs().max().item()
        case = {"B": B, "T": T}
        table.add("qk_norm_rope", case, "triton fused", measure(
            lambda: qk_norm_rope_triton(q, k, v, w, w, 1e-6, cos, sin, kc, vc, slots), nbytes), diff)
        dispatched = ok.selected_backend("qk_norm_rope", "cuda")
        if dispatched != "triton":   # what the decoder layers run: the CUDA kernel when the extension has it
            out = ok.qk_norm_rope(q, k, v, w, w, 1e-6, cos, sin, kc, vc, slots)
            table.add("qk_norm_rope", case, f"dispatch ({dispatched})", measure(
                lambda: ok.qk_norm_rope(q, k, v, w, w, 1e-6, cos, sin, kc, vc, slots), nbytes),
                (out.float() - ref.float()).abs().max().item())
        table.add("qk_norm_rope", case, "torch ref", measure(
            lambda: qk_norm_rope_ref(q, k, v, w, w, 1e-6, cos, sin, kc, vc, slots), nbytes))


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU: on CPU the Triton kernels only run in the interpreter "
                 "(TRITON_INTERPRET=1), a test tool with nothing to time. Run tests/test_attention_triton.py instead.")
    device = torch.device("cuda")
    env = environment(device)
    dtype = DTYPES[args.dtype]
    table = Table(env["device"])
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {args.dtype}")
    print(f"{'op':17} {'shape':30} {'impl':18} {'eager':>12} {'graph':>9} {'cold':>9}")
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    with torch.inference_mode():
        bench_decode(table, dtype, ints(args.contexts), ints(args.batches))
        bench_prefill(table, dtype, ints(args.prefill))
        bench_prologue(table, dtype, ints(args.prefill))
    path = save("attention", {"bench": "attention", "env": env, "dtype": args.dtype,
                              "peak_bytes_per_s": table.bw, "rows": table.rows})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
