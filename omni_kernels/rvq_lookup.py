"""Residual-VQ embedding: the mean of one embedding per quantizer, Code2Wav's input layer.

Quantizer q owns rows ``[q * codebook_size, (q + 1) * codebook_size)`` of one shared table. The reference gathers all
Q rows into a (B, Q, T, H) tensor and takes ``.mean(1)`` (a mean, not the talker's sum), so the reduction runs over
the quantizers in the input's dtype the way torch's ``mean`` does; the reference here does exactly that.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
