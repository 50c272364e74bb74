"""Scaled dot-product attention over a KV cache with grouped-query heads.

Queries are the last ``Tq`` of ``Tk`` positions (bottom-right causal alignment): prefill has ``Tq == Tk``, decode
``Tq == 1``, chunked prefill anything in between. The reference calls torch SDPA with the same arguments the
reference model uses (``is_causal`` without a mask for prefill, no mask for decode, a boolean mask otherwise),
because those choices change bf16 results.

Two masks beyond plain causal: a sliding ``window`` (Code2Wav: key j is visible to query i iff i - window < j <= i)
and block-diagonal segments given as ``cu_seqlens`` boundaries (the audio encoder's windows, the vision encoder's
frames: a query sees exactly the keys of its own segment). ``decode_attention`` takes the valid length of each
batch row as a tensor, so one captured CUDA graph replays for any lengths.

The Triton kernels see every mask as one key range ``[lo_i, hi_i)`` per query row and visit only the key tiles some
row of the query tile can see:

* prefill (``_attention_fwd_kernel``): one program per (query tile, batch x query head), flash-attention online
  softmax in fp32 (``exp2`` with the scale folded into log2 units);
* decode (``_decode_split_kernel`` + ``_decode_reduce_kernel``): flash-decoding. One program per (batch x KV head,
  split of the key axis) holds all ``groups x Tq`` query rows of its KV head, so each K/V tile is read once for the
  group; it writes a partial output and its log-sum-exp, and the reduce kernel merges the splits. The split count
  depends on shapes only, never on ``seq_lens``: programs past a row's length find an empty range and write -inf.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from omni_kernels._extension import cuda_runs
from omni_kernels._triton import INTERPRET, tl, triton, triton_runs
from omni_kernels.dispatch import REGISTRY, everywhere

DECODE_MAX_QUERIES = 4     # attention() routes causal calls with Tq <= this to the split-KV decode kernel
_MAX_HEAD_DIM = 256
_MAX_DECODE_ROWS = 128     # groups x Tq rows one decode program holds
_MAX_SPLITS = 128
_LOG2E = 1.4426950408889634
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------------ references
def segment_bounds(cu_seqlens: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cu_seqlens: (n + 1,) boundaries 0 = c0 < c1 < ... < cn = length -> (start, end): (length,) int32 each.

    Token t of segment s (c_s <= t < c_{s+1}) sees the keys [start[t], end[t]) = [c_s, c_{s+1}). Computed on the
    device without a host sync.
    """
    cu = cu_seqlens.to(device=cu_seqlens.device, dtype=torch.int64)
    seg = torch.bucketize(torch.arange(length, device=cu.device), cu[1:], right=True)          # [T]
    bounds = torch.cat((cu, cu.new_full((1,), length)))
    return bounds[seg].to(torch.int32), bounds[seg + 1].to(torch.int32)


def _visible(q_len: int, kv_len: int, causal: bool, window: int | None, cu_seqlens: torch.Tensor | None,
             device: torch.device) -> torch.Tensor:
    """(Tq, Tk) boolean mask: query i sits at position Tk - Tq + i."""
    query = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    key = torch.arange(kv_len, device=device)[None, :]
    visible = key <= query if causal else torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if window is not None:
        visible = visible & (key > query - window)
    if cu_seqlens is not None:
        start, end = segment_bounds(cu_seqlens, kv_len)
        visible = visible & (key >= start[-q_len:, None]) & (key < end[-q_len:, None])
    return visible


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = True,
                  window: int | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """q: (B, Hq, Tq, D), k/v: (B, Hkv, Tk, D) with Hq % Hkv == 0 and Tq <= Tk -> (B, Hq, Tq, D).

    ``window``: causal sliding window, key j visible to query i iff i - window < j <= i. ``cu_seqlens``: (n + 1,)
    segment boundaries over the Tq == Tk tokens (0 first, Tk last); a query sees only the keys of its segment
    (bidirectional unless ``causal``). Like the reference model, a whole sequence shorter than the window is plain
    causal attention (``is_causal``); any other window or segment mask is a boolean mask.
    """
    q_len, kv_len = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    if cu_seqlens is not None or (window is not None and not (q_len == kv_len and kv_len < window)):
        mask = _visible(q_len, kv_len, causal, window, cu_seqlens, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=groups > 1)
    if not causal or q_len == 1 or q_len == kv_len:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal and q_len > 1,
                                              enable_gqa=groups > 1)
    query_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
    mask = query_pos[:, None] >= torch.arange(kv_len, device=q.device)[None, :]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                         scale: float, window: int | None = None) -> torch.Tensor:
    """q: (B, Hq, Tq, D), caches: (B, Hkv, S, D), seq_lens: (B,) ints with Tq <= seq_lens[b] <= S -> (B, Hq, Tq, D).

    Row b holds ``seq_lens[b]`` tokens, the Tq queries being the last of them; slots at or past the length are
    never read. One boolean mask over the whole cache: no host sync, so a graph replays with new lengths.
    """
    B, Hq, q_len, _ = q.shape
    S = k_cache.shape[2]
    query = seq_lens.view(B, 1, 1) - q_len + torch.arange(q_len, device=q.device).view(1, q_len, 1)    # [B, Tq, 1]
    key = torch.arange(S, device=q.device).view(1, 1, S)
    visible = key <= query
    if window is not None:
        visible = visible & (key > query - window)
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=visible[:, None], scale=scale,
                                          enable_gqa=Hq != k_cache.shape[1])


# --------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _online_softmax_step(qt, k_tile_ptr, v_tile_ptr, cols, lo, hi, d, d_ok, n_keys, m_i, l_i, acc, qk_scale,
                         skn, skd, svn, svd, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # One key tile: scores [M, N] in log2 units, rows see keys [lo, hi); m starts finite so masked rows stay NaN-free.
    # Keys at or past n_keys are not loaded: p = 0 there, but 0 * NaN = NaN, so stale cache slots must read as 0.
    col_ok = cols < n_keys
    kt = tl.load(k_tile_ptr + cols[None, :] * skn + d[:, None] * skd, mask=col_ok[None, :] & d_ok[:, None],
                 other=0.0)                                                                   # [D, N]
    vt = tl.load(v_tile_ptr + cols[:, None] * svn + d[None, :] * svd, mask=col_ok[:, None] & d_ok[None, :],
                 other=0.0)                                                                   # [N, D]
    if UPCAST:  # the interpreter multiplies bf16 bit patterns: do the products in fp32 there
        kt = kt.to(tl.float32)
        vt = vt.to(tl.float32)
    s = tl.dot(qt, kt, input_precision=PRECISION) * qk_scale
    visible = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, seg_start_ptr, seg_end_ptr,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    num_heads, q_len, kv_len, groups, head_dim, qk_scale, window,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    hk = h // groups
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    d_ok = d < head_dim
    qt = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqm + d[None, :] * sqd,
                 mask=row_ok[:, None] & d_ok[None, :], other=0.0)                             # [M, D]
    if UPCAST:
        qt = qt.to(tl.float32)

    # key range [lo, hi) of every row; query i sits at position kv_len - q_len + i
    pos = rows + (kv_len - q_len)
    lo = tl.zeros([BLOCK_M], dtype=tl.int32)
    hi = tl.zeros([BLOCK_M], dtype=tl.int32) + kv_len
    if CAUSAL:
        hi = tl.minimum(hi, pos + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, pos - window + 1)
    if HAS_SEGMENTS:
        lo = tl.maximum(lo, tl.load(seg_start_ptr + rows, mask=row_ok, other=0))
        hi = tl.minimum(hi, tl.load(seg_end_ptr + rows, mask=row_ok, other=0))
    tile_lo = tl.min(tl.where(row_ok, lo, kv_len), axis=0) // BLOCK_N * BLOCK_N
    tile_hi = tl.max(tl.where(row_ok, hi, 0), axis=0)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_head = k_ptr + b * skb + hk * skh
    v_head = v_ptr + b * svb + hk * svh
    for start in range(tile_lo, tile_hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _online_softmax_step(qt, k_head, v_head, cols, lo, hi, d, d_ok, kv_len, m_i, l_i, acc,
                                             qk_scale, skn, skd, svn, svd, UPCAST, PRECISION)
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(o_ptr + b * sob + h * soh + rows[:, None] * som + d[None, :] * sod, out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, seq_lens_ptr, o_ptr, part_o_ptr, part_lse_ptr,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
    kv_heads, q_len, groups, cache_len, head_dim, qk_scale, window, split_len, num_splits,
    HAS_WINDOW: tl.constexpr, SINGLE_SPLIT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // kv_heads).to(tl.int64)
    hk = pid_bh % kv_heads
    # row r of the group: query head hk * groups + r // Tq, query r % Tq
    r = tl.arange(0, BLOCK_M)
    h = hk * groups + r // q_len
    qi = r % q_len
    rows = groups * q_len
    row_ok = r < rows
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    qt = tl.load(q_ptr + b * sqb + h[:, None] * sqh + qi[:, None] * sqm + d[None, :] * sqd,
                 mask=row_ok[:, None] & d_ok[None, :], other=0.0)                             # [M, D]
    if UPCAST:
        qt = qt.to(tl.float32)

    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    pos = seq_len - q_len + qi
    hi = tl.minimum(pos + 1, cache_len)
    lo = tl.zeros([BLOCK_M], dtype=tl.int32)
    if HAS_WINDOW:
        lo = tl.maximum(lo, pos - window + 1)
    split_lo = split * split_len
    hi = tl.minimum(hi, split_lo + split_len)  # this split's keys only
    lo = tl.maximum(lo, split_lo)
    tile_lo = tl.min(tl.where(row_ok, lo, cache_len), axis=0) // BLOCK_N * BLOCK_N
    tile_hi = tl.max(tl.where(row_ok, hi, 0), axis=0)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_head = k_ptr + b * skb + hk * skh
    v_head = v_ptr + b * svb + hk * svh
    for start in range(tile_lo, tile_hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        # loads bounded by tile_hi <= seq_len (not cache_len): slots past the row's length are never read
        m_i, l_i, acc = _online_softmax_step(qt, k_head, v_head, cols, lo, hi, d, d_ok, tile_hi, m_i, l_i,
                                             acc, qk_scale, skn, skd, svn, svd, UPCAST, PRECISION)
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if SINGLE_SPLIT:
        tl.store(o_ptr + b * sob + h[:, None] * soh + qi[:, None] * som + d[None, :] * sod,
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        # partials: [B * Hkv, splits, rows, D] and their log2-sum-exp [B * Hkv, splits, rows], fp32
        part = (pid_bh * num_splits + split) * rows + r
        tl.store(part_o_ptr + part[:, None] * head_dim + d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=row_ok)


@triton.jit
def _decode_reduce_kernel(
    part_o_ptr, part_lse_ptr, o_ptr, sob, soh, som, sod,
    kv_heads, q_len, groups, head_dim, num_splits,
    ROWS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // kv_heads).to(tl.int64)
    hk = pid_bh % kv_heads
    rows = groups * q_len
    r = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    row_ok = r < rows
    rs_ok = row_ok[:, None] & (s[None, :] < num_splits)
    part = (pid_bh * num_splits + s[None, :]) * rows + r[:, None]                                # [R, S]
    lse = tl.load(part_lse_ptr + part, mask=rs_ok, other=float("-inf"))
    m = tl.max(lse, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m[:, None])                                                                # [R, S]
    o = tl.load(part_o_ptr + part[:, :, None] * head_dim + d[None, None, :],
                mask=rs_ok[:, :, None] & (d < head_dim)[None, None, :], other=0.0)               # [R, S, D]
    out = tl.sum(o * w[:, :, None], axis=1) / tl.sum(w, axis=1)[:, None]
    h = hk * groups + r // q_len
    qi = r % q_len
    tl.store(o_ptr + b * sob + h[:, None] * soh + qi[:, None] * som + d[None, :] * sod,
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (d < head_dim)[None, :])


# ------------------------------------------------------------------------------------------------------- launchers
def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 stays fp32 (no TF32); 16-bit ignores it


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def _prefill_config(q_len: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if INTERPRET:  # every program costs ~25 ms of Python: few, big tiles
        return min(128, max(16, triton.next_power_of_2(q_len))), 128, 4, 1
    block_d = _block_d(head_dim)
    if dtype == torch.float32 or block_d > 128:
        return 64, 32, 4, 2
    block_m = 128 if q_len > 64 else max(16, triton.next_power_of_2(q_len))
    return block_m, 64, 8 if block_m == 128 and block_d == 128 else 4, 3 if block_d <= 64 else 2


def _decode_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_N, num_stages): K and V tiles of num_stages x 2 x BLOCK_N x head_dim fit Hopper's shared memory."""
    if INTERPRET:
        return 128, 1
    if dtype == torch.float32 or _block_d(head_dim) > 128:
        return 32, 2
    return 64, 3


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(batch_heads: int, cache_len: int, block_n: int, device: torch.device) -> int:
    """Splits of the key axis: about two programs per SM, at least one key tile each. Depends on shapes only."""
    target = 2 * _sm_count(device.index or 0) if device.type == "cuda" else 2
    tiles = triton.cdiv(cache_len, block_n)
    return max(1, min(tiles, _MAX_SPLITS, triton.cdiv(target, batch_heads)))


def _strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


@torch.library.custom_op("omni::attention_triton", mutates_args=("out",))
def _attention_triton_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, scale: float,
                         causal: bool, window: int | None, seg_start: torch.Tensor | None,
                         seg_end: torch.Tensor | None) -> None:
    B, Hq, q_len, D = q.shape
    kv_len = k.shape[2]
    block_m, block_n, num_warps, num_stages = _prefill_config(q_len, D, q.dtype)
    grid = (triton.cdiv(q_len, block_m), B * Hq)
    _attention_fwd_kernel[grid](
        q, k, v, out, seg_start if seg_start is not None else q, seg_end if seg_end is not None else q,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        Hq, q_len, kv_len, Hq // k.shape[1], D, scale * _LOG2E, window or 0,
        CAUSAL=causal, HAS_WINDOW=window is not None, HAS_SEGMENTS=seg_start is not None, UPCAST=_upcast(q.dtype),
        PRECISION=_precision(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D),
        num_warps=num_warps, num_stages=num_stages,
    )


@_attention_triton_op.register_fake
def _(q, k, v, out, scale, causal, window, seg_start, seg_end):
    return None


@torch.library.custom_op("omni::decode_attention_triton", mutates_args=("out",))
def _decode_attention_triton_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                seq_lens: torch.Tensor, out: torch.Tensor, scale: float, window: int | None,
                                num_splits: int) -> None:
    B, Hq, q_len, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    groups = Hq // Hkv
    rows = groups * q_len
    block_n, num_stages = _decode_config(D, q.dtype)
    num_splits = num_splits or _num_splits(B * Hkv, S, block_n, q.device)
    split_len = triton.cdiv(triton.cdiv(S, num_splits), block_n) * block_n
    num_splits = triton.cdiv(S, split_len)
    single = num_splits == 1
    part_o = q.new_empty(0 if single else B * Hkv * num_splits * rows * D, dtype=torch.float32)
    part_lse = q.new_empty(0 if single else B * Hkv * num_splits * rows, dtype=torch.float32)
    block_d = _block_d(D)
    block_m = max(16, triton.next_power_of_2(rows))
    _decode_split_kernel[(B * Hkv, num_splits)](
        q, k_cache, v_cache, seq_lens, out, part_o, part_lse,
        *_strides(q), *_strides(k_cache), *_strides(v_cache), *_strides(out),
        Hkv, q_len, groups, S, D, scale * _LOG2E, window or 0, split_len, num_splits,
        HAS_WINDOW=window is not None, SINGLE_SPLIT=single, UPCAST=_upcast(q.dtype), PRECISION=_precision(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4 if block_m <= 32 else 8,
        num_stages=num_stages,
    )
    if single:
        return
    block_s = triton.next_power_of_2(num_splits)
    # GPU: one row per program ([splits, D] tile); interpreter: all rows of the group in one program
    reduce_rows = triton.next_power_of_2(rows) if INTERPRET else 1
    _decode_reduce_kernel[(B * Hkv, triton.cdiv(rows, reduce_rows))](
        part_o, part_lse, out, *_strides(out), Hkv, q_len, groups, D, num_splits,
        ROWS=reduce_rows, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=8 if block_s * block_d >= 8192 else 4,
    )


@_decode_attention_triton_op.register_fake
def _(q, k_cache, v_cache, seq_lens, out, scale, window, num_splits):
    return None


def _triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return (q.dtype in _DTYPES and q.dtype == k.dtype == v.dtype and q.shape[-1] <= _MAX_HEAD_DIM
            and q.device == k.device == v.device)


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                            scale: float, window: int | None = None, num_splits: int = 0) -> torch.Tensor:
    """Flash-decoding launcher; see :func:`decode_attention_ref`. ``num_splits`` 0 picks the split count."""
    if not _triton_supports(q, k_cache, v_cache) or (q.shape[1] // k_cache.shape[1]) * q.shape[2] > _MAX_DECODE_ROWS:
        raise ValueError(f"decode_attention (triton): unsupported query {tuple(q.shape)} {q.dtype} for cache "
                         f"{tuple(k_cache.shape)} {k_cache.dtype}: needs fp32/fp16/bf16, head_dim <= "
                         f"{_MAX_HEAD_DIM}, groups x Tq <= {_MAX_DECODE_ROWS}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _decode_attention_triton_op(q, k_cache, v_cache, seq_lens, out, scale, window, num_splits)
    return out


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = True,
                     window: int | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Flash-attention launcher; see :func:`attention_ref`. Causal calls with Tq <= 4 go to the decode kernel."""
    if not _triton_supports(q, k, v):
        raise ValueError(f"attention (triton): unsupported query {tuple(q.shape)} {q.dtype}, keys "
                         f"{tuple(k.shape)} {k.dtype}: needs fp32/fp16/bf16 alike, head_dim <= {_MAX_HEAD_DIM}")
    B, Hq, q_len, _ = q.shape
    if (causal and cu_seqlens is None and q_len <= DECODE_MAX_QUERIES
            and (Hq // k.shape[1]) * q_len <= _MAX_DECODE_ROWS):
        seq_lens = torch.full((B,), k.shape[2], dtype=torch.int32, device=q.device)
        return decode_attention_triton(q, k, v, seq_lens, scale, window)
    seg_start, seg_end = segment_bounds(cu_seqlens, q_len) if cu_seqlens is not None else (None, None)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _attention_triton_op(q, k, v, out, scale, causal, window, seg_start, seg_end)
    return out


# -------------------------------------------------------------------------------------------------------- dispatch
REGISTRY.register("attention", "torch", everywhere)(attention_ref)
REGISTRY.register("decode_attention", "torch", everywhere)(decode_attention_ref)


def _sdpa_is_faster(q: torch.Tensor, k: torch.Tensor, window: int | None, cu_seqlens: torch.Tensor | None) -> bool:
    # Measured on an H100 (bench/results/attention_nvidia-h100-80gb-hbm3.json, bf16): SDPA's flash kernel beats
    # ours on plain causal prefill (264 against 456 us at 4096 tokens, 35 against 56 us at 1024) and ties at one
    # query; ours wins 4-12x on sliding windows and block-diagonal segments, which SDPA can only take as a dense
    # boolean mask. A few new tokens over a longer cache would need such a mask too, so they stay ours.
    plain = window is None and cu_seqlens is None
    return q.is_cuda and plain and q.shape[2] in (1, k.shape[2])


@REGISTRY.register("attention", "triton", triton_runs)
def _attention_triton_or_ref(q, k, v, scale, causal, window, cu_seqlens):
    # Selected per device before the call; the cases the kernels do not cover, or where SDPA was measured faster,
    # go to the reference (SDPA).
    if not _triton_supports(q, k, v) or _sdpa_is_faster(q, k, window, cu_seqlens):
        return attention_ref(q, k, v, scale, causal, window, cu_seqlens)
    return attention_triton(q, k, v, scale, causal, window, cu_seqlens)


@REGISTRY.register("decode_attention", "triton", triton_runs)
def _decode_attention_triton_or_ref(q, k_cache, v_cache, seq_lens, scale, window):
    if not _triton_supports(q, k_cache, v_cache) or (q.shape[1] // k_cache.shape[1]) * q.shape[2] > _MAX_DECODE_ROWS:
        return decode_attention_ref(q, k_cache, v_cache, seq_lens, scale, window)
    return decode_attention_triton(q, k_cache, v_cache, seq_lens, scale, window)


_CUDA_DECODE_MAX_ROWS = 32   # omni::decode_attention limits: groups x Tq rows per CTA, 16-byte K/V rows
_CUDA_DECODE_THREADS = 128


def cuda_decode_shared_memory(element_size: int, head_dim: int, rows: int) -> int:
    """Bytes of shared memory omni::decode_attention's split kernel takes (decode_attention.cuh, SplitSmemBytes, for
    the head-dim bucket 64/128/256 and row bucket 1/4/8/16/32 it launches)."""
    dmax = next(d for d in (64, 128, 256) if head_dim <= d)
    bucket = next(r for r in (1, 4, 8, 16, 32) if rows <= r)
    vec = 16 // element_size
    keys = 32 if dmax * element_size <= 256 else 16
    tiles = 4 * keys * (dmax + vec) * element_size                    # 2 stages x (K, V) tiles
    floats = bucket * dmax + _CUDA_DECODE_THREADS * bucket + bucket * keys + 2 * bucket + _CUDA_DECODE_THREADS * vec
    return tiles + 4 * floats


def _shared_memory_optin(device: torch.device) -> int:
    """The most dynamic shared memory a block may opt in to on ``device`` (99 KB on sm_86/89, 227 KB on sm_90)."""
    return _shared_memory_optin_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _shared_memory_optin_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def _cuda_decode_supports(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          seq_lens: torch.Tensor) -> bool:
    # csrc/decode_attention.cu's checks: 16-byte K/V chunks, <= 32 rows, int32/int64 contiguous lengths on q's device;
    # and the shared memory it takes must fit the device (fp32 at head_dim > 128 with > 16 rows: 117 KB, over the
    # 99 KB of sm_86/89)
    vec, rows = 16 // q.element_size(), (q.shape[1] // k_cache.shape[1]) * q.shape[2]
    return (_triton_supports(q, k_cache, v_cache) and q.shape[-1] % vec == 0
            and seq_lens.dtype in (torch.int32, torch.int64) and seq_lens.device == q.device
            and (seq_lens.stride(0) == 1 or seq_lens.shape[0] == 1)
            and rows <= _CUDA_DECODE_MAX_ROWS
            and cuda_decode_shared_memory(q.element_size(), q.shape[-1], rows)
            <= _shared_memory_optin(q.device)
            and all(c.stride(-1) == 1 and c.data_ptr() % 16 == 0 and all(s % vec == 0 for s in c.stride()[:-1])
                    for c in (k_cache, v_cache)))


def _cuda_decode_splits(batch_heads: int, cache_len: int, device: torch.device) -> int:
    """Like the Triton heuristic (two CTAs per SM, >= 32 keys each, <= 128 splits); depends on shapes only."""
    target = 2 * _sm_count(device.index or 0)
    return max(1, min(-(-cache_len // 32), _MAX_SPLITS, -(-target // batch_heads)))


@REGISTRY.register("decode_attention", "cuda", cuda_runs("decode_attention"))
def _decode_attention_cuda(q, k_cache, v_cache, seq_lens, scale, window):
    # Cases outside the kernel's limits go to the Triton kernel (or the reference).
    if not _cuda_decode_supports(q, k_cache, v_cache, seq_lens):
        if triton_runs(q.device):
            return _decode_attention_triton_or_ref(q, k_cache, v_cache, seq_lens, scale, window)
        return decode_attention_ref(q, k_cache, v_cache, seq_lens, scale, window)
    B, Hq, q_len, D = q.shape
    Hkv = k_cache.shape[1]
    rows = Hq // Hkv * q_len
    splits = _cuda_decode_splits(B * Hkv, k_cache.shape[2], q.device)
    partial_out = torch.empty((B * Hkv, splits, rows, D), dtype=torch.float32, device=q.device)
    partial_lse = torch.empty((B * Hkv, splits, rows), dtype=torch.float32, device=q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    torch.ops.omni.decode_attention(q, k_cache, v_cache, seq_lens, scale, window, partial_out, partial_lse, out)
    return out


# ---------------------------------------------------------------------------------------------------- entry points
def _check_window(window: int | None, causal: bool) -> None:
    if window is not None and (window < 1 or not causal):
        raise ValueError(f"attention: window {window} needs causal attention and window >= 1")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = True,
              window: int | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """See :func:`attention_ref`."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"attention: q and k must be (B, H, T, D), got {tuple(q.shape)}, {tuple(k.shape)}")
    if (k.shape[0] != q.shape[0] or q.shape[1] % k.shape[1] or q.shape[2] > k.shape[2]
            or q.shape[-1] != k.shape[-1]):
        raise ValueError(f"attention: query {tuple(q.shape)} does not fit keys {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"attention: values {tuple(v.shape)} must have the keys' shape {tuple(k.shape)}")
    _check_window(window, causal)
    if cu_seqlens is not None and (cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point()
                                   or q.shape[2] != k.shape[2]):
        raise ValueError(f"attention: cu_seqlens must be a 1-D integer tensor over Tq == Tk tokens, got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)} for Tq {q.shape[2]}, Tk {k.shape[2]}")
    if cu_seqlens is not None and not _capturing(q):
        _check_boundaries(cu_seqlens, q.shape[2])
    return REGISTRY.select("attention", q.device).fn(q, k, v, scale, causal, window, cu_seqlens)


def _capturing(x: torch.Tensor) -> bool:
    """Whether a check that reads the device (a host sync) must be skipped: a CUDA graph capture or a trace."""
    return torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_boundaries(cu_seqlens: torch.Tensor, length: int) -> None:
    cu = cu_seqlens.tolist()
    if not cu or cu[0] != 0 or cu[-1] != length or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"attention: cu_seqlens must rise from 0 to the {length} tokens, got {cu}")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float, window: int | None = None) -> torch.Tensor:
    """See :func:`decode_attention_ref`. Lengths are not range-checked (that needs a host sync); callers do it."""
    if q.dim() != 4 or k_cache.dim() != 4:
        raise ValueError(f"decode_attention: q and the caches must be (B, H, T, D), got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}")
    B, Hq, _, D = q.shape
    if (k_cache.shape[0] != B or Hq % k_cache.shape[1] or k_cache.shape[-1] != D
            or v_cache.shape != k_cache.shape or q.shape[2] > k_cache.shape[2]):
        raise ValueError(f"decode_attention: query {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    if seq_lens.shape != (B,) or seq_lens.is_floating_point():
        raise ValueError(f"decode_attention: seq_lens must be ({B},) integers, got {seq_lens.dtype} "
                         f"{tuple(seq_lens.shape)}")
    _check_window(window, True)
    return REGISTRY.select("decode_attention", q.device).fn(q, k_cache, v_cache, seq_lens, scale, window)


