"""The vision encoder (spec 1.2): 16x16x2 patches -> ViT blocks with attention inside each frame -> 2x2 patch merger
to the thinker's width, plus DeepStack features taken after some blocks (added to the thinker's first layers).

Patches arrive in 2x2-merge-block order (``preprocess/vision.py``): every ``merge**2`` consecutive rows are one
merged token, and the learned position grid and the 2-D rotary positions follow that order. Every image or video is
described by one ``grid_thw`` row (frames / temporal_patch, rows and columns of patches).

Shape legend: N patches (all images and frames), M = N / merge**2 merged tokens, P pixel values per patch
(channels * temporal_patch * patch**2), C hidden, h heads, D head_dim, O out_hidden (the thinker's width),
t frames, S patches per frame (rows * cols).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import omni_kernels as ok
from omni_kernels.rope import rope_inv_freq

ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}   # hidden_act -> F.gelu(approximate=...)


@dataclass(frozen=True)
class VisionEncoderConfig:
    """``thinker_config.vision_config``; defaults are the released model's."""
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 2048
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.head_dim % 4:
            raise ValueError(f"vision_config: hidden_size {self.hidden_size} must split into {self.num_heads} heads "
                             "whose size is a multiple of 4 (2-D rotary over half the head each)")
        if math.isqrt(self.num_position_embeddings) ** 2 != self.num_position_embeddings:
            raise ValueError(f"vision_config: num_position_embeddings {self.num_position_embeddings} is not a "
                             "square grid")
        if any(not 0 <= i < self.depth for i in self.deepstack_visual_indexes):
            raise ValueError(f"vision_config: deepstack_visual_indexes {list(self.deepstack_visual_indexes)} must "
                             f"name blocks below depth {self.depth}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"vision_config: hidden_act {self.hidden_act!r} is not supported "
                             f"(one of {', '.join(ACTIVATIONS)})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def grid_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)

    @classmethod
    def from_dict(cls, d: dict) -> VisionEncoderConfig:
        rope = d.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"vision_config: rope_type {rope['rope_type']!r} is not supported (only 'axial')")
        values = {key: d[key] for key in cls.__dataclass_fields__ if d.get(key) is not None}
        if "deepstack_visual_indexes" in values:
            values["deepstack_visual_indexes"] = tuple(values["deepstack_visual_indexes"])
        values["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", cls.rope_theta)))
        return cls(**values)


# ---- positions, computed from grid_thw on the fly ----

def merge_block_coords(rows: int, cols: int, merge: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every patch of one frame, in merge-block order: two [S] long tensors."""
    shape = (rows // merge, merge, cols // merge, merge)                      # (block row, row, block col, col)
    row = torch.arange(rows, device=device).view(shape[0], merge, 1, 1).expand(shape)
    col = torch.arange(cols, device=device).view(1, 1, shape[2], merge).expand(shape)
    return row.transpose(1, 2).flatten(), col.transpose(1, 2).flatten()


def _bilinear_taps(coords: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear interpolation (align_corners=True) of a ``side``-long table at ``size`` evenly spaced points:
    coords [S] -> taps [S, 2] and weights [S, 2], both fp32 ops in the reference's order."""
    # source = i * (side - 1) / (size - 1): the divisor stays a tensor, as in the reference, since a scalar divisor
    # becomes a multiply by its reciprocal on CUDA and rounds differently.
    denominator = torch.full_like(coords, max(size - 1, 1))
    source = coords.float() * (side - 1) / denominator
    floor = source.floor()
    offsets = torch.arange(2, device=coords.device)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (source[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


def axial_rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [N, 2] (row, col) -> cos, sin: [N, D] fp32 = cat(row angles, col angles) twice (rotate-half)."""
    inv_freq = rope_inv_freq(head_dim // 2, theta).to(positions.device)       # [D/4], built on CPU like the reference
    angles = positions[..., None].float() * inv_freq                          # [N, 2, D/4]
    cos, sin = angles.cos(), angles.sin()
    cos, sin = torch.cat((cos[:, 0], cos[:, 1]), -1), torch.cat((sin[:, 0], sin[:, 1]), -1)   # [N, D/2]
    return torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)


# ---- modules ----

class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel, stride=kernel)   # holds [C, 3, 2, 16, 16]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # A Conv3d whose kernel equals its stride and its input is one matmul over the flattened (c, t, y, x) patch.
        weight = self.proj.weight
        return F.linear(pixels.to(weight.dtype), weight.view(weight.shape[0], -1), self.proj.bias)   # [N, C]


class VisionAttention(nn.Module):
    """Bidirectional attention inside each frame of each image (block-diagonal over frames)."""

    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                frames: list[tuple[int, int]]) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, self.head_dim).unbind(1)     # [N, h, D] each
        q, k = (ok.apply_rope_ref(t.float(), *rope).to(t.dtype) for t in (q, k))      # rotated in fp32
        out, start = [], 0
        for t, size in frames:                     # one image: t frames of `size` patches, one batched call
            span = slice(start, start + t * size)
            q_i, k_i, v_i = (y[span].view(t, size, self.num_heads, self.head_dim).transpose(1, 2) for y in (q, k, v))
            out.append(ok.attention(q_i, k_i, v_i, self.head_dim**-0.5, causal=False).transpose(1, 2))  # [t, S, h, D]
            start += t * size
        return self.proj(torch.cat([o.reshape(-1, self.num_heads * self.head_dim) for o in out]))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.approximate = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate=self.approximate))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                frames: list[tuple[int, int]]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, frames)                                  # [N, C]
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """merge x merge neighbouring patches -> one token of the thinker's width. The final merger normalises each
    patch before concatenating them; the DeepStack mergers normalise the concatenation."""

    def __init__(self, cfg: VisionEncoderConfig, norm_after_concat: bool):
        super().__init__()
        self.width = cfg.hidden_size * cfg.spatial_merge_size**2
        self.norm_after_concat = norm_after_concat
        self.ln_q = nn.LayerNorm(self.width if norm_after_concat else cfg.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(),
                                 nn.Linear(self.width, cfg.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_after_concat:
            return self.mlp(self.ln_q(x.view(-1, self.width)))                         # [M, O]
        return self.mlp(self.ln_q(x).view(-1, self.width))


class VisionEncoder(nn.Module):
    """Parameter names are the checkpoint's below ``thinker.visual.``."""
    checkpoint_prefix = "thinker.visual."

    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, norm_after_concat=False)
        self.merger_list = nn.ModuleList(PatchMerger(cfg, norm_after_concat=True)
                                         for _ in cfg.deepstack_visual_indexes)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_values: [N, P] in merge-block order, grid_thw: [n, 3] -> (tokens [M, O], DeepStack features: one
        [M, O] per ``deepstack_visual_indexes`` entry, in block order)."""
        grids = self.check_input(pixel_values, grid_thw)
        x = self.patch_embed(pixel_values)                                              # [N, C]
        x = x + self.position_embedding(grids, x.device).to(x.dtype)
        rope = axial_rope_cos_sin(self.rope_positions(grids, x.device), self.cfg.head_dim, self.cfg.rope_theta)
        frames = [(t, h * w) for t, h, w in grids]
        deepstack, indexes = [], list(self.cfg.deepstack_visual_indexes)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, frames)
            if i in indexes:
                deepstack.append(self.merger_list[indexes.index(i)](x))
        return self.merger(x), deepstack

    def position_embedding(self, grids: list[tuple[int, int, int]], device: torch.device) -> torch.Tensor:
        """The learned side x side grid resampled bilinearly to every frame's rows x cols: [N, C] fp32 (the
        weights are fp32, so the 4-tap sum is too, as in the reference)."""
        side, tables = self.cfg.grid_side, []
        for t, h, w in grids:
            rows, cols = merge_block_coords(h, w, self.cfg.spatial_merge_size, device)
            row_taps, row_weights = _bilinear_taps(rows, h, side)
            col_taps, col_weights = _bilinear_taps(cols, w, side)
            taps = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)            # [S, 4]
            weights = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)
            table = (self.pos_embed(taps) * weights[:, :, None]).sum(1)                           # [S, C]
            tables.append(table.repeat(t, 1))                                                     # same for every frame
        return torch.cat(tables)

    def rope_positions(self, grids: list[tuple[int, int, int]], device: torch.device) -> torch.Tensor:
        """(row, col) of every patch: [N, 2]."""
        merge = self.cfg.spatial_merge_size
        return torch.cat([torch.stack(merge_block_coords(h, w, merge, device), -1).repeat(t, 1) for t, h, w in grids])

    def check_input(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                    finite: bool = True) -> list[tuple[int, int, int]]:
        """The patches and their grids checked (``finite``: for NaN/Inf too, a pass over every patch) -> the grids
        as (t, h, w)."""
        cfg = self.cfg
        if not torch.is_tensor(pixel_values) or pixel_values.dim() != 2 or pixel_values.shape[1] != cfg.patch_dim:
            shape = tuple(pixel_values.shape) if torch.is_tensor(pixel_values) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a [patches, {cfg.patch_dim}] tensor, got {shape}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be floating point, got {pixel_values.dtype}")
        if finite and not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contain NaN or Inf")
        grid = torch.as_tensor(grid_thw)
        if grid.dim() != 2 or grid.shape[1] != 3 or grid.shape[0] == 0 or grid.is_floating_point():
            raise ValueError(f"grid_thw must be a non-empty integer [images, 3] tensor, got {grid.dtype} "
                             f"{tuple(grid.shape)}")
        grids = [tuple(int(v) for v in row) for row in grid.tolist()]
        merge = cfg.spatial_merge_size
        for t, h, w in grids:
            if t < 1 or h < 1 or w < 1 or h % merge or w % merge:
                raise ValueError(f"grid_thw row {[t, h, w]}: every entry must be >= 1 and rows/cols multiples "
                                 f"of spatial_merge_size {merge}")
        patches = sum(t * h * w for t, h, w in grids)
        if patches != pixel_values.shape[0]:
            raise ValueError(f"grid_thw {grids} describes {patches} patches but pixel_values has "
                             f"{pixel_values.shape[0]} rows")
        return grids
