"""Per-head q/k RMSNorm, rotary embedding and KV-cache write: the attention prologue of every Qwen3 layer.

One op because a kernel does all of it in one pass over q/k/v (read once, write q and the cache slots once).
The cache layout is (B, kv_heads, max_len, head_dim); ``cache_positions`` are the slots the T new tokens occupy:
(T,) shared by the batch, or (B, T) per sequence (a batched decode over sequences of different lengths).

The Triton kernel (``_qk_norm_rope_kernel``) takes a tile of [tokens, heads, head_dim] per program, query heads and
key heads in separate head blocks of one grid. It repeats the reference's roundings: fp32 statistics, the normalised
row cast to the input dtype, the weight multiply, both rotary products and their sum each rounded to the dtype.
The rotate-half partner ``x[(d + D/2) % D]`` is a second load of the same row, so no register shuffles are needed.
Cache slots come from the ``cache_positions`` tensor, so the launch is the same for every step (graph-safe).

The CUDA op ``omni::qk_norm_rope`` (csrc/include/omni/qk_norm_rope.cuh) makes the same roundings with one block per
(token, head group) and a lane group per head that holds both rotate-half partners of its elements.
"""
from __future__ import annotations

import torch

from omni_kernels._extension import cuda_runs
from omni_kernels._triton import INTERPRET, tl, triton, triton_runs
from omni_kernels.dispatch import REGISTRY, everywhere
from omni_kernels.rms_norm import rms_norm_ref
from omni_kernels.rope import apply_rope_ref


def qk_norm_rope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_positions: torch.Tensor,
) -> torch.Tensor:
    """q: (B, T, Hq, D), k/v: (B, T, Hkv, D), cos/sin: (B, T, D), caches: (B, Hkv, S, D), cache_positions: (T,)
    or (B, T).

    Returns the rotated queries (B, Hq, T, D); writes the rotated keys and the values into the caches.
    A norm weight of None skips that norm (Code2Wav's attention has none).
    """
    if q_norm_weight is not None:
        q, k = rms_norm_ref(q, q_norm_weight, eps), rms_norm_ref(k, k_norm_weight, eps)
    q = apply_rope_ref(q.transpose(1, 2), cos, sin)
    k = apply_rope_ref(k.transpose(1, 2), cos, sin)
    write_cache(k_cache, v_cache, cache_positions, k, v.transpose(1, 2))
    return q


def write_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, cache_positions: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> None:
    """k, v: (B, Hkv, T, D) into their slots: ``cache_positions`` (T,) for every sequence, or (B, T) each its own."""
    if cache_positions.dim() == 1:
        k_cache.index_copy_(2, cache_positions, k)
        v_cache.index_copy_(2, cache_positions, v)
        return
    rows = torch.arange(k.shape[0], device=k.device)[:, None].expand_as(cache_positions)     # [B, T]
    k_cache[rows, :, cache_positions] = k.transpose(1, 2)       # advanced indices first: a (B, T, Hkv, D) target
    v_cache[rows, :, cache_positions] = v.transpose(1, 2)


@REGISTRY.register("qk_norm_rope", "torch", everywhere)
def _qk_norm_rope_torch(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache, cache_positions):
    # The reference's arithmetic on q and k heads side by side: one norm (a [heads, D] weight row per head) and one
    # rotation instead of two each. Every element sees the same operations, so the results are the reference's
    # bits; at decode on CPU the op count, not arithmetic, is the cost (~30 us saved per call).
    if q_norm_weight is None or q.dtype != k.dtype:
        return qk_norm_rope_ref(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache,
                                cache_positions)
    q_heads, kv_heads = q.shape[2], k.shape[2]
    weight = torch.cat([q_norm_weight.expand(q_heads, -1), k_norm_weight.expand(kv_heads, -1)])   # [Hq+Hkv, D]
    qk = apply_rope_ref(rms_norm_ref(torch.cat([q, k], dim=2), weight, eps).transpose(1, 2), cos, sin)
    write_cache(k_cache, v_cache, cache_positions, qk[:, q_heads:], v.transpose(1, 2))
    return qk[:, :q_heads]                                                                       # [B, Hq, T, D]


# ---------------------------------------------------------------------------------------------------------- kernel
@triton.jit
def _round(x, DTYPE: tl.constexpr):
    # one rounding to the activation dtype, kept in fp32 for the next product (a no-op for fp32)
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def _norm_rope_tile(x_ptr, sxb, sxt, sxh, sxd, w_ptr, b, t, h, d, mask, cos, sin, eps, head_dim,
                    HALF: tl.constexpr, HAS_NORM: tl.constexpr, DTYPE: tl.constexpr):
    # b, t: [BT, 1, 1], h: [1, BH, 1], d: [1, 1, BD] -> the rotated rows [BT, BH, BD] in fp32 (already rounded)
    row = x_ptr + b * sxb + t * sxt + h * sxh
    partner = tl.where(d < HALF, d + HALF, d - HALF)
    x = tl.load(row + d * sxd, mask=mask, other=0.0).to(tl.float32)
    x_rot = tl.load(row + partner * sxd, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        # 1 / sqrt, both correctly rounded like torch's CPU rsqrt (plain `/` is approximate on GPUs)
        std = tl.sqrt_rn(tl.sum(x * x, axis=2) / head_dim + eps)                              # [BT, BH]
        rstd = tl.div_rn(tl.full(std.shape, 1.0, tl.float32), std)
        d_ok = d < head_dim
        w = tl.load(w_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        w_rot = tl.load(w_ptr + partner, mask=d_ok, other=0.0).to(tl.float32)
        x = _round(w * _round(x * rstd[:, :, None], DTYPE), DTYPE)
        x_rot = _round(w_rot * _round(x_rot * rstd[:, :, None], DTYPE), DTYPE)
    x_rot = tl.where(d < HALF, -x_rot, x_rot)                                                 # rotate_half
    return _round(x * cos, DTYPE) + _round(x_rot * sin, DTYPE)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr, out_ptr, kc_ptr, vc_ptr,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd,
    scb, sct, scd, ssb, sst, ssd, sob, soh, sot, sod,
    skcb, skch, skcs, skcd, svcb, svch, svcs, svcd,
    spb, spt, num_tokens, seq_len, q_heads, kv_heads, head_dim, q_blocks, eps,
    HAS_NORM: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    b = (tok // seq_len).to(tl.int64)[:, None, None]
    t = (tok % seq_len)[:, None, None]
    tok_ok = (tok < num_tokens)[:, None, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    d_ok = d < head_dim
    cos = tl.load(cos_ptr + b * scb + t * sct + d * scd, mask=tok_ok & d_ok, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + b * ssb + t * sst + d * ssd, mask=tok_ok & d_ok, other=0.0).to(tl.float32)
    # query and key branches use their own names: Triton types names bound in both branches of a runtime `if`
    if pid_h < q_blocks:
        hq = (pid_h * BLOCK_HQ + tl.arange(0, BLOCK_HQ))[None, :, None]
        q_mask = tok_ok & (hq < q_heads) & d_ok
        q_out = _norm_rope_tile(q_ptr, sqb, sqt, sqh, sqd, qw_ptr, b, t, hq, d, q_mask, cos, sin, eps, head_dim,
                                HALF, HAS_NORM, out_ptr.dtype.element_ty)
        tl.store(out_ptr + b * sob + hq * soh + t * sot + d * sod, q_out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        hk = ((pid_h - q_blocks) * BLOCK_HK + tl.arange(0, BLOCK_HK))[None, :, None]
        k_mask = tok_ok & (hk < kv_heads) & d_ok
        slot = tl.load(pos_ptr + b * spb + t * spt, mask=tok_ok, other=0).to(tl.int64)         # [BT, 1, 1]
        k_out = _norm_rope_tile(k_ptr, skb, skt, skh, skd, kw_ptr, b, t, hk, d, k_mask, cos, sin, eps, head_dim,
                                HALF, HAS_NORM, kc_ptr.dtype.element_ty)
        tl.store(kc_ptr + b * skcb + hk * skch + slot * skcs + d * skcd, k_out.to(kc_ptr.dtype.element_ty),
                 mask=k_mask)
        v = tl.load(v_ptr + b * svb + t * svt + hk * svh + d * svd, mask=k_mask, other=0.0)
        tl.store(vc_ptr + b * svcb + hk * svch + slot * svcs + d * svcd, v, mask=k_mask)


# -------------------------------------------------------------------------------------------------------- launcher
def _config(tokens: int, q_heads: int, kv_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_HQ, BLOCK_HK, BLOCK_D): about 2k elements a program on a GPU, 64k in the interpreter."""
    block_d = triton.next_power_of_2(head_dim)
    elems = 65536 if INTERPRET else 2048
    block_hq = min(triton.next_power_of_2(q_heads), max(1, elems // block_d))
    block_hk = min(triton.next_power_of_2(kv_heads), block_hq)
    block_t = min(triton.next_power_of_2(tokens), max(1, elems // (block_hq * block_d)))
    return block_t, block_hq, block_hk, block_d


@torch.library.custom_op("omni::qk_norm_rope_triton", mutates_args=("k_cache", "v_cache", "out"))
def _qk_norm_rope_triton_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
    v_cache: torch.Tensor, cache_positions: torch.Tensor, out: torch.Tensor,
) -> None:
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    block_t, block_hq, block_hk, block_d = _config(B * T, Hq, Hkv, D)
    q_blocks = triton.cdiv(Hq, block_hq)
    grid = (triton.cdiv(B * T, block_t), q_blocks + triton.cdiv(Hkv, block_hk))
    has_norm = q_norm_weight is not None
    _qk_norm_rope_kernel[grid](
        q, k, v, q_norm_weight if has_norm else q, k_norm_weight if has_norm else q, cos, sin, cache_positions,
        out, k_cache, v_cache, *q.stride(), *k.stride(), *v.stride(), *cos.stride(), *sin.stride(),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3), *k_cache.stride(), *v_cache.stride(),
        cache_positions.stride(0) if cache_positions.dim() == 2 else 0, cache_positions.stride(-1), B * T, T, Hq,
        Hkv, D, q_blocks, eps,
        HAS_NORM=has_norm, HALF=D // 2, BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d,
        num_warps=4,
    )


@_qk_norm_rope_triton_op.register_fake
def _(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache, cache_positions, out):
    return None


def triton_supports(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache) -> bool:
    """The kernel rounds in one dtype: every tensor (weights and tables included) must share q's dtype."""
    tensors = [t for t in (q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache) if t is not None]
    return (q.dtype in (torch.float32, torch.float16, torch.bfloat16) and q.shape[-1] % 2 == 0
            and q.shape[-1] <= 1024 and all(t.dtype == q.dtype and t.device == q.device for t in tensors)
            and (q_norm_weight is None) == (k_norm_weight is None))


def qk_norm_rope_triton(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache, cache_positions):
    """Triton launcher; see :func:`qk_norm_rope_ref`. Returns a contiguous (B, Hq, T, D) query tensor."""
    if not triton_supports(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache):
        raise ValueError(f"qk_norm_rope (triton): needs one dtype (fp32/fp16/bf16) for every tensor and an even "
                         f"head_dim <= 1024, got q {q.dtype} {tuple(q.shape)}, cache {k_cache.dtype}, cos {cos.dtype}")
    B, T, Hq, D = q.shape
    out = torch.empty(B, Hq, T, D, dtype=q.dtype, device=q.device)
    cos, sin = cos.expand(B, T, D), sin.expand(B, T, D)  # tables shared by the batch get a 0 stride
    if q_norm_weight is not None:  # the kernel reads weights at unit stride; (D,) elements, no copy when contiguous
        q_norm_weight, k_norm_weight = q_norm_weight.contiguous(), k_norm_weight.contiguous()
    _qk_norm_rope_triton_op(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache,
                            cache_positions, out)
    return out


@REGISTRY.register("qk_norm_rope", "triton", triton_runs)
def _qk_norm_rope_triton_or_ref(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache,
                                cache_positions):
    # Selected per device before the call; mixed dtypes (the kernel rounds in one) fall back to the reference.
    if not triton_supports(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache):
        return qk_norm_rope_ref(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache,
                                cache_positions)
    return qk_norm_rope_triton(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache,
                               cache_positions)


# ------------------------------------------------------------------------------------------------------------ cuda
def cuda_supports(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, cache_positions) -> bool:
    """What ``omni::qk_norm_rope`` (csrc/qk_norm_rope.cu) takes: one fp32/fp16/bf16 dtype and one device for every
    tensor, an even head_dim, every tensor contiguous in its last dim, (B or 1, T, D) tables, int32/int64 slots."""
    tensors = [t for t in (q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache) if t is not None]
    return (q.dtype in (torch.float32, torch.float16, torch.bfloat16) and q.dim() == 4 and q.shape[-1] % 2 == 0
            and all(t.dtype == q.dtype and t.device == q.device and t.stride(-1) == 1 for t in tensors)
            and (q_norm_weight is None) == (k_norm_weight is None)
            and all(t.dim() == 3 and t.shape[0] in (1, q.shape[0]) for t in (cos, sin))
            and cache_positions.device == q.device and cache_positions.dtype in (torch.int32, torch.int64))


@REGISTRY.register("qk_norm_rope", "cuda", cuda_runs("qk_norm_rope"))
def _qk_norm_rope_cuda(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache, cache_positions):
    # Selected per device before the call; what the kernel does not take (mixed dtypes, odd head_dim, a strided last
    # dim, slots on the host) falls back to the reference.
    if not cuda_supports(q, k, v, q_norm_weight, k_norm_weight, cos, sin, k_cache, v_cache, cache_positions):
        return qk_norm_rope_ref(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache,
                                cache_positions)
    B, T, Hq, D = q.shape
    out = torch.empty(B, Hq, T, D, dtype=q.dtype, device=q.device)
    torch.ops.omni.qk_norm_rope(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache,
                                cache_positions.contiguous(), out)
    return out


def qk_norm_rope(q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache, cache_positions):
    """See :func:`qk_norm_rope_ref`. Shapes are checked here (the kernels index through them unchecked); slots are
    not range-checked (that needs a device sync): callers keep them in [0, S)."""
    if q.dim() != 4 or k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"qk_norm_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, T, Hq, D) and "
                         f"(B, T, Hkv, D)")
    if v.shape != k.shape:
        raise ValueError(f"qk_norm_rope: v {tuple(v.shape)} must have the keys' shape {tuple(k.shape)}")
    B, T, _, D = q.shape
    if k_cache.dim() != 4 or (k_cache.shape[0], k_cache.shape[1], k_cache.shape[3]) != (B, k.shape[2], D):
        raise ValueError(f"qk_norm_rope: cache {tuple(k_cache.shape)} does not fit keys {tuple(k.shape)}: needs "
                         f"({B}, {k.shape[2]}, S, {D})")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"qk_norm_rope: v_cache {tuple(v_cache.shape)} must have k_cache's shape "
                         f"{tuple(k_cache.shape)}")
    if (q_norm_weight is None) != (k_norm_weight is None) or any(
            w is not None and w.shape != (D,) for w in (q_norm_weight, k_norm_weight)):
        raise ValueError(f"qk_norm_rope: norm weights must both be ({D},) or both None, got "
                         f"{None if q_norm_weight is None else tuple(q_norm_weight.shape)}, "
                         f"{None if k_norm_weight is None else tuple(k_norm_weight.shape)}")
    if any(t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1:] != (T, D) for t in (cos, sin)):
        raise ValueError(f"qk_norm_rope: cos/sin must be ({B} or 1, {T}, {D}), got {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    if tuple(cache_positions.shape) not in ((T,), (B, T)) or cache_positions.dtype.is_floating_point \
            or cache_positions.dtype.is_complex or cache_positions.dtype == torch.bool:
        raise ValueError(f"qk_norm_rope: cache_positions must be ({T},) or ({B}, {T}) integers, got "
                         f"{cache_positions.dtype} {tuple(cache_positions.shape)}")
    return REGISTRY.select("qk_norm_rope", q.device).fn(
        q, k, v, q_norm_weight, k_norm_weight, eps, cos, sin, k_cache, v_cache, cache_positions)
