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

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from omni_kernels._extension import cuda_runs
from omni_kernels._triton import INTERPRET, tl, triton, triton_runs
from omni_kernels.dispatch import REGISTRY, everywhere
from omni_kernels.moe_combine import moe_combine
from omni_kernels.silu_mul import silu_mul


class SharedExpert(NamedTuple):
    """The talker's always-on expert: a SwiGLU MLP scaled by a sigmoid gate."""
    gate_proj: torch.Tensor  # [Is, H]
    up_proj: torch.Tensor    # [Is, H]
    down_proj: torch.Tensor  # [H, Is]
    gate: torch.Tensor       # [1, H]
    # gate_proj, up_proj and gate as one [2 Is + 1, H] weight whose rows they are views of (the GPU runtime's
    # fuse_projections): one GEMM at decode instead of three; None: three
    fused: torch.Tensor | None = None


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
    if x.device.type == "cpu":
        return True
    return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    # x: [S, in] rows grouped by expert, weight: [E, out, in], offsets: [E] cumulative row counts (int32).
    # On CPU grouped_mm is a loop of one mm per expert, empty ones included (~10 us each, plus a host read of each
    # offset): with fewer rows than experts (decode) the loop below over the used experts alone gives the same bits
    # (the same mm on the same row groups) at a fraction of the cost (thinker decode, 32 experts: 530 -> 45 us).
    if _grouped_gemm_runs(x, weight) and not (x.device.type == "cpu" and x.shape[0] < weight.shape[0]):
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


def shared_expert_parts(x: torch.Tensor, shared: SharedExpert) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (T, H) -> the shared expert's gate logits (T, 1) and its MLP's output (T, H), with ``shared_expert_ref``'s
    math and roundings; ``moe_combine`` applies the gate. The three input projections are one GEMM when
    ``shared.fused`` is given (3 launches at decode, not 6; a GPU GEMM of other rows may block, and so round,
    differently). A traced call (torch.compile) drops ``fused``: the custom op takes the four weights."""
    if shared.fused is None:
        up = F.silu(F.linear(x, shared.gate_proj)) * F.linear(x, shared.up_proj)
        return F.linear(x, shared.gate), F.linear(up, shared.down_proj)
    inter, hidden = shared.gate_proj.shape
    fused = shared.fused
    if fused.shape != (2 * inter + 1, hidden) or fused.dtype != x.dtype or fused.device != x.device:
        raise ValueError(f"shared expert: fused input weight {tuple(fused.shape)} {fused.dtype} {fused.device} "
                         f"does not stack gate_proj, up_proj and gate {(2 * inter + 1, hidden)} {x.dtype} {x.device}")
    projected = F.linear(x, fused)                                                 # [T, 2 Is + 1]
    return projected[:, 2 * inter:], F.linear(silu_mul(projected[:, :2 * inter]), shared.down_proj)


def fused_moe_ref(x, router_weight, w_gate_up, w_down, top_k, renormalize, shared=None) -> torch.Tensor:
    """x: (T, H) -> (T, H). See the module docstring."""
    weights, ids = moe_route_ref(x, router_weight, top_k, renormalize)
    out = moe_experts_ref(x, w_gate_up, w_down, weights, ids)
    return out if shared is None else out + shared_expert_ref(x, shared)


def fused_moe_custom_op(name: str, impl):
    """``impl(x, router_weight, w_gate_up, w_down, top_k, renormalize, shared)`` as the torch custom op
    ``omni::<name>`` (the shared expert flattened into optional tensors), with a fake implementation, so that
    torch.compile traces it as one opaque op; returns a function of the ``fused_moe`` signature calling it."""

    @torch.library.custom_op(f"omni::{name}", mutates_args=())
    def op(
        x: torch.Tensor, router_weight: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, top_k: int,
        renormalize: bool, shared_gate_proj: torch.Tensor | None, shared_up_proj: torch.Tensor | None,
        shared_down_proj: torch.Tensor | None, shared_gate: torch.Tensor | None,
    ) -> torch.Tensor:
        shared = None if shared_gate is None else SharedExpert(shared_gate_proj, shared_up_proj, shared_down_proj,
                                                              shared_gate)
        return impl(x, router_weight, w_gate_up, w_down, top_k, renormalize, shared)

    op.register_fake(lambda x, *args: x.new_empty(x.shape))   # row-major (T, H), whatever x's layout

    def call(x, router_weight, w_gate_up, w_down, top_k, renormalize, shared):
        if torch.compiler.is_compiling():   # traced as one opaque op
            return op(x, router_weight, w_gate_up, w_down, top_k, renormalize, *(shared or (None,) * 4)[:4])
        # Eager calls skip the custom-op wrapper: its Python dispatch costs ~250 us a call on CPU, as much as a
        # talker MoE layer's whole arithmetic.
        return impl(x, router_weight, w_gate_up, w_down, top_k, renormalize, shared)

    return call


# Behind a custom op: the sort/bincount/grouped GEMM have data-dependent shapes that torch.compile cannot trace.
REGISTRY.register("fused_moe", "torch", everywhere)(fused_moe_custom_op("fused_moe_ref", fused_moe_ref))


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
    if w_gate_up.dim() != 3 or w_gate_up.shape[1] % 2:
        raise ValueError(f"fused_moe: gate_up must be (E, 2I, H), gate rows then up rows, got "
                         f"{tuple(w_gate_up.shape)}")
    num_experts, two_i, hidden = w_gate_up.shape
    if x.dim() != 2 or x.shape[1] != hidden or router_weight.shape != (num_experts, hidden) \
            or w_down.shape != (num_experts, hidden, two_i // 2):
        raise ValueError(f"fused_moe: shapes disagree: x {tuple(x.shape)}, router {tuple(router_weight.shape)}, "
                         f"gate_up {tuple(w_gate_up.shape)}, down {tuple(w_down.shape)}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"fused_moe: top_k={top_k} must lie in [1, {num_experts}]")
    return REGISTRY.select("fused_moe", x.device).fn(x, router_weight, w_gate_up, w_down, top_k, renormalize, shared)


# ============================================================================================================ Triton
# P = T*K token-expert pairs; pair p is slot p % K of token p // K. Both GEMMs work on pair rows:
#   route:    logits (torch F.linear, the reference's call) -> softmax/top-k kernel -> weights [T, K], ids [T, K]
#   rows:     decode (T <= DECODE_MAX_TOKENS): one program per (pair, N-tile); the first pair of each expert computes
#             all of that expert's rows, the others exit, so each selected expert's weights are read once, no sort.
#             prefill: pairs sorted by expert into BLOCK_M-padded blocks (moe_align_block_size), one program per
#             (block, N-tile).
#   gate_up:  h[p] = silu(x[t] W_e[:I]^T) * (x[t] W_e[I:]^T), both tiles in one program: [P, I] is all we write
#   down:     rows[p] = w_p * (h[p] W_down_e^T), written to [T, K, H] then summed over K by torch: deterministic and
#             the reference's combine exactly (an fp32 atomic combine needs a zeroed buffer, a cast, and adds in any
#             order); the extra traffic (T*K*H each way) is <1% of the weight bytes at 64 tokens, ~20% at 4096
#             where the GEMMs are compute-bound. With the talker's shared expert, moe_combine sums them and adds
#             the gated shared expert in one kernel (the reference: sum, sigmoid, multiply, add)
# Rounding mirrors the reference: gate, up, silu, the product, y and w*y are each rounded to the model dtype; the K
# rows are summed in fp32 in rank order (torch's sum), so the combine is bit-identical given the same rows.
DECODE_MAX_TOKENS = 16
CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "fused_moe"
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _moe_route_kernel(logits_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, stride_lt,
                      TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """logits (T, E) -> fp32 softmax, top-k best first (ties: lowest id), optional renormalisation."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, BLOCK_K)
    t_mask, e_mask = offs_t < num_tokens, offs_e < num_experts
    logits = tl.load(logits_ptr + offs_t[:, None].to(tl.int64) * stride_lt + offs_e[None, :],
                     mask=t_mask[:, None] & e_mask[None, :], other=0.0).to(tl.float32)
    logits = tl.where(e_mask[None, :], logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = tl.where(e_mask[None, :], p / tl.sum(p, axis=1)[:, None], -1.0)   # padded experts are never picked
    weights = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    ids = tl.zeros((BLOCK_T, BLOCK_K), tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(probs, axis=1)
        # lowest id among equal probabilities; num_experts - 1 if none matches (NaN logits): never out of range
        idx = tl.min(tl.where(probs == best[:, None], offs_e[None, :], num_experts - 1), axis=1)
        weights = tl.where(offs_k[None, :] == k, best[:, None], weights)
        ids = tl.where(offs_k[None, :] == k, idx[:, None], ids)
        probs = tl.where(offs_e[None, :] == idx[:, None], -1.0, probs)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, axis=1)[:, None]
    out = offs_t[:, None] * TOP_K + offs_k[None, :]
    mask = t_mask[:, None] & (offs_k[None, :] < TOP_K)
    tl.store(weights_ptr + out, weights.to(weights_ptr.dtype.element_ty), mask=mask)
    tl.store(ids_ptr + out, ids, mask=mask)


@triton.jit
def _moe_align_count_kernel(ids_ptr, rank_ptr, chunk_counts_ptr, num_pairs,
                            BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per chunk of BLOCK_P pairs: each pair's rank among the chunk's pairs of its expert, and per-expert counts."""
    pid = tl.program_id(0)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_e = tl.arange(0, BLOCK_E)
    ids = tl.load(ids_ptr + offs_p, mask=offs_p < num_pairs, other=-1)
    onehot = (ids[:, None] == offs_e[None, :]).to(tl.int32)                  # [BLOCK_P, BLOCK_E]
    rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1
    tl.store(rank_ptr + offs_p, rank, mask=offs_p < num_pairs)
    tl.store(chunk_counts_ptr + pid * BLOCK_E + offs_e, tl.sum(onehot, axis=0))


@triton.jit
def _moe_align_scan_kernel(chunk_counts_ptr, chunk_base_ptr, block_expert_ptr, sorted_ptr, num_padded_ptr,
                           num_chunks, num_pairs, max_blocks, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_Q: tl.constexpr):
    """One program: expert e owns sorted slots [start_e, start_e + ceil(count_e / BLOCK_M) * BLOCK_M)."""
    offs_e = tl.arange(0, BLOCK_E)
    offs_c = tl.arange(0, BLOCK_C)
    total = tl.zeros((BLOCK_E,), tl.int32)
    for c0 in range(0, num_chunks, BLOCK_C):
        rows = c0 + offs_c
        total += tl.sum(tl.load(chunk_counts_ptr + rows[:, None] * BLOCK_E + offs_e[None, :],
                                mask=rows[:, None] < num_chunks, other=0), axis=0)
    padded = tl.cdiv(total, BLOCK_M) * BLOCK_M
    end = tl.cumsum(padded, axis=0)
    num_padded = tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, num_padded)
    base = end - padded                                                       # where each chunk's pairs go
    for c0 in range(0, num_chunks, BLOCK_C):
        rows = c0 + offs_c
        mask = rows[:, None] < num_chunks
        counts = tl.load(chunk_counts_ptr + rows[:, None] * BLOCK_E + offs_e[None, :], mask=mask, other=0)
        tl.store(chunk_base_ptr + rows[:, None] * BLOCK_E + offs_e[None, :],
                 base[None, :] + tl.cumsum(counts, axis=0) - counts, mask=mask)
        base += tl.sum(counts, axis=0)
    # block b belongs to the first expert whose padded range ends after it (blocks past the end get E: unused)
    for b0 in range(0, max_blocks, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        expert = tl.sum((end[None, :] <= blocks[:, None] * BLOCK_M).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + blocks, expert, mask=blocks < max_blocks)
    # padding slots name no pair (num_pairs); the scatter kernel then overwrites the real slots
    for q0 in range(0, num_padded, BLOCK_Q):
        slots = q0 + tl.arange(0, BLOCK_Q)
        tl.store(sorted_ptr + slots, tl.zeros((BLOCK_Q,), tl.int32) + num_pairs, mask=slots < num_padded)


@triton.jit
def _moe_align_scatter_kernel(ids_ptr, rank_ptr, chunk_base_ptr, sorted_ptr, num_pairs,
                              BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = offs_p < num_pairs
    ids = tl.load(ids_ptr + offs_p, mask=mask, other=0)
    slot = tl.load(chunk_base_ptr + pid * BLOCK_E + ids, mask=mask) + tl.load(rank_ptr + offs_p, mask=mask)
    tl.store(sorted_ptr + slot, offs_p, mask=mask)


@triton.jit
def _program_tile(num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # grouped ordering: GROUP_M row tiles share each weight tile while it is hot in L2
    pid = tl.program_id(0)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % group_m, (pid % in_group) // group_m


@triton.jit
def _skip_tile(pid_m, ids_ptr, num_padded_ptr, num_pairs, SORTED: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_P: tl.constexpr):
    if SORTED:  # a block past the padded end
        skip = pid_m * BLOCK_M >= tl.load(num_padded_ptr)
    else:       # a pair whose expert an earlier pair already handles
        offs_p = tl.arange(0, BLOCK_P)
        ids = tl.load(ids_ptr + offs_p, mask=offs_p < num_pairs, other=-1)
        skip = tl.min(tl.where(ids == tl.load(ids_ptr + pid_m), offs_p, BLOCK_P), axis=0) != pid_m
    return skip


@triton.jit
def _tile_rows(pid_m, ids_ptr, sorted_ptr, block_expert_ptr, num_pairs, SORTED: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr):
    """(expert, pairs [BLOCK_M], row mask) of a row tile."""
    offs_m = tl.arange(0, BLOCK_M)
    if SORTED:
        expert = tl.load(block_expert_ptr + pid_m)
        pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + offs_m)
        row_mask = pairs < num_pairs
    else:  # compact the pairs routed to this expert (at most one per token, so <= T <= BLOCK_M) into rows
        offs_p = tl.arange(0, BLOCK_P)
        expert = tl.load(ids_ptr + pid_m)
        mine = tl.load(ids_ptr + offs_p, mask=offs_p < num_pairs, other=-1) == expert
        rank = tl.cumsum(mine.to(tl.int32), axis=0) - 1
        hit = mine[None, :] & (rank[None, :] == offs_m[:, None])             # [BLOCK_M, BLOCK_P]
        pairs = tl.sum(tl.where(hit, offs_p[None, :], 0), axis=1)
        row_mask = tl.sum(hit.to(tl.int32), axis=1) > 0
    return expert.to(tl.int64), pairs, row_mask


@triton.jit
def _a_pointers(base_ptr, rows, stride_r, stride_k, offs_k, BLOCK_M: tl.constexpr):
    # GEMV (one row): a [BLOCK_K, 1] column, broadcast against the [BLOCK_K, BLOCK_N] weight tile
    if BLOCK_M == 1:
        ptrs = base_ptr + tl.sum(rows, axis=0).to(tl.int64) * stride_r + offs_k[:, None] * stride_k
    else:
        ptrs = base_ptr + rows.to(tl.int64)[:, None] * stride_r + offs_k[None, :] * stride_k
    return ptrs


@triton.jit
def _load_a(ptrs, row_mask, k_mask, BLOCK_M: tl.constexpr):
    if BLOCK_M == 1:
        a = tl.load(ptrs, mask=k_mask[:, None], other=0.0)
    else:
        a = tl.load(ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
    return a


@triton.jit
def _mma(a, b, acc, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if BLOCK_M == 1:  # one token: CUDA-core FMAs into a [BLOCK_K, BLOCK_N] accumulator, reduced after the loop
        acc += b.to(tl.float32) * a.to(tl.float32)
    else:
        if UPCAST:    # the interpreter multiplies bf16 bit patterns (triton#11584)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _reduce_acc(acc, BLOCK_M: tl.constexpr):
    if BLOCK_M == 1:
        acc = tl.sum(acc, axis=0)[None, :]
    return acc


@triton.jit
def _moe_gate_up_kernel(
    x_ptr, w_ptr, h_ptr, ids_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_pairs, num_pid_m, top_k, inter, hidden,
    stride_xt, stride_xh, stride_we, stride_wn, stride_wk,
    SORTED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """h[p, n] = silu(x[t] . W[e, n]) * (x[t] . W[e, I + n]) for the pairs p = (t, k) routed to expert e."""
    pid_m, pid_n = _program_tile(num_pid_m, tl.cdiv(inter, BLOCK_N), GROUP_M)
    if _skip_tile(pid_m, ids_ptr, num_padded_ptr, num_pairs, SORTED, BLOCK_M, BLOCK_P):
        return
    expert, pairs, row_mask = _tile_rows(pid_m, ids_ptr, sorted_ptr, block_expert_ptr, num_pairs, SORTED,
                                         BLOCK_M, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < inter
    a_ptrs = _a_pointers(x_ptr, pairs // top_k, stride_xt, stride_xh, offs_k, BLOCK_M)
    g_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BK, BN]
    u_ptrs = g_ptrs + inter * stride_wn
    if BLOCK_M == 1:
        acc_g = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
        acc_u = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
    else:
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_mask = offs_k < hidden - k0
        a = _load_a(a_ptrs, row_mask, k_mask, BLOCK_M)
        w_mask = k_mask[:, None] & n_mask[None, :]
        acc_g = _mma(a, tl.load(g_ptrs, mask=w_mask, other=0.0), acc_g, BLOCK_M, PRECISION, UPCAST)
        acc_u = _mma(a, tl.load(u_ptrs, mask=w_mask, other=0.0), acc_u, BLOCK_M, PRECISION, UPCAST)
        a_ptrs += BLOCK_K * stride_xh
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    dtype = h_ptr.dtype.element_ty
    gate = _reduce_acc(acc_g, BLOCK_M).to(dtype).to(tl.float32)
    up = _reduce_acc(acc_u, BLOCK_M).to(dtype).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(h_ptr + pairs.to(tl.int64)[:, None] * inter + offs_n[None, :], (act * up).to(dtype),
             mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _moe_down_kernel(
    h_ptr, w_ptr, weights_ptr, out_ptr, ids_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_pairs, num_pid_m, hidden, inter,
    stride_we, stride_wn, stride_wk,
    SORTED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """out[p, n] = w_p * (h[p] . W[e, n]) for the pairs p routed to expert e; out is [T, K, H]."""
    pid_m, pid_n = _program_tile(num_pid_m, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    if _skip_tile(pid_m, ids_ptr, num_padded_ptr, num_pairs, SORTED, BLOCK_M, BLOCK_P):
        return
    expert, pairs, row_mask = _tile_rows(pid_m, ids_ptr, sorted_ptr, block_expert_ptr, num_pairs, SORTED,
                                         BLOCK_M, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < hidden
    a_ptrs = _a_pointers(h_ptr, pairs, inter, 1, offs_k, BLOCK_M)
    b_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k_mask = offs_k < inter - k0
        a = _load_a(a_ptrs, row_mask, k_mask, BLOCK_M)
        acc = _mma(a, tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0), acc, BLOCK_M,
                   PRECISION, UPCAST)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wk
    dtype = out_ptr.dtype.element_ty
    y = _reduce_acc(acc, BLOCK_M).to(dtype).to(tl.float32)
    w = tl.load(weights_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + pairs.to(tl.int64)[:, None] * hidden + offs_n[None, :], (y * w[:, None]).to(dtype),
             mask=row_mask[:, None] & n_mask[None, :])


# ------------------------------------------------------------------------------------------------- launch configs
# A table per (E, N=I, K=H, device, dtype): {"<tokens>": {"BLOCK_M": .., "gate_up": {..}, "down": {..}}}, each GEMM's
# entry holding BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages (gate_up's BLOCK_N counts gate columns: a program
# computes BLOCK_N gate and BLOCK_N up columns). BLOCK_M is shared (both GEMMs walk the same sorted blocks); decode
# entries (tokens <= DECODE_MAX_TOKENS) ignore it. Lookup stays within a kernel variant: one token (GEMV: no tl.dot,
# any BLOCK_N), 2..DECODE_MAX_TOKENS (decode, tl.dot), more (prefill). bench/tune_fused_moe.py writes the tables.
def config_file_name(num_experts: int, inter: int, hidden: int, dtype: torch.dtype, device_name: str) -> str:
    dtype_name = str(dtype).removeprefix("torch.")
    return f"E={num_experts},N={inter},K={hidden},device_name={device_name.replace(' ', '_')},dtype={dtype_name}.json"


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


class GpuTarget(NamedTuple):
    capability: int     # 10 * major + minor: 80 Ampere, 90 Hopper
    shared_memory: int  # bytes one program may use (the opt-in maximum)


@functools.cache
def gpu_target(device: torch.device) -> GpuTarget | None:
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    smem = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return GpuTarget(10 * major + minor, smem)


def gemm_shared_memory(block_m: int, cfg: dict, weight_tiles: int, elem_bytes: int, capability: int) -> int:
    """Shared memory of a GEMM's pipelined operand tiles (A and ``weight_tiles`` weight tiles per K step). Triton
    keeps num_stages buffers on Hopper and num_stages - 1 on Ampere (measured on compiled kernels); the GEMV
    (BLOCK_M == 1) stages nothing through shared memory."""
    if block_m == 1:
        return 0
    stage = (block_m + weight_tiles * cfg["BLOCK_N"]) * cfg["BLOCK_K"] * elem_bytes
    return stage * (cfg["num_stages"] if capability >= 90 else max(1, cfg["num_stages"] - 1))


@functools.cache
def _config_table(folder: Path, file_name: str) -> dict[int, dict] | None:
    path = folder / file_name
    return {int(m): cfg for m, cfg in json.loads(path.read_text()).items()} if path.is_file() else None


def default_config(num_tokens: int, top_k: int, num_experts: int, inter: int, hidden: int,
                   dtype: torch.dtype = torch.bfloat16, target: GpuTarget | None = None) -> dict:
    """Heuristic launch config when no table matches. ``target``: the GPU it runs on (None: any)."""
    p2 = triton.next_power_of_2
    if INTERPRET:  # the interpreter pays per program, not per element: few, large tiles
        gemm = dict(GROUP_M=1, num_warps=4, num_stages=1)
        return dict(BLOCK_M=64, gate_up=dict(BLOCK_N=min(p2(inter), 128), BLOCK_K=min(p2(hidden), 128), **gemm),
                    down=dict(BLOCK_N=min(p2(hidden), 128), BLOCK_K=min(p2(inter), 128), **gemm))
    if num_tokens == 1:  # GEMV: 16 weight rows x 256 columns a step, enough CTAs per SM to keep HBM busy
        gemv = dict(BLOCK_N=16, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=2)
        return dict(BLOCK_M=1, gate_up=gemv, down=gemv)
    if num_tokens <= DECODE_MAX_TOKENS:
        small = dict(BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3)
        return dict(BLOCK_M=16, gate_up=small, down=small)
    rows_per_expert = num_tokens * top_k / num_experts
    if rows_per_expert <= 32:
        gemm = dict(BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)
        return dict(BLOCK_M=16 if rows_per_expert <= 16 else 32, gate_up=gemm, down=gemm)
    if rows_per_expert >= 96 and dtype in (torch.float16, torch.bfloat16) and target and target.capability >= 90:
        big = _hopper_prefill_config(dtype.itemsize, target)
        if big:
            return big
    return dict(BLOCK_M=64, gate_up=dict(BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3),
                down=dict(BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3))


def _hopper_prefill_config(elem_bytes: int, target: GpuTarget) -> dict | None:
    """Compute-bound prefill on Hopper: 128 x 256 output tiles (gate_up: 128 gate + 128 up columns), two
    warpgroups of m64 wgmma, 48 KB a K step; as many stages (<= 4) as shared memory holds, at least 3. Compiled for
    sm_90 these use ~210 registers a thread and no spills; on Ampere the same tiles spill (mma.sync keeps more
    fragments live), so Ampere keeps the 64-row tiles."""
    config = dict(BLOCK_M=128)
    for role, block_n, weight_tiles in (("gate_up", 128, 2), ("down", 256, 1)):
        cfg = dict(BLOCK_N=block_n, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
        while cfg["num_stages"] >= 3 and gemm_shared_memory(128, cfg, weight_tiles, elem_bytes,
                                                            target.capability) > target.shared_memory:
            cfg["num_stages"] -= 1
        if cfg["num_stages"] < 3:
            return None
        config[role] = cfg
    return config


def moe_launch_config(num_tokens: int, top_k: int, num_experts: int, inter: int, hidden: int, dtype: torch.dtype,
                      device: torch.device) -> dict:
    """The table entry of the nearest token count that runs the same kernel variant, else the default."""
    table = _config_table(CONFIG_DIR, config_file_name(num_experts, inter, hidden, dtype, _device_name(device)))
    variant = lambda m: (m > 1) + (m > DECODE_MAX_TOKENS)  # noqa: E731
    sizes = [m for m in table or () if variant(m) == variant(num_tokens)]
    if not sizes:
        return default_config(num_tokens, top_k, num_experts, inter, hidden, dtype, gpu_target(device))
    return table[min(sizes, key=lambda m: (abs(m - num_tokens), m))]


# ------------------------------------------------------------------------------------------------------ launchers
def moe_route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: (T, E) -> weights (T, K) in logits' dtype, expert ids (T, K) int32, best first."""
    num_tokens, num_experts = logits.shape
    block_e = triton.next_power_of_2(num_experts)
    block_t = min(triton.next_power_of_2(num_tokens), max(1, (8192 if INTERPRET else 2048) // block_e))
    weights = logits.new_empty(num_tokens, top_k)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
    _moe_route_kernel[(triton.cdiv(num_tokens, block_t),)](
        logits, weights, ids, num_tokens, num_experts, logits.stride(0), TOP_K=top_k, RENORMALIZE=renormalize,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k), num_warps=4 if block_e <= 128 else 8)
    return weights, ids


@dataclass(frozen=True, slots=True)
class MoeRows:
    """Which pair rows each GEMM program takes (see the section comment). Tensors live on the device; no syncs."""
    ids: torch.Tensor                  # (P,) int32 expert of each pair
    top_k: int
    block_m: int
    num_pid_m: int                     # decode: P programs; prefill: an upper bound on the number of blocks
    sorted_pairs: torch.Tensor | None  # prefill: (num_pid_m * block_m,) pair per slot, P for padding
    block_expert: torch.Tensor | None  # prefill: (num_pid_m,) expert of each block
    num_padded: torch.Tensor | None    # prefill: (1,) number of slots in use

    @property
    def sorted(self) -> bool:
        return self.sorted_pairs is not None

    @property
    def block_p(self) -> int:
        return max(16, triton.next_power_of_2(self.ids.numel())) if not self.sorted else 16

    def pointers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.sorted:
            return self.ids, self.sorted_pairs, self.block_expert, self.num_padded
        return self.ids, self.ids, self.ids, self.ids   # unused in decode mode


def moe_decode_rows(ids: torch.Tensor) -> MoeRows:
    """ids: (T, K) -> one program per pair; rows per expert <= T, so BLOCK_M = 1 (GEMV) for one token."""
    num_tokens, top_k = ids.shape
    block_m = 1 if num_tokens == 1 else max(16, triton.next_power_of_2(num_tokens))
    return MoeRows(ids.reshape(-1), top_k, block_m, ids.numel(), None, None, None)


def moe_align(ids: torch.Tensor, num_experts: int, block_m: int, block_p: int | None = None) -> MoeRows:
    """ids: (T, K) -> pairs sorted by expert (stable), each expert's run padded to a multiple of block_m."""
    num_tokens, top_k = ids.shape
    num_pairs, device = ids.numel(), ids.device
    block_e = triton.next_power_of_2(num_experts)
    if block_p is None:  # pairs per program: a [block_p, block_e] one-hot in registers (the interpreter: one program)
        block_p = min(triton.next_power_of_2(num_pairs), max(16, (32768 if INTERPRET else 8192) // block_e))
    num_chunks = triton.cdiv(num_pairs, block_p)
    # sum_e ceil(c_e / BM) <= (P + n (BM - 1)) / BM over the n <= min(E, P) experts in use, and <= P
    max_blocks = min(num_pairs, (num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m)
    ids = ids.reshape(-1)
    rank = torch.empty(num_pairs, dtype=torch.int32, device=device)
    chunk_counts = torch.empty(num_chunks, block_e, dtype=torch.int32, device=device)
    chunk_base = torch.empty_like(chunk_counts)
    sorted_pairs = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    _moe_align_count_kernel[(num_chunks,)](ids, rank, chunk_counts, num_pairs, BLOCK_P=block_p, BLOCK_E=block_e)
    _moe_align_scan_kernel[(1,)](chunk_counts, chunk_base, block_expert, sorted_pairs, num_padded, num_chunks,
                                 num_pairs, max_blocks, BLOCK_M=block_m, BLOCK_E=block_e,
                                 BLOCK_C=max(1, 4096 // block_e), BLOCK_B=max(16, 4096 // block_e), BLOCK_Q=1024)
    _moe_align_scatter_kernel[(num_chunks,)](ids, rank, chunk_base, sorted_pairs, num_pairs, BLOCK_P=block_p,
                                             BLOCK_E=block_e)
    return MoeRows(ids, top_k, block_m, max_blocks, sorted_pairs, block_expert, num_padded)


def _dot_flags(dtype: torch.dtype) -> dict:
    upcast = INTERPRET and dtype == torch.bfloat16
    return dict(PRECISION="ieee" if dtype == torch.float32 or upcast else "tf32", UPCAST=upcast)


def _gemm_meta(rows: MoeRows, cfg: dict, dtype: torch.dtype) -> dict:
    return dict(SORTED=rows.sorted, BLOCK_P=rows.block_p, BLOCK_M=rows.block_m, BLOCK_N=cfg["BLOCK_N"],
                BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"], **_dot_flags(dtype))


def moe_gate_up(x: torch.Tensor, w_gate_up: torch.Tensor, rows: MoeRows, cfg: dict) -> torch.Tensor:
    """x: (T, H), w_gate_up: (E, 2I, H) -> h: (P, I) = silu(gate) * up per pair."""
    inter, hidden = w_gate_up.shape[1] // 2, w_gate_up.shape[2]
    num_pairs = rows.ids.numel()
    h = x.new_empty(num_pairs, inter)
    grid = (rows.num_pid_m * triton.cdiv(inter, cfg["BLOCK_N"]),)
    _moe_gate_up_kernel[grid](x, w_gate_up, h, *rows.pointers(), num_pairs, rows.num_pid_m, rows.top_k, inter,
                              hidden, *x.stride(), *w_gate_up.stride(), **_gemm_meta(rows, cfg, x.dtype))
    return h


def moe_down(h: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor, rows: MoeRows, cfg: dict) -> torch.Tensor:
    """h: (P, I), w_down: (E, H, I), weights: (T, K) -> weighted rows (P, H), P = T*K in (token, slot) order."""
    hidden, inter = w_down.shape[1], w_down.shape[2]
    num_pairs = rows.ids.numel()
    out = h.new_empty(num_pairs, hidden)
    grid = (rows.num_pid_m * triton.cdiv(hidden, cfg["BLOCK_N"]),)
    _moe_down_kernel[grid](h, w_down, weights, out, *rows.pointers(), num_pairs, rows.num_pid_m, hidden, inter,
                           *w_down.stride(), **_gemm_meta(rows, cfg, h.dtype))
    return out


def fused_moe_triton(x, router_weight, w_gate_up, w_down, top_k, renormalize, shared=None, *,
                     decode: bool | None = None, config: dict | None = None) -> torch.Tensor:
    """fused_moe on Triton kernels. ``decode`` forces a path (default: decode for <= DECODE_MAX_TOKENS tokens);
    ``config`` overrides the launch config. Other dtypes than fp16/bf16/fp32 run the reference."""
    num_tokens, hidden = x.shape
    num_experts, inter = w_gate_up.shape[0], w_down.shape[2]
    if x.dtype not in _TRITON_DTYPES or any(w.dtype != x.dtype for w in (router_weight, w_gate_up, w_down)):
        return fused_moe_ref(x, router_weight, w_gate_up, w_down, top_k, renormalize, shared)
    if num_tokens == 0:
        return x.new_zeros(0, hidden)
    weights, ids = moe_route(F.linear(x, router_weight), top_k, renormalize)
    decode = num_tokens <= DECODE_MAX_TOKENS if decode is None else decode
    config = config or moe_launch_config(num_tokens, top_k, num_experts, inter, hidden, x.dtype, x.device)
    rows = moe_decode_rows(ids) if decode else moe_align(ids, num_experts, config["BLOCK_M"])
    h = moe_gate_up(x, w_gate_up, rows, config["gate_up"])
    out = moe_down(h, w_down, weights, rows, config["down"]).view(num_tokens, top_k, hidden)
    return out.sum(dim=1) if shared is None else moe_combine(out, *shared_expert_parts(x, shared))


REGISTRY.register("fused_moe", "triton", triton_runs)(
    fused_moe_custom_op("fused_moe_triton", lambda *args: fused_moe_triton(*args)))  # late-bound: tests patch it


# ============================================================================================================== CUDA
# torch.ops.omni.fused_moe (csrc/include/omni/moe.cuh): the routing kernel, the decode GEMVs (<= 16 tokens, no sort)
# or the on-device align + grouped GEMMs (tensor cores for fp16/bf16), and the combine, with the reference's
# roundings; the router GEMM stays on F.linear (the reference's call), the shared expert on shared_expert_parts
# and moe_combine.
CUDA_MAX_EXPERTS = 1024


def fused_moe_cuda(x, router_weight, w_gate_up, w_down, top_k, renormalize, shared=None) -> torch.Tensor:
    """fused_moe on the CUDA extension. Other dtypes than fp16/bf16/fp32, mixed dtypes or more than
    CUDA_MAX_EXPERTS experts run the reference."""
    num_tokens, hidden = x.shape
    if x.dtype not in _TRITON_DTYPES or any(w.dtype != x.dtype for w in (router_weight, w_gate_up, w_down)) \
            or w_gate_up.shape[0] > CUDA_MAX_EXPERTS:
        return fused_moe_ref(x, router_weight, w_gate_up, w_down, top_k, renormalize, shared)
    out = x.new_empty(num_tokens, hidden)
    if num_tokens > 0:
        torch.ops.omni.fused_moe(x, F.linear(x, router_weight), w_gate_up, w_down, top_k, renormalize, out)
    # the routed experts come summed: one row each to combine with the gated shared expert
    return out if shared is None else moe_combine(out.unsqueeze(1), *shared_expert_parts(x, shared))


def moe_route_cuda(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: (T, E) -> weights (T, K) in logits' dtype, expert ids (T, K) int32, best first (the CUDA kernel)."""
    weights = logits.new_empty(logits.shape[0], top_k)
    ids = torch.empty(logits.shape[0], top_k, dtype=torch.int32, device=logits.device)
    torch.ops.omni.moe_route(logits, top_k, renormalize, weights, ids)
    return weights, ids


# opt-in until measured on a GPU against the Triton kernel (bench/bench_fused_moe.py)
REGISTRY.register("fused_moe", "cuda", cuda_runs("fused_moe"), opt_in=True)(
    fused_moe_custom_op("fused_moe_cuda", lambda *args: fused_moe_cuda(*args)))
