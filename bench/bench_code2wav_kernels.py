"""Code2Wav's kernels on a GPU: the Triton RVQ mean, causal convs and transposed convs against the torch references.

    python bench/bench_code2wav_kernels.py [--dtype bfloat16] [--frames 1,4,25]

Released shapes: 16 quantizers x 2048 codes -> hidden 1024; upsampling 2 x (transposed conv k=2, stride 2 + ConvNeXt
depthwise k=7); decoder conv 1024 -> 1536 (k=7), then per block (1536 -> 768, 768 -> 384, 384 -> 192, 192 -> 96 at
rates 8, 5, 4, 3): SnakeBeta + transposed conv (k = 2 * rate) and three residual units (SnakeBeta + k=7 conv at
dilation 1/3/9, SnakeBeta + k=1 conv); SnakeBeta + the 96 -> 1 output conv. Each layer is timed at 1, 4 and 25 frames
per streamed call (with its carried state) as ours (Triton, and the CUDA extension's kernels when built: ``cuda``
rows, forced even where opt-in; ``_snake`` rows fuse the SnakeBeta) and the reference (torch: ``snake_beta_ref``
then ``F.conv1d`` etc.). Two timings: ``ms`` eager (``do_bench``: host dispatch included where it dominates, as at
1 frame) and ``ms_graph``, GPU time in a CUDA graph with an L2 flush before each call (bench_attention.graph_ms), how
the runtime replays a Code2Wav push; None where a reference cannot be captured. GB/s counts x + weights + y
(+ state) once, over ``ms_graph`` where there is one. Writes bench/results/code2wav_kernels_<gpu>.json.
"""
from __future__ import annotations

import argparse
import sys

import torch
from bench_attention import graph_ms
from common import environment, save

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
HIDDEN, DECODER, RATES, UPSAMPLING = 1024, 1536, (8, 5, 4, 3), (2, 2)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--frames", default="1,4,25")
    return p.parse_args()


def layers():
    """(name, kind, c_in, c_out, kernel, dilation/stride, groups, samples per frame at the layer's input, snake)."""
    out, rate = [], 1
    for i, factor in enumerate(UPSAMPLING):
        out.append((f"upsample{i}_x{factor}", "transpose", HIDDEN, HIDDEN, factor, factor, 1, rate, False))
        rate *= factor
        out.append((f"convnext_dw_{rate}", "conv", HIDDEN, HIDDEN, 7, 1, HIDDEN, rate, False))
    out.append(("decoder_in", "conv", HIDDEN, DECODER, 7, 1, 1, rate, False))
    dim = DECODER
    for r in RATES:
        out.append((f"block{dim}_up{r}", "transpose", dim, dim // 2, 2 * r, r, 1, rate, True))
        rate, dim = rate * r, dim // 2
        for d in (1, 3, 9):
            out.append((f"res{dim}_d{d}", "conv", dim, dim, 7, d, 1, rate, True))
        out.append((f"res{dim}_pw", "conv", dim, dim, 1, 1, 1, rate, True))
    out.append(("decoder_out", "conv", dim, 1, 7, 1, 1, rate, True))
    return out


def time_ms(fn) -> float:
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])[0]


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_code2wav_kernels.py needs a CUDA GPU: on CPU the Triton kernels only run in the interpreter "
                 "(a test tool, ~25 ms per program), so timings there mean nothing.")
    from omni_kernels.causal_conv import (causal_conv1d_ref, causal_conv1d_triton, causal_conv_transpose1d_ref,
                                          causal_conv_transpose1d_triton)
    from omni_kernels.rvq_lookup import _rvq_embed_mean_cuda, rvq_embed_mean_ref, rvq_embed_mean_triton

    import omni_kernels as ok
    from omni_kernels._extension import has_cuda_op

    def cuda_impl(op, fn, *args):
        """The CUDA extension's kernel for ``op`` (forced: opt-in ones too), or None without it."""
        if not has_cuda_op(op):
            return None

        def run(s=None):
            with ok.use_backend("cuda", op=op):
                return fn(*args, snake=s)
        return run

    device, dtype = torch.device("cuda"), DTYPES[args.dtype]
    size = torch.finfo(dtype).bits // 8
    rnd = lambda *s, scale=1.0: torch.randn(*s, device=device, dtype=torch.float32).mul(scale).to(dtype)  # noqa: E731
    rows = []

    def record(layer, frames, impl, fn, nbytes):
        ms = time_ms(fn)
        try:
            ms_graph = graph_ms(fn, cold=True)
        except RuntimeError:   # a reference that syncs or allocates on the host while capturing
            torch.cuda.synchronize()
            ms_graph = None
        gb_s = nbytes / ((ms_graph or ms) * 1e-3) / 1e9
        rows.append({"layer": layer, "frames": frames, "impl": impl, "ms": ms, "ms_graph": ms_graph, "gb_s": gb_s})
        graph = f"{ms_graph * 1e3:9.1f}" if ms_graph else f"{'-':>9}"
        print(f"{layer:>18} {frames:>3} frames {impl:>13}: {ms * 1e3:9.1f} us eager {graph} us graph {gb_s:8.1f} GB/s")

    table = rnd(16 * 2048, HIDDEN)
    for frames in map(int, args.frames.split(",")):
        codes = torch.randint(0, 2048, (1, 16, frames), device=device)
        nbytes = (16 * frames * HIDDEN + frames * HIDDEN) * size
        record("rvq_embed_mean", frames, "triton", lambda: rvq_embed_mean_triton(codes, table, 2048), nbytes)
        if has_cuda_op("rvq_embed_mean"):
            record("rvq_embed_mean", frames, "cuda", lambda: _rvq_embed_mean_cuda(codes, table, 2048), nbytes)
        record("rvq_embed_mean", frames, "torch", lambda: rvq_embed_mean_ref(codes, table, 2048), nbytes)
        for name, kind, c_in, c_out, k, d, groups, spf, snake in layers():
            length = frames * spf
            x = rnd(1, c_in, length)
            bias = rnd(c_out, scale=0.1)
            sn = (rnd(c_in, scale=0.2), rnd(c_in, scale=0.2)) if snake else None
            if kind == "conv":
                w = rnd(c_out, c_in // groups, k, scale=(c_in // groups * k) ** -0.5)
                state = rnd(1, c_in, (k - 1) * d)
                nbytes = (x.numel() + w.numel() + c_out * length + 2 * state.numel()) * size
                impls = {"triton": lambda s=None: causal_conv1d_triton(x, w, bias, d, groups, state, snake=s),
                         "torch": lambda s=None: causal_conv1d_ref(x, w, bias, d, groups, state, snake=s),
                         "cuda": cuda_impl("causal_conv1d", ok.causal_conv1d, x, w, bias, d, groups, state)}
            else:
                w = rnd(c_in, c_out, k, scale=c_in ** -0.5)
                state = rnd(1, c_in, k // d - 1)
                nbytes = (x.numel() + w.numel() + c_out * length * d + 2 * state.numel()) * size
                impls = {"triton": lambda s=None: causal_conv_transpose1d_triton(x, w, bias, d, state, snake=s),
                         "torch": lambda s=None: causal_conv_transpose1d_ref(x, w, bias, d, state, snake=s),
                         "cuda": cuda_impl("causal_conv_transpose1d", ok.causal_conv_transpose1d, x, w, bias, d,
                                           state)}
            for impl, fn in impls.items():
                if fn is None:   # no CUDA extension with this op
                    continue
                record(name, frames, impl, fn, nbytes)
                if snake:
                    record(name, frames, impl + "_snake", lambda fn=fn: fn(sn), nbytes)
    env = environment(device)
    path = save("code2wav_kernels", {"bench": "code2wav_kernels", "env": env, "dtype": args.dtype, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
