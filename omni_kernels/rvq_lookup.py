"""Residual-VQ embedding: the mean of one embedding per quantizer, Code2Wav's input layer.

Quantizer q owns rows ``[q * codebook_size, (q + 1) * codebook_size)`` of one shared table. The reference gathers all
Q rows into a (B, Q, T, H) tensor and takes ``.mean(1)`` (a mean, not the talker's sum), so the reduction runs over
the quantizers in the input's dtype the way torch's ``mean`` does; the reference here does exactly that.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from omni_kernels._extension import cuda_runs
from omni_kernels._triton import INTERPRET, tl, triton, triton_runs
from omni_kernels.dispatch import REGISTRY, everywhere


def rvq_embed_mean_ref(codes: torch.Tensor, table: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """codes: (B, Q, T) integer ids in [0, codebook_size), table: (Q * codebook_size, H) -> (B, T, H)."""
    offsets = torch.arange(codes.shape[1], device=codes.device).view(1, -1, 1) * codebook_size  # [1, Q, 1]
    return F.embedding(codes + offsets, table).mean(1)


REGISTRY.register("rvq_embed_mean", "torch", everywhere)(rvq_embed_mean_ref)


def rvq_embed_mean(codes: torch.Tensor, table: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """See :func:`rvq_embed_mean_ref`. Ids are not range-checked here (that needs a device sync); callers do it."""
    if codes.dim() != 3 or codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"rvq_embed_mean: codes must be an integer (B, Q, T) tensor, got {codes.dtype} "
                         f"{tuple(codes.shape)}")
    if table.dim() != 2 or table.shape[0] != codes.shape[1] * codebook_size:
        raise ValueError(f"rvq_embed_mean: table {tuple(table.shape)} does not hold {codes.shape[1]} codebooks of "
                         f"{codebook_size} rows")
    return REGISTRY.select("rvq_embed_mean", codes.device).fn(codes, table, codebook_size)


# ============================================================================================================ Triton
# One program per (b, T block, H block): for each quantizer q, gather rows codes[b, q, t] + q * codebook of the table
# and add them in fp32 in quantizer order, then divide by Q (correctly rounded) and round once to the table's dtype.
# That is torch's CPU mean for every dtype (fp32 sum of the upcast rows, then the division, then one cast) given the
# same summation order; CUDA's mean multiplies by 1/Q instead, the same value for Q = 16 (a power of two). The
# interpreter truncates fp32 -> bf16/fp16 casts instead of rounding: one ulp there.

@triton.jit
def _rvq_embed_mean_kernel(codes_ptr, table_ptr, out_ptr, num_frames, hidden, num_quantizers, codebook_size,
                           scb, scq, sct, stn, sth, sob, sot, soh,
                           BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok, h_ok = t < num_frames, h < hidden
    mask = t_ok[:, None] & h_ok[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
    for q in range(num_quantizers):
        code = tl.load(codes_ptr + b * scb + q * scq + t * sct, mask=t_ok, other=0).to(tl.int64)   # [BT]
        row = code + q * codebook_size
        acc += tl.load(table_ptr + row[:, None] * stn + h[None, :] * sth, mask=mask, other=0.0).to(tl.float32)
    mean = tl.div_rn(acc, tl.full((BLOCK_T, BLOCK_H), num_quantizers, tl.float32))
    tl.store(out_ptr + b * sob + t[:, None] * sot + h[None, :] * soh, mean.to(out_ptr.dtype.element_ty), mask=mask)


def _rvq_config(frames: int, hidden: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_H, num_warps): 16 frames x 256 columns a program on a GPU, whole planes in the interpreter."""
    if INTERPRET:
        return min(triton.next_power_of_2(frames), 128), min(triton.next_power_of_2(hidden), 1024), 4
    return min(triton.next_power_of_2(frames), 16), min(triton.next_power_of_2(hidden), 256), 4


@torch.library.custom_op("omni::rvq_embed_mean_triton", mutates_args=("out",))
def _rvq_embed_mean_triton_op(codes: torch.Tensor, table: torch.Tensor, codebook_size: int, out: torch.Tensor) -> None:
    B, Q, T = codes.shape
    H = table.shape[1]
    block_t, block_h, num_warps = _rvq_config(T, H)
    grid = (B, triton.cdiv(T, block_t), triton.cdiv(H, block_h))
    _rvq_embed_mean_kernel[grid](codes, table, out, T, H, Q, codebook_size, *codes.stride(), *table.stride(),
                                 *out.stride(), BLOCK_T=block_t, BLOCK_H=block_h, num_warps=num_warps)


@_rvq_embed_mean_triton_op.register_fake
def _(codes, table, codebook_size, out):
    return None


def rvq_embed_mean_triton(codes: torch.Tensor, table: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Triton launcher; see :func:`rvq_embed_mean_ref`. Any strides; returns a contiguous (B, T, H) tensor."""
    B, Q, T = codes.shape
    out = torch.empty(B, T, table.shape[1], dtype=table.dtype, device=table.device)
    if out.numel() == 0 or Q == 0:
        return rvq_embed_mean_ref(codes, table, codebook_size)   # empty, or the reference's mean of nothing (NaN)
    _rvq_embed_mean_triton_op(codes, table, codebook_size, out)
    return out


@REGISTRY.register("rvq_embed_mean", "triton", triton_runs)
def _rvq_embed_mean_triton_or_ref(codes: torch.Tensor, table: torch.Tensor, codebook_size: int) -> torch.Tensor:
    if table.dtype not in (torch.float32, torch.float16, torch.bfloat16) or codes.device != table.device:
        return rvq_embed_mean_ref(codes, table, codebook_size)
    return rvq_embed_mean_triton(codes, table, codebook_size)


# ============================================================================================================== CUDA
# omni::rvq_embed_mean (csrc/include/omni/rvq_embed_mean.cuh): the Triton kernel's numerics (fp32 sum in quantizer
# order, correctly rounded division, one rounding), 128-bit gathers of the table rows.

@REGISTRY.register("rvq_embed_mean", "cuda", cuda_runs("rvq_embed_mean"))
def _rvq_embed_mean_cuda(codes: torch.Tensor, table: torch.Tensor, codebook_size: int) -> torch.Tensor:
    if table.dtype not in (torch.float32, torch.float16, torch.bfloat16) or codes.device != table.device \
            or codebook_size < 1:
        return rvq_embed_mean_ref(codes, table, codebook_size)
    if codes.dtype not in (torch.int32, torch.int64):
        codes = codes.long()
    out = torch.empty(codes.shape[0], codes.shape[2], table.shape[1], dtype=table.dtype, device=table.device)
    torch.ops.omni.rvq_embed_mean(codes, table, codebook_size, out)
    return out
