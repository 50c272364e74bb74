"""RMSNorm: ``y = w * (x * rsqrt(mean(x^2) + eps))``, Qwen3 flavour.

Numerics follow the reference model exactly: the statistics and the scaling are computed in fp32, the result is cast
back to the input dtype *before* the weight multiply, and that multiply runs in the weight's dtype.
"""
from __future__ import annotations

import torch

from omni_kernels._extension import cuda_runs
from omni_kernels.dispatch import REGISTRY, everywhere


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., hidden), weight: (hidden,) -> (..., hidden) in the promoted dtype of x and weight."""
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


@REGISTRY.register("rms_norm", "torch", everywhere)
def _rms_norm_torch(x, weight, eps, out):
    if out is None:
        return rms_norm_ref(x, weight, eps)
    return out.copy_(rms_norm_ref(x, weight, eps))


def _row_stride(t: torch.Tensor) -> int:
    """Row stride of ``t`` seen as [rows, hidden] without a copy, or -1 when its leading dims do not collapse into
    one strided dim (csrc/rms_norm.cu's RowStride: size-1 dims place no constraint)."""
    stride, span = -1, 1
    for size, step in zip(reversed(t.shape[:-1]), reversed(t.stride()[:-1])):
        if size == 1:
            continue
        if stride < 0:
            stride = step
        elif step != stride * span:
            return -1
        span *= size
    return t.shape[-1] if stride < 0 else stride


def cuda_supports(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None) -> bool:
    """What ``omni::rms_norm`` (csrc/rms_norm.cu) takes: one fp32/fp16/bf16 dtype and device for x, weight and out,
    x at least 2-D, unit stride along hidden, leading dims that view as one row dim, rows of out not overlapping."""
    if x.dim() < 2 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    hidden, rows = x.shape[-1], x.numel() // max(x.shape[-1], 1)
    tensors = (x, weight) if out is None else (x, weight, out)
    return (all(t.dtype == x.dtype and t.device == x.device and (t.stride(-1) == 1 or hidden == 1) for t in tensors)
            and rows < 2**31 and hidden < 2**31 and _row_stride(x) >= 0
            and (out is None or (_row_stride(out) >= 0 and (rows <= 1 or _row_stride(out) >= hidden))))


@REGISTRY.register("rms_norm", "cuda", cuda_runs("rms_norm"))
def _rms_norm_cuda(x, weight, eps, out):
    # What the kernel does not take (1-D x, a strided hidden dim, mixed dtypes, ...) goes to the reference, whose
    # output has the promoted dtype of x and weight.
    if not cuda_supports(x, weight, out):
        return _rms_norm_torch(x, weight, eps, out)
    out = torch.empty_like(x) if out is None else out
    torch.ops.omni.rms_norm(x, weight, eps, out)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: (..., hidden), weight: (hidden,). Writes into ``out`` when given (same shape as x) and returns it."""
    if weight.dim() != 1 or x.dim() == 0 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")
    if out is not None and out.shape != x.shape:
        raise ValueError(f"rms_norm: out {tuple(out.shape)} must have the shape of x {tuple(x.shape)}")
    return REGISTRY.select("rms_norm", x.device).fn(x, weight, eps, out)
