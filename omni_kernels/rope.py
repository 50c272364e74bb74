"""Rotary position embeddings: cos/sin tables (1-D and interleaved multimodal M-RoPE) and the rotate-half apply.

Qwen3-Omni's TM-RoPE gives every token three positions (t, h, w). Frequency slot j of the 64 (head_dim 128) takes its
angle from row h when ``j % 3 == 1 and j < 3 * sections[1]``, from row w when ``j % 3 == 2 and j < 3 * sections[2]``,
and from row t otherwise; the half-table is then repeated (``cat(f, f)``) because the rotation is rotate-half, not
pairwise. With text and audio only the three rows are equal and this is plain 1-D RoPE.
"""
from __future__ import annotations

import torch


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """(head_dim // 2,) fp32 inverse frequencies ``1 / theta^(2i / head_dim)``."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))


def mrope_cos_sin_ref(
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section: tuple[int, ...] | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: (3, B, T) t/h/w rows (or (B, T) for 1-D RoPE) -> cos, sin: (B, T, head_dim) in ``dtype``.

    Angles are fp32. The tables are built in the reference's order for each kind (M-RoPE: cos/sin over the
    (3, B, T, D/2) table, then pick sections, then duplicate; 1-D: duplicate, then cos/sin), because the shape
    ``cos``/``sin`` run on can change fp32 results in the last bit on CPU.
    """
    inv_freq = inv_freq.to(device=positions.device, dtype=torch.float32)
    if positions.dim() == 2:  # 1-D RoPE: the reference duplicates the angles before cos/sin
        angles = positions[..., None].float() * inv_freq                                  # [B, T, D/2]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)
    freqs = positions[..., None].float() * inv_freq                                        # [3, B, T, D/2]
    cos, sin = freqs.cos(), freqs.sin()
    if mrope_section is not None:
        cos, sin = _interleave_sections(cos, mrope_section), _interleave_sections(sin, mrope_section)
    else:
        cos, sin = cos[0], sin[0]
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((sin, sin), dim=-1).to(dtype)


def _interleave_sections(table: torch.Tensor, mrope_section: tuple[int, ...]) -> torch.Tensor:
    # table: [3, B, T, D/2] -> [B, T, D/2], slot j from row (j % 3) within the first 3 * section slots of that row.
    out = table[0].clone()
    for row in (1, 2):
        slots = slice(row, 3 * mrope_section[row], 3)
        out[..., slots] = table[row, ..., slots]
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, T, D), cos/sin: (B, T, D) -> (B, heads, T, D); products and sum rounded in x's dtype."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)
