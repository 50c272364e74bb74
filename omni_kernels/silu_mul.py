"""SiLU-times-up on a fused gate/up projection: ``x [..., 2I] -> silu(x[..., :I]) * x[..., I:]``.

With gate and up in one [2I, H] weight, a SwiGLU MLP is two GEMMs and this op instead of three GEMMs, a SiLU and a
multiply: at decode, where every kernel is a few microseconds of launch and tail, three kernels fewer per MLP.
The reference rounds like ``F.silu(gate) * up``: SiLU in fp32, rounded to the dtype, the product rounded again; the
kernels repeat those roundings. On a GPU the default is the CUDA kernel (csrc/include/omni/silu_mul.cuh): one launch
for the reference's two, bit for bit torch's CUDA result (the same expf and IEEE division); the Triton kernel
(``tl.exp``, an approximate exponential) stays opt-in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from omni_kernels._extension import cuda_runs
from omni_kernels._triton import INTERPRET, tl, triton, triton_runs
from omni_kernels.dispatch import REGISTRY, everywhere
from omni_kernels.rms_norm import _row_stride

_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: (..., 2I) gate then up -> (..., I)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, rows, cols, sx_row, sx_col, so_row, DTYPE: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    mask = (r < rows) & (c < cols)
    gate = tl.load(x_ptr + r * sx_row + c * sx_col, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + r * sx_row + (c + cols) * sx_col, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(DTYPE).to(tl.float32)       # rounded as F.silu's output
    tl.store(out_ptr + r * so_row + c, (silu * up).to(DTYPE), mask=mask)


def silu_mul_triton(x: torch.Tensor) -> torch.Tensor:
    if x.dtype not in _TRITON_DTYPES:
        return silu_mul_ref(x)
    cols = x.shape[-1] // 2
    rows2d = x.reshape(-1, x.shape[-1])                                   # a view unless the leading dims are strided
    out = x.new_empty(rows2d.shape[0], cols)
    if out.numel() == 0:
        return out.view(*x.shape[:-1], cols)
    # the interpreter pays per program, not per element: few, large programs there
    block_c = min(triton.next_power_of_2(cols), 4096 if INTERPRET else 1024)
    block_r = min(triton.next_power_of_2(rows2d.shape[0]), max(1, (65536 if INTERPRET else 4096) // block_c))
    grid = (triton.cdiv(rows2d.shape[0], block_r), triton.cdiv(cols, block_c))
    _silu_mul_kernel[grid](rows2d, out, rows2d.shape[0], cols, *rows2d.stride(), out.stride(0),
                           DTYPE=_TRITON_DTYPES[x.dtype], BLOCK_R=block_r, BLOCK_C=block_c)
    return out.view(*x.shape[:-1], cols)


def _row_viewable(t: torch.Tensor) -> bool:
    return t.dim() < 2 or _row_stride(t) >= 0


def silu_mul_cuda(x: torch.Tensor) -> torch.Tensor:
    """``omni::silu_mul``; what it does not take (other dtypes, a strided last dim, leading dims that do not view as
    one row dim) runs the reference."""
    if (x.dtype not in _TRITON_DTYPES or x.dim() == 0 or (x.stride(-1) != 1 and x.shape[-1] > 1)
            or not _row_viewable(x)):
        return silu_mul_ref(x)
    out = x.new_empty(*x.shape[:-1], x.shape[-1] // 2)
    torch.ops.omni.silu_mul(x, out)
    return out


REGISTRY.register("silu_mul", "torch", everywhere)(silu_mul_ref)
# the reference's arithmetic in one launch instead of two (see omni_kernels.dispatch on such kernels)
REGISTRY.register("silu_mul", "cuda", cuda_runs("silu_mul"))(silu_mul_cuda)
# opt-in until bench/bench_norms.py shows it faster than the reference on a GPU
REGISTRY.register("silu_mul", "triton", triton_runs, opt_in=True)(silu_mul_triton)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x: (..., 2I), gate then up -> silu(gate) * up: (..., I)."""
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"silu_mul: the last dimension must hold gate and up halves, got {tuple(x.shape)}")
    return REGISTRY.select("silu_mul", x.device).fn(x)
