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


@REGISTRY.register("rms_norm", "cuda", cuda_runs("rms_norm"))
def _rms_norm_cuda(x, weight, eps, out):
    out = torch.empty_like(x) if out is None else out
    torch.ops.omni.rms_norm(x, weight, eps, out)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: (..., hidden), weight: (hidden,). Writes into ``out`` when given (same shape as x) and returns it."""
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")
    return REGISTRY.select("rms_norm", x.device).fn(x, weight, eps, out)
