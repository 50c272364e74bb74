"""Residual add then RMSNorm in one pass: ``s = x + residual; return s, rms_norm(s)``.

Inside a decoder layer the attention output is added to the residual stream and the sum normalised for the MLP; one
kernel instead of two at decode, where each costs a few microseconds of launch and tail. The sum is rounded to the
dtype before the statistics, exactly as ``x + r`` followed by ``rms_norm_ref`` (fp32 statistics, the normalised row
rounded before the weight multiply); the Triton kernel repeats those roundings.
"""
from __future__ import annotations

import torch

from omni_kernels._extension import cuda_runs, has_cuda_op
from omni_kernels._triton import INTERPRET, tl, triton, triton_runs
from omni_kernels.dispatch import REGISTRY, everywhere
from omni_kernels.rms_norm import _rms_norm_cuda, cuda_supports, rms_norm_ref

_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: (..., H), weight: (H,) -> (x + residual, rms_norm(x + residual))."""
    total = x + residual
    return total, rms_norm_ref(total, weight, eps)


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, sum_ptr, out_ptr, rows, hidden, sx, sr, eps, DTYPE: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    row = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    col = tl.arange(0, BLOCK_H)[None, :]
    mask = (row < rows) & (col < hidden)
    x = tl.load(x_ptr + row * sx + col, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * sr + col, mask=mask, other=0.0).to(tl.float32)
    total = (x + r).to(DTYPE)
    tl.store(sum_ptr + row * hidden + col, total, mask=mask)
    total = total.to(tl.float32)
    # 1 / sqrt, both correctly rounded like torch's rsqrt on CPU (plain `/` is approximate on GPUs)
    std = tl.sqrt_rn(tl.sum(total * total, axis=1) / hidden + eps)
    rstd = tl.div_rn(tl.full(std.shape, 1.0, tl.float32), std)[:, None]
    w = tl.load(w_ptr + col, mask=col < hidden, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + col, (w * (total * rstd).to(DTYPE).to(tl.float32)).to(DTYPE), mask=mask)


def add_rms_norm_triton(x, residual, weight, eps):
    if (x.dtype not in _TRITON_DTYPES or residual.dtype != x.dtype or weight.dtype != x.dtype
            or x.numel() == 0):   # no row to launch for (and no hidden size to reshape by)
        return add_rms_norm_ref(x, residual, weight, eps)
    hidden = x.shape[-1]
    x2, r2 = x.reshape(-1, hidden), residual.reshape(-1, hidden)
    if x2.stride(-1) != 1 or r2.stride(-1) != 1:
        x2, r2 = x2.contiguous(), r2.contiguous()
    weight = weight.contiguous()  # the kernel reads it at unit stride; (H,) elements, no copy when contiguous
    total = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    out = torch.empty_like(total)
    rows = x2.shape[0]
    if rows:
        block_h = triton.next_power_of_2(hidden)
        block_r = min(triton.next_power_of_2(rows), max(1, (65536 if INTERPRET else 4096) // block_h))
        _add_rms_norm_kernel[(triton.cdiv(rows, block_r),)](
            x2, r2, weight, total, out, rows, hidden, x2.stride(0), r2.stride(0), eps,
            DTYPE=_TRITON_DTYPES[x.dtype], BLOCK_R=block_r, BLOCK_H=block_h)
    return total.view(x.shape), out.view(x.shape)


def add_then_rms_norm_cuda(x, residual, weight, eps):
    """The add, then ``omni::rms_norm``: two kernels, what a GPU layer ran before ``omni::add_rms_norm`` (the
    reference's composition is nine in bf16: the add, two casts, square, mean, the eps add, rsqrt and two multiplies,
    each a launch at decode)."""
    total = x + residual
    return total, _rms_norm_cuda(total, weight, eps, None)


def add_rms_norm_cuda(x, residual, weight, eps):
    """``omni::add_rms_norm`` (csrc/include/omni/rms_norm.cuh): the add and the norm in one kernel, the same
    roundings as the add followed by ``omni::rms_norm`` (bit for bit when both move 16-byte vectors). What it does
    not take (mixed dtypes, rows that do not view as one strided dim, ...) runs the two-kernel path."""
    if (not has_cuda_op("add_rms_norm") or residual.dtype != x.dtype or residual.device != x.device
            or not cuda_supports(x, weight, None) or not cuda_supports(residual, weight, None)):
        return add_then_rms_norm_cuda(x, residual, weight, eps)
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out = torch.empty_like(total)
    torch.ops.omni.add_rms_norm(x, residual, weight, eps, total, out)
    return total, out


REGISTRY.register("add_rms_norm", "torch", everywhere)(add_rms_norm_ref)
# One kernel where the extension has it (the same arithmetic as the two-kernel path it replaces), else the add and
# omni::rms_norm.
REGISTRY.register("add_rms_norm", "cuda", cuda_runs("rms_norm"))(add_rms_norm_cuda)
# opt-in until bench/bench_norms.py shows it faster than the add and the CUDA rms_norm on a GPU
REGISTRY.register("add_rms_norm", "triton", triton_runs, opt_in=True)(add_rms_norm_triton)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: (..., H), weight: (H,) -> (x + residual, rms_norm(x + residual, weight, eps))."""
    if x.dim() == 0 or x.shape != residual.shape or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)}, residual {tuple(residual.shape)} and weight "
                         f"{tuple(weight.shape)} do not fit")
    return REGISTRY.select("add_rms_norm", x.device).fn(x, residual, weight, eps)
