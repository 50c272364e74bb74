"""omni::qk_norm_rope (csrc/qk_norm_rope.cu) against qk_norm_rope_ref (skipped without a GPU or the extension).

The kernel repeats the reference's roundings (fp32 statistics, normalised row rounded before the weight, both rotary
products and their sum rounded to the dtype); only the sum-of-squares order and the GPU reference's own rsqrt differ,
so outputs agree within a few ulps of the operands.
"""
import pytest
import torch

import omni_kernels as ok
from omni_kernels._extension import has_cuda_op

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]
ULPS = {torch.float32: 16, torch.float16: 2, torch.bfloat16: 2}


@pytest.fixture(autouse=True)
def needs_extension():
    if not torch.cuda.is_available() or not has_cuda_op("qk_norm_rope"):
        pytest.skip("needs a GPU and the compiled extension")


def assert_ulps(out, ref, ulps):
    """|out - ref| <= ulps x eps(dtype) x max|ref| (rotary sums cancel: errors scale with the operands)."""
    eps = torch.finfo(out.dtype).eps
    torch.testing.assert_close(out.float(), ref.float(), atol=ulps * eps * ref.float().abs().max().item(), rtol=0)


def fused_qkv(B, T, Hq, Hkv, D, dtype, pad=0):
    """q/k/v as strided views of one fused projection output (plus `pad` unused elements per token)."""
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D + pad, device="cuda").to(dtype)[..., pad:]
    qkv = qkv.unflatten(-1, (Hq + 2 * Hkv, D))
    return qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hkv], qkv[:, :, Hq + Hkv:]


def mrope_tables(B, slots, D, dtype):
    t = slots.cuda()[None].expand(B, -1)
    positions = torch.stack((t, t // 3 + 1, t % 5 + 2))
    section = (D // 2 - 2 * (D // 6), D // 6, D // 6)
    return ok.mrope_cos_sin_ref(positions, ok.rope_inv_freq(D, 1e6), section, dtype)


def kv_cache(B, Hkv, S, D, dtype, fill=7.0):
    """(k, v) caches (B, Hkv, S, D): non-contiguous layer views of a larger allocation."""
    kv = torch.full((2, 2, B, Hkv, S + 3, D), fill, device="cuda").to(dtype)
    return kv[0, 1, :, :, :S], kv[1, 1, :, :, :S]


def run_both(q, k, v, qw, kw, cos, sin, slots, B, Hkv, S, D, dtype):
    k_cache, v_cache = kv_cache(B, Hkv, S, D, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    with ok.use_backend("cuda", op="qk_norm_rope"):
        assert ok.selected_backend("qk_norm_rope", "cuda") == "cuda"
        out = ok.qk_norm_rope(q, k, v, qw, kw, 1e-6, cos, sin, k_cache, v_cache, slots)
    ref = ok.qk_norm_rope_ref(q, k, v, qw, kw, 1e-6, cos, sin, k_ref, v_ref, slots)
    return out, ref, (k_cache, v_cache), (k_ref, v_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("B, T, Hq, Hkv, D, slots, pad", [
    (2, 1, 4, 1, 64, [9], 0),                # decode, GQA 4, vectorised
    (1, 7, 7, 1, 128, list(range(5, 12)), 0),  # 7 tokens, 7 heads: a partial lane group / warp
    (1, 129, 4, 4, 72, None, 0),             # prefill, head_dim 72 (half 36: scalar path for fp16/bf16)
    (2, 3, 2, 2, 66, [14, 2, 9], 0),         # scattered slots, half 33: scalar path for every dtype
    (1, 1, 1, 1, 2, [0], 0),                 # smallest head
    (3, 5, 16, 2, 128, [1, 3, 5, 7, 9], 1),  # q/k/v misaligned by one element: scalar path
    (1, 2, 40, 8, 512, [0, 1], 0),           # wide head (two chunks a lane in fp32), heads over several blocks
], ids=["decode", "t7-h7", "prefill-hd72", "scattered-hd66", "hd2", "misaligned", "hd512"])
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no-norm"])
def test_qk_norm_rope_cuda_matches_reference(B, T, Hq, Hkv, D, slots, pad, norm, dtype):
    S = 160
    slots = (torch.arange(T) if slots is None else torch.tensor(slots)).cuda()
    q, k, v = fused_qkv(B, T, Hq, Hkv, D, dtype, pad)
    qw, kw = (1 + 0.2 * torch.randn(2, D, device="cuda")).to(dtype) if norm else (None, None)
    cos, sin = mrope_tables(B, slots, D, dtype)
    out, ref, (k_cache, v_cache), (k_ref, v_ref) = run_both(q, k, v, qw, kw, cos, sin, slots, B, Hkv, S, D, dtype)
    assert out.shape == (B, Hq, T, D) and out.dtype == dtype
    assert_ulps(out, ref, ULPS[dtype])
    assert_ulps(k_cache, k_ref, ULPS[dtype])
    assert torch.equal(v_cache, v_ref)  # values are copied; untouched slots keep their 7s
    untouched = torch.ones(S, dtype=torch.bool, device="cuda")
    untouched[slots] = False
    assert (k_cache[:, :, untouched] == 7).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_qk_norm_rope_cuda_per_sequence_slots(dtype, slot_dtype):
    # (B, T) slots: each sequence of a batched decode writes its own cache position, int32 slots as given
    B, T, Hq, Hkv, D, S = 3, 2, 4, 2, 128, 40
    slots = torch.tensor([[4, 5], [0, 1], [30, 31]], device="cuda", dtype=slot_dtype)
    q, k, v = fused_qkv(B, T, Hq, Hkv, D, dtype)
    qw, kw = (1 + 0.2 * torch.randn(2, D, device="cuda")).to(dtype)
    cos, sin = mrope_tables(B, torch.arange(T), D, dtype)
    out, ref, (k_cache, v_cache), (k_ref, v_ref) = run_both(q, k, v, qw, kw, cos, sin, slots, B, Hkv, S, D, dtype)
    assert_ulps(out, ref, ULPS[dtype])
    assert_ulps(k_cache, k_ref, ULPS[dtype])
    assert torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_qk_norm_rope_cuda_shared_tables_int32_slots_and_strided_out(dtype):
    B, T, Hq, Hkv, D, S = 3, 4, 4, 2, 64, 32
    slots = torch.tensor([20, 3, 31, 0], device="cuda", dtype=torch.int32)
    q, k, v = fused_qkv(B, T, Hq, Hkv, D, dtype)
    qw, kw = (1 + 0.2 * torch.randn(2, D, device="cuda")).to(dtype)
    cos, sin = mrope_tables(1, slots.long(), D, dtype)  # (1, T, D): shared by the batch
    k_cache, v_cache = kv_cache(B, Hkv, S, D, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    out = torch.empty(B, T, Hq, D, device="cuda", dtype=dtype).transpose(1, 2)  # (B, Hq, T, D) through strides
    torch.ops.omni.qk_norm_rope(q, k, v, qw, kw, 1e-6, cos, sin, k_cache, v_cache, slots, out)
    ref = ok.qk_norm_rope_ref(q, k, v, qw, kw, 1e-6, cos, sin, k_ref, v_ref, slots.long())
    assert_ulps(out, ref, ULPS[dtype])
    assert_ulps(k_cache, k_ref, ULPS[dtype])
    assert torch.equal(v_cache, v_ref)


def test_qk_norm_rope_cuda_falls_back_and_rejects():
    B, T, Hq, Hkv, D = 1, 3, 2, 1, 64
    slots = torch.arange(T, device="cuda")
    q, k, v = fused_qkv(B, T, Hq, Hkv, D, torch.float32)
    cos, sin = mrope_tables(B, slots, D, torch.float32)
    # mixed dtypes (fp32 activations, bf16 tables): the dispatched op falls back to the reference, bit for bit
    cb, sb = cos.bfloat16(), sin.bfloat16()
    caches = [kv_cache(B, Hkv, 8, D, torch.float32) for _ in range(2)]
    with ok.use_backend("cuda", op="qk_norm_rope"):
        out = ok.qk_norm_rope(q, k, v, None, None, 1e-6, cb, sb, *caches[0], slots)
    assert torch.equal(out, ok.qk_norm_rope_ref(q, k, v, None, None, 1e-6, cb, sb, *caches[1], slots))
    # the op itself names what is wrong
    out = torch.empty(B, Hq, T, D, device="cuda")
    with pytest.raises(RuntimeError, match="must have q's dtype"):
        torch.ops.omni.qk_norm_rope(q, k, v, None, None, 1e-6, cb, sb, *caches[0], slots, out)
    with pytest.raises(RuntimeError, match="head_dim must be even"):
        q3, k3, v3 = fused_qkv(B, T, Hq, Hkv, 63, torch.float32)
        torch.ops.omni.qk_norm_rope(q3, k3, v3, None, None, 1e-6, cos[..., :63], sin[..., :63],
                                    *kv_cache(B, Hkv, 8, 63, torch.float32), slots, out[..., :63])
    with pytest.raises(RuntimeError, match="cache_positions must be on"):
        torch.ops.omni.qk_norm_rope(q, k, v, None, None, 1e-6, cos, sin, *caches[0], slots.cpu(), out)
    with pytest.raises(RuntimeError, match="both norm weights or neither"):
        torch.ops.omni.qk_norm_rope(q, k, v, torch.ones(D, device="cuda"), None, 1e-6, cos, sin, *caches[0], slots,
                                    out)
    dense_q = q.contiguous()   # q_out over q's own memory
    with pytest.raises(RuntimeError, match="q_out must not overlap q"):
        torch.ops.omni.qk_norm_rope(dense_q, k, v, None, None, 1e-6, cos, sin, *caches[0], slots,
                                    dense_q.view(B, Hq, T, D))


def test_qk_norm_rope_cuda_graph_replays_with_new_slots_tables_and_inputs():
    B, Hq, Hkv, D, S = 4, 8, 2, 128, 512
    dtype = torch.bfloat16
    qw, kw = (1 + 0.1 * torch.randn(2, D, device="cuda")).to(dtype)
    k_cache, v_cache = (torch.randn(B, Hkv, S, D, device="cuda").to(dtype) for _ in range(2))
    q, k, v = fused_qkv(B, 1, Hq, Hkv, D, dtype)
    cos, sin = torch.ones(B, 1, D, device="cuda", dtype=dtype), torch.zeros(B, 1, D, device="cuda", dtype=dtype)
    slot = torch.zeros(1, dtype=torch.long, device="cuda")
    with ok.use_backend("cuda", op="qk_norm_rope"):
        ok.qk_norm_rope(q, k, v, qw, kw, 1e-6, cos, sin, k_cache, v_cache, slot)  # warm up outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ok.qk_norm_rope(q, k, v, qw, kw, 1e-6, cos, sin, k_cache, v_cache, slot)
    for position in (10, 200, 511):
        c, s = mrope_tables(B, torch.tensor([position]), D, dtype)
        cos.copy_(c), sin.copy_(s), slot.fill_(position)
        for t in (q, k, v):
            t.normal_()
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        q_ref = ok.qk_norm_rope_ref(q, k, v, qw, kw, 1e-6, cos, sin, k_ref, v_ref, slot)
        graph.replay()
        assert_ulps(out, q_ref, ULPS[dtype])
        assert_ulps(k_cache, k_ref, ULPS[dtype])
        assert torch.equal(v_cache, v_ref)
