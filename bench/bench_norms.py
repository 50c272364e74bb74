"""The decoder layer's small memory-bound ops on a GPU: each backend against the torch reference and HBM bandwidth.

    python bench/bench_norms.py [--dtype bfloat16] [--tokens 1,8,64,4096]

* ``rms_norm`` (CUDA ``omni::rms_norm`` against the reference's fp32 statistics + two casts);
* ``add_rms_norm`` (CUDA ``omni::add_rms_norm``, the default on a GPU, and Triton: the residual add and the next
  norm in one pass, against the add then the CUDA rms_norm they replace, and the reference's add + rms_norm);
* ``silu_mul`` (CUDA ``omni::silu_mul``, the default on a GPU, and Triton, on the fused gate/up GEMM's output,
  against ``F.silu(gate) * up``);
* ``moe_combine`` (CUDA ``omni::moe_combine``, the default on a GPU, and Triton: the MoE block's top-k sum and the
  talker's gated shared expert, against the reference's sum, sigmoid, multiply and add).
Hidden sizes are the thinker's (2048) and the talker's (1024); silu_mul's widths the code predictor's MLP (3072) and
the talker's shared expert (768). The Triton ``add_rms_norm``, ``silu_mul`` and ``moe_combine`` stay opt-in until
this shows them faster than the defaults (the rule for every kernel not yet measured on a GPU). Same columns as
bench_attention.py; writes bench/results/norms_<gpu>.json.
"""
from __future__ import annotations

import argparse
import sys

import torch
from bench_attention import Table, measure
from common import environment, save

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--tokens", default="1,8,64,4096")
    return p.parse_args()


def bench_rms_norm(table: Table, dtype, tokens):
    from omni_kernels._extension import has_cuda_op
    from omni_kernels.rms_norm import _rms_norm_cuda, rms_norm_ref

    if not has_cuda_op("rms_norm"):   # loads the extension (lazily loaded), if it was built
        print("rms_norm: no CUDA extension built (pip install --no-build-isolation -e .): its rows are skipped")
        return
    for hidden in (2048, 1024):
        for t in tokens:
            x, w = torch.randn(t, hidden, device="cuda", dtype=dtype), torch.randn(hidden, device="cuda", dtype=dtype)
            nbytes, case = 2 * x.numel() * x.element_size(), {"T": t, "H": hidden}
            ref = rms_norm_ref(x, w, 1e-6)
            diff = (_rms_norm_cuda(x, w, 1e-6, None).float() - ref.float()).abs().max().item()
            table.add("rms_norm", case, "cuda", measure(lambda: _rms_norm_cuda(x, w, 1e-6, None), nbytes), diff)
            table.add("rms_norm", case, "torch ref", measure(lambda: rms_norm_ref(x, w, 1e-6), nbytes))


def bench_add_rms_norm(table: Table, dtype, tokens):
    from omni_kernels._extension import has_cuda_op
    from omni_kernels.add_rms_norm import (add_rms_norm_cuda, add_rms_norm_ref, add_rms_norm_triton,
                                           add_then_rms_norm_cuda)

    for hidden in (2048, 1024):
        for t in tokens:
            x, r = (torch.randn(t, hidden, device="cuda", dtype=dtype) for _ in range(2))
            w = torch.randn(hidden, device="cuda", dtype=dtype)
            nbytes, case = 4 * x.numel() * x.element_size(), {"T": t, "H": hidden}   # x, r in; sum, norm out
            ref = add_rms_norm_ref(x, r, w, 1e-6)
            ours = add_rms_norm_triton(x, r, w, 1e-6)
            diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(ours, ref))
            table.add("add_rms_norm", case, "triton fused", measure(lambda: add_rms_norm_triton(x, r, w, 1e-6),
                                                                    nbytes), diff)
            if has_cuda_op("add_rms_norm"):   # the default on a GPU
                fused = add_rms_norm_cuda(x, r, w, 1e-6)
                diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(fused, ref))
                table.add("add_rms_norm", case, "cuda fused", measure(lambda: add_rms_norm_cuda(x, r, w, 1e-6),
                                                                      nbytes), diff)
            if has_cuda_op("rms_norm"):   # what the fused kernels replace
                composed = add_then_rms_norm_cuda(x, r, w, 1e-6)
                diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(composed, ref))
                table.add("add_rms_norm", case, "add + cuda rms_norm",
                          measure(lambda: add_then_rms_norm_cuda(x, r, w, 1e-6), nbytes), diff)
            table.add("add_rms_norm", case, "torch ref", measure(lambda: add_rms_norm_ref(x, r, w, 1e-6), nbytes))


def bench_silu_mul(table: Table, dtype, tokens):
    from omni_kernels._extension import has_cuda_op
    from omni_kernels.silu_mul import silu_mul_cuda, silu_mul_ref, silu_mul_triton

    for inter in (3072, 768):
        for t in tokens:
            x = torch.randn(t, 2 * inter, device="cuda", dtype=dtype)
            nbytes, case = 1.5 * x.numel() * x.element_size(), {"T": t, "I": inter}
            diff = (silu_mul_triton(x).float() - silu_mul_ref(x).float()).abs().max().item()
            table.add("silu_mul", case, "triton", measure(lambda: silu_mul_triton(x), nbytes), diff)
            if has_cuda_op("silu_mul"):   # the default on a GPU
                diff = (silu_mul_cuda(x).float() - silu_mul_ref(x).float()).abs().max().item()
                table.add("silu_mul", case, "cuda", measure(lambda: silu_mul_cuda(x), nbytes), diff)
            table.add("silu_mul", case, "torch ref", measure(lambda: silu_mul_ref(x), nbytes))


def bench_moe_combine(table: Table, dtype, tokens):
    from omni_kernels._extension import has_cuda_op
    from omni_kernels.moe_combine import moe_combine_cuda, moe_combine_ref, moe_combine_triton

    for top_k, hidden, with_shared in ((6, 1024, True), (8, 2048, False)):   # the talker's and the thinker's blocks
        for t in tokens:
            rows = torch.randn(t, top_k, hidden, device="cuda", dtype=dtype)
            projected = torch.randn(t, 2 * 768 + 1, device="cuda", dtype=dtype)   # the shared expert's input GEMM
            gate, shared = (projected[:, -1:], torch.randn(t, hidden, device="cuda", dtype=dtype)) if with_shared \
                else (None, None)
            nbytes = (top_k + 1 + with_shared) * t * hidden * rows.element_size()
            case = {"T": t, "K": top_k, "H": hidden, "shared": with_shared}
            ref = moe_combine_ref(rows, gate, shared).float()
            for name, fn, runs in (("triton", moe_combine_triton, True),
                                   ("cuda", moe_combine_cuda, has_cuda_op("moe_combine"))):   # cuda: the default
                if runs:
                    diff = (fn(rows, gate, shared).float() - ref).abs().max().item()
                    table.add("moe_combine", case, name, measure(lambda: fn(rows, gate, shared), nbytes), diff)
            table.add("moe_combine", case, "torch ref", measure(lambda: moe_combine_ref(rows, gate, shared), nbytes))


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_norms.py needs a CUDA GPU (on CPU the Triton kernels run only in the interpreter, a test "
                 "tool): tests/test_add_rms_norm.py and tests/test_ops.py check them against the references.")
    device = torch.device("cuda")
    env = environment(device)
    dtype, tokens = DTYPES[args.dtype], [int(t) for t in args.tokens.split(",")]
    table = Table(env["device"])
    print(f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {args.dtype}")
    with torch.inference_mode():
        bench_rms_norm(table, dtype, tokens)
        bench_add_rms_norm(table, dtype, tokens)
        bench_silu_mul(table, dtype, tokens)
        bench_moe_combine(table, dtype, tokens)
    path = save("norms", {"bench": "norms", "env": env, "dtype": args.dtype, "peak_bytes_per_s": table.bw,
                          "rows": table.rows})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
