"""Mixture-of-experts feed-forward: router, expert SwiGLU MLPs, weighted combine, optional shared expert.

    logits = x @ Wr^T                           # [T, E]
    p      = softmax(logits, fp32)              # router runs in fp32
    w, ids = topk(p, K)  (renormalised to sum 1 when asked), w cast to the model dtype
    y      = sum_k w_k * down_e(silu(gate_e(x)) * up_e(x)),  e = ids[k]
    talker: y += sigmoid(x @ w_sg^T) * shared_mlp(x)

Expert weights are fused per layer: ``w_gate_up`` (E, 2I, H) with the gate rows first, ``w_down`` (E, H, I).
The reference sorts token-expert pairs by expert and runs two grouped GEMMs (no host sync on CPU and Hopper),
then sums the K weighted rows of each token in rank order, exactly as the reference model's default path does.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from omni_kernels.dispatch import REGISTRY, everywhere


class SharedExpert(NamedTuple):
    """The talker's always-on expert: a SwiGLU MLP scaled by a sigmoid gate."""
    gate_proj: torch.Tensor  # [Is, H]
    up_proj: torch.Tensor    # [Is, H]
    down_proj: torch.Tensor  # [H, Is]
    gate: torch.Tensor       # [1, H]


def moe_route_ref(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, renormalize: bool):
    """x: (T, H), router_weight: (E, H) -> weights (T, K) in x's dtype, expert ids (T, K) int64, best first."""
    logits = F.linear(x, router_weight)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids


def _aligned_16(*tensors: torch.Tensor) -> bool:
    # torch's grouped GEMM wants 16-byte aligned base pointers and strides (torch >= 2.14 checks it on CPU too).
    return all(t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride() if s != 1)
               for t in tensors)


def _grouped_gemm_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not _aligned_16(x, weight):
        return False
    return x.device.type == "cpu" or (x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0))


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    # x: [S, in] rows grouped by expert, weight: [E, out, in], offsets: [E] cumulative row counts (int32).
    if _grouped_gemm_runs(x, weight):
        return F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(x[start:end], weight[expert].t(), out=out[start:end])
        start = end
    return out


def moe_experts_ref(x, w_gate_up, w_down, weights, ids) -> torch.Tensor:
    """x: (T, H), w_gate_up: (E, 2I, H), w_down: (E, H, I), weights/ids: (T, K) -> (T, H)."""
    num_tokens, top_k = ids.shape
    num_experts = w_gate_up.shape[0]
    sorted_ids, order = torch.sort(ids.reshape(-1))                                   # [S], S = T*K
    counts = torch.bincount(sorted_ids, minlength=num_experts)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)                          # [E]
    gate, up = _grouped_linear(x[order // top_k], w_gate_up, offsets).chunk(2, dim=-1)  # [S, I] each
    rows = _grouped_linear(F.silu(gate) * up, w_down, offsets)                         # [S, H]
    rows = rows * weights.reshape(-1)[order, None]
    unsorted = torch.empty_like(rows)
    unsorted[order] = rows
    return unsorted.view(num_tokens, top_k, -1).sum(dim=1)


def shared_expert_ref(x: torch.Tensor, shared: SharedExpert) -> torch.Tensor:
    """x: (T, H) -> sigmoid(x @ gate^T) * down(silu(gate_proj x) * up_proj x): (T, H)."""
    mlp = F.linear(F.silu(F.linear(x, shared.gate_proj)) * F.linear(x, shared.up_proj), shared.down_proj)
    return torch.sigmoid(F.linear(x, shared.gate)) * mlp


def fused_moe_ref(x, router_weight, w_gate_up, w_down, top_k, renormalize, shared=None) -> torch.Tensor:
    """x: (T, H) -> (T, H). See the module docstring."""
    weights, ids = moe_route_ref(x, router_weight, top_k, renormalize)
    out = moe_experts_ref(x, w_gate_up, w_down, weights, ids)
    return out if shared is None else out + shared_expert_ref(x, shared)


@torch.library.custom_op("omni::fused_moe_ref", mutates_args=())
def _fused_moe_ref_op(
    x: torch.Tensor, router_weight: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, top_k: int,
    renormalize: bool, shared_gate_proj: torch.Tensor | None, shared_up_proj: torch.Tensor | None,
    shared_down_proj: torch.Tensor | None, shared_gate: torch.Tensor | None,
) -> torch.Tensor:
    shared = None if shared_gate is None else SharedExpert(shared_gate_proj, shared_up_proj, shared_down_proj,
                                                          shared_gate)
    return fused_moe_ref(x, router_weight, w_gate_up, w_down, top_k, renormalize, shared)


@_fused_moe_ref_op.register_fake
def _(x, *args):
    return torch.empty_like(x)


@REGISTRY.register("fused_moe", "torch", everywhere)
def _fused_moe_torch(x, router_weight, w_gate_up, w_down, top_k, renormalize, shared):
    # Behind a custom op: the sort/bincount/grouped GEMM have data-dependent shapes that torch.compile cannot trace.
    return _fused_moe_ref_op(x, router_weight, w_gate_up, w_down, top_k, renormalize, *(shared or (None,) * 4))


def fused_moe(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
    renormalize: bool,
    shared: SharedExpert | None = None,
) -> torch.Tensor:
    """x: (T, H), router_weight: (E, H), w_gate_up: (E, 2I, H), w_down: (E, H, I) -> (T, H)."""
    num_experts, two_i, hidden = w_gate_up.shape
    if x.dim() != 2 or x.shape[1] != hidden or router_weight.shape != (num_experts, hidden) \
            or w_down.shape != (num_experts, hidden, two_i // 2):
        raise ValueError(f"fused_moe: shapes disagree: x {tuple(x.shape)}, router {tuple(router_weight.shape)}, "
                         f"gate_up {tuple(w_gate_up.shape)}, down {tuple(w_down.shape)}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"fused_moe: top_k={top_k} must lie in [1, {num_experts}]")
    return REGISTRY.select("fused_moe", x.device).fn(x, router_weight, w_gate_up, w_down, top_k, renormalize, shared)
