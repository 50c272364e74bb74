"""The MoE block's last step: each token's top-k weighted expert rows summed, plus the talker's gated shared expert.

    out[t] = sum_k rows[t, k]                                  # fp32 in rank order, rounded once (torch's sum)
    talker:  out[t] = out[t] + sigmoid(gate[t]) * shared[t]    # gate [T, 1]: the shared expert's gate logit

The reference is that composition op by op (``rows.sum(1)``, ``torch.sigmoid``, ``*``, ``+``): four launches at
decode, each rounding to the dtype; the kernels do the same arithmetic and roundings in one. On a GPU the default is
the CUDA kernel (csrc/include/omni/moe_combine.cuh): the sigmoid as torch's CUDA kernel computes it (fp32, expf, an
IEEE division), the K rows added in fp32 in rank order. torch's CUDA sum may associate the K rows otherwise, which
changes nothing whenever their fp32 sum is exact (bf16/fp16 rows, whose 8/11-bit significands fit 24 bits unless
their magnitudes lie ~2^13 apart) and can change the last bit of an fp32 sum. The Triton kernel stays opt-in.
"""
from __future__ import annotations

import torch

from omni_kernels._extension import cuda_runs
from omni_kernels._triton import ACCURATE_EXP, INTERPRET, tl, torch_exp, triton, triton_runs
from omni_kernels.dispatch import REGISTRY, everywhere

_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def moe_combine_ref(rows: torch.Tensor, gate: torch.Tensor | None = None,
                    shared: torch.Tensor | None = None) -> torch.Tensor:
    """rows: (T, K, H) weighted expert outputs, gate: (T, 1), shared: (T, H) -> (T, H)."""
    out = rows.sum(dim=1)
    return out if gate is None else out + torch.sigmoid(gate) * shared


@triton.jit
def _moe_combine_kernel(rows_ptr, gate_ptr, shared_ptr, out_ptr, tokens, hidden, s_rt, s_rk, s_rh, s_gt, s_st,
                        s_sh, TOP_K: tl.constexpr, HAS_SHARED: tl.constexpr, ACCURATE_EXP: tl.constexpr,
                        DTYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)[:, None]
    h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H))[None, :]
    mask = (t < tokens) & (h < hidden)
    acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    for k in tl.static_range(TOP_K):                                      # rank order, as torch's sum adds them
        acc += tl.load(rows_ptr + t * s_rt + k * s_rk + h * s_rh, mask=mask, other=0.0).to(tl.float32)
    out = acc.to(DTYPE)
    if HAS_SHARED:
        g = tl.load(gate_ptr + t * s_gt, mask=t < tokens, other=0.0).to(tl.float32)            # [BLOCK_T, 1]
        one = tl.full(g.shape, 1.0, tl.float32)
        gate = tl.math.div_rn(one, one + torch_exp(-g, ACCURATE_EXP)).to(DTYPE).to(tl.float32)       # torch.sigmoid
        y = tl.load(shared_ptr + t * s_st + h * s_sh, mask=mask, other=0.0).to(tl.float32)
        out = (out.to(tl.float32) + (gate * y).to(DTYPE).to(tl.float32)).to(DTYPE)
    tl.store(out_ptr + t * hidden + h, out, mask=mask)


def moe_combine_triton(rows: torch.Tensor, gate: torch.Tensor | None = None,
                       shared: torch.Tensor | None = None) -> torch.Tensor:
    if rows.dtype not in _TRITON_DTYPES or any(t is not None and t.dtype != rows.dtype for t in (gate, shared)):
        return moe_combine_ref(rows, gate, shared)
    tokens, top_k, hidden = rows.shape
    out = rows.new_empty(tokens, hidden)
    if out.numel() == 0:
        return out
    # the interpreter pays per program, not per element: few, large programs there
    block_h = min(triton.next_power_of_2(hidden), 4096 if INTERPRET else 1024)
    block_t = min(triton.next_power_of_2(tokens), max(1, (16384 if INTERPRET else 2048) // block_h))
    grid = (triton.cdiv(tokens, block_t), triton.cdiv(hidden, block_h))
    has_shared = gate is not None
    gate_stride = gate.stride(0) if has_shared else 0
    shared_strides = shared.stride() if has_shared else (0, 0)
    _moe_combine_kernel[grid](rows, gate if has_shared else rows, shared if has_shared else rows, out, tokens, hidden,
                              *rows.stride(), gate_stride, *shared_strides, TOP_K=top_k, HAS_SHARED=has_shared,
                              ACCURATE_EXP=ACCURATE_EXP, DTYPE=_TRITON_DTYPES[rows.dtype], BLOCK_T=block_t,
                              BLOCK_H=block_h)
    return out


def moe_combine_cuda(rows: torch.Tensor, gate: torch.Tensor | None = None,
                     shared: torch.Tensor | None = None) -> torch.Tensor:
    """``omni::moe_combine``; what it does not take (other or mixed dtypes, a strided hidden dim) runs the
    reference."""
    unit = lambda t: t is None or t.stride(-1) == 1 or t.shape[-1] <= 1   # noqa: E731
    if (rows.dtype not in _TRITON_DTYPES or any(t is not None and t.dtype != rows.dtype for t in (gate, shared))
            or not (unit(rows) and unit(shared))):
        return moe_combine_ref(rows, gate, shared)
    out = rows.new_empty(rows.shape[0], rows.shape[2])
    torch.ops.omni.moe_combine(rows, gate, shared, out)
    return out


REGISTRY.register("moe_combine", "torch", everywhere)(moe_combine_ref)
# the reference's arithmetic in one launch instead of four (see omni_kernels.dispatch on such kernels)
REGISTRY.register("moe_combine", "cuda", cuda_runs("moe_combine"))(moe_combine_cuda)
# opt-in until bench/bench_norms.py shows it faster than the default on a GPU
REGISTRY.register("moe_combine", "triton", triton_runs, opt_in=True)(moe_combine_triton)


def moe_combine(rows: torch.Tensor, gate: torch.Tensor | None = None,
                shared: torch.Tensor | None = None) -> torch.Tensor:
    """rows: (T, K, H), the K weighted expert rows of each token; gate: (T, 1) shared-expert gate logits and shared:
    (T, H) its output, both or neither -> (T, H) = rows summed over K (+ sigmoid(gate) * shared)."""
    if rows.dim() != 3:
        raise ValueError(f"moe_combine: rows must be (tokens, top_k, hidden), got {tuple(rows.shape)}")
    if (gate is None) != (shared is None):
        raise ValueError("moe_combine: the shared expert needs both its gate logits and its output, got one")
    tokens, _, hidden = rows.shape
    if gate is not None and (gate.shape != (tokens, 1) or shared.shape != (tokens, hidden)):
        raise ValueError(f"moe_combine: gate {tuple(gate.shape)} and shared {tuple(shared.shape)} must be "
                         f"{(tokens, 1)} and {(tokens, hidden)} for rows {tuple(rows.shape)}")
    if any(t is not None and t.device != rows.device for t in (gate, shared)):
        raise ValueError(f"moe_combine: gate and shared must be on rows' device {rows.device}")
    return REGISTRY.select("moe_combine", rows.device).fn(rows, gate, shared)
