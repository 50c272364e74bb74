"""Triton kernels for the attention hot path (q/k norm + M-RoPE + KV write, prefill and split-KV decode attention)
against their references.

Without a GPU they run in the Triton interpreter (~25 ms of Python per program), so shapes are small and grids few.
Tolerances are per dtype in units of the dtype's epsilon; the interpreter truncates fp32 -> bf16 instead of rounding,
so bf16 gets a few ulps more there.
"""
import sys

import pytest
import torch

import omni_kernels as ok
from omni_kernels._triton import HAS_TRITON, INTERPRET
from omni_kernels.attention import (attention_ref, attention_triton, decode_attention, decode_attention_ref,
                                    decode_attention_triton)
from omni_kernels.qk_norm_rope import qk_norm_rope_triton

pytestmark = pytest.mark.skipif(not HAS_TRITON or not (INTERPRET or torch.cuda.is_available()),
                                reason="needs triton (a GPU or TRITON_INTERPRET=1)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]
# (atol, rtol) of attention outputs against the fp32 reference
ATTN_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}


def assert_ulps(out: torch.Tensor, ref: torch.Tensor, ulps: float) -> None:
    """Elementwise |out - ref| <= ulps x eps(dtype) x max|ref|: rotary sums may cancel, so errors scale with the
    operands, not the result."""
    eps = torch.finfo(out.dtype).eps
    torch.testing.assert_close(out.float(), ref.float(), atol=ulps * eps * ref.float().abs().max().item(), rtol=0)


def fused_qkv(B: int, T: int, Hq: int, Hkv: int, D: int, dtype) -> tuple[torch.Tensor, ...]:
    """q (B, T, Hq, D), k/v (B, T, Hkv, D): non-contiguous views of one fused projection output, as a model has."""
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, device=DEVICE).to(dtype).view(B, T, Hq + 2 * Hkv, D)
    return qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hkv], qkv[:, :, Hq + Hkv:]


def mrope_tables(B: int, slots: torch.Tensor, D: int, dtype):
    """Interleaved M-RoPE cos/sin (B, T, D) with distinct t/h/w rows (an image-like position grid)."""
    t = slots.to(DEVICE)[None].expand(B, -1)
    positions = torch.stack((t, t // 3 + 1, t % 5 + 2))                                   # [3, B, T]
    section = (D // 2 - 2 * (D // 6), D // 6, D // 6)
    return ok.mrope_cos_sin_ref(positions, ok.rope_inv_freq(D, 1e6), section, dtype)


def kv_cache(B: int, Hkv: int, S: int, D: int, dtype, fill: float = 7.0):
    """(k, v) caches (B, Hkv, S, D): layer views of a larger allocation, as the static KV cache hands them out."""
    kv = torch.full((2, 2, B, Hkv, S + 3, D), fill, device=DEVICE).to(dtype)
    return kv[0, 1, :, :, :S], kv[1, 1, :, :, :S]


# ---------------------------------------------------------------------------------------------------- qk_norm_rope
QK_ULPS = {torch.float32: 16, torch.float16: 2, torch.bfloat16: 4 if INTERPRET else 2}


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("B, T, Hq, Hkv, D, slots", [
    (2, 1, 4, 1, 64, [9]),                 # decode, GQA 4
    (1, 7, 8, 1, 128, list(range(5, 12))),  # slots 5..11 in the middle of the cache, GQA 8
    (1, 129, 4, 4, 72, None),              # prefill, odd head_dim, MHA
    (2, 3, 2, 2, 64, [14, 2, 9]),          # scattered slots
], ids=["decode", "slots5-11", "prefill-hd72", "scattered"])
def test_qk_norm_rope_matches_reference(B, T, Hq, Hkv, D, slots, dtype):
    S = 160
    slots = torch.arange(T) if slots is None else torch.tensor(slots)
    q, k, v = fused_qkv(B, T, Hq, Hkv, D, dtype)
    qw, kw = (1 + 0.2 * torch.randn(2, D, device=DEVICE)).to(dtype)
    cos, sin = mrope_tables(B, slots, D, dtype)
    k_cache, v_cache = kv_cache(B, Hkv, S, D, dtype)
    k_ref, v_ref = (c.clone() for c in (k_cache, v_cache))
    slots = slots.to(DEVICE)
    with ok.use_backend("triton", op="qk_norm_rope"):
        q_out = ok.qk_norm_rope(q, k, v, qw, kw, 1e-6, cos, sin, k_cache, v_cache, slots)
    q_ref = ok.qk_norm_rope_ref(q, k, v, qw, kw, 1e-6, cos, sin, k_ref, v_ref, slots)
    assert q_out.shape == (B, Hq, T, D)
    assert_ulps(q_out, q_ref, QK_ULPS[dtype])
    assert_ulps(k_cache, k_ref, QK_ULPS[dtype])
    assert torch.equal(v_cache, v_ref)                  # values are copied, and untouched slots keep their 7s
    untouched = torch.ones(S, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert (k_cache[:, :, untouched] == 7).all()


def test_qk_norm_rope_without_norm_batch_shared_tables_and_mixed_dtypes():
    B, T, Hq, Hkv, D = 2, 5, 4, 2, 64
    slots = torch.arange(3, 3 + T, device=DEVICE)
    q, k, v = fused_qkv(B, T, Hq, Hkv, D, torch.float32)
    cos, sin = mrope_tables(1, slots, D, torch.float32)                 # (1, T, D): broadcast over the batch
    caches = [kv_cache(B, Hkv, 16, D, torch.float32) for _ in range(2)]
    with ok.use_backend("triton", op="qk_norm_rope"):               # Code2Wav: no q/k norm
        out = ok.qk_norm_rope(q, k, v, None, None, 1e-6, cos, sin, *caches[0], slots)
    ref = ok.qk_norm_rope_ref(q, k, v, None, None, 1e-6, cos, sin, *caches[1], slots)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(caches[0][0], caches[1][0], atol=1e-6, rtol=1e-6)
    # a kernel rounding in one dtype cannot follow fp32 activations with bf16 tables (torch promotes per product):
    # the launcher refuses, the dispatched op falls back to the reference
    cos_b, sin_b = cos.bfloat16(), sin.bfloat16()
    with pytest.raises(ValueError, match="one dtype"):
        qk_norm_rope_triton(q, k, v, None, None, 1e-6, cos_b, sin_b, *caches[0], slots)
    with ok.use_backend("triton", op="qk_norm_rope"):
        out = ok.qk_norm_rope(q, k, v, None, None, 1e-6, cos_b, sin_b, *caches[0], slots)
    assert torch.equal(out, ok.qk_norm_rope_ref(q, k, v, None, None, 1e-6, cos_b, sin_b, *caches[1], slots))


def test_qk_norm_rope_strided_norm_weights():
    # weights that are views (every other element of one buffer) are read through their stride, not at stride 1
    B, T, Hq, Hkv, D = 1, 3, 4, 2, 64
    slots = torch.arange(T, device=DEVICE)
    q, k, v = fused_qkv(B, T, Hq, Hkv, D, torch.float32)
    buf = 1 + 0.2 * torch.randn(2, 2 * D, device=DEVICE)
    qw, kw = buf[0, ::2], buf[1, ::2]
    cos, sin = mrope_tables(B, slots, D, torch.float32)
    caches = [kv_cache(B, Hkv, 8, D, torch.float32) for _ in range(2)]
    with ok.use_backend("triton", op="qk_norm_rope"):
        out = ok.qk_norm_rope(q, k, v, qw, kw, 1e-6, cos, sin, *caches[0], slots)
    ref = ok.qk_norm_rope_ref(q, k, v, qw.contiguous(), kw.contiguous(), 1e-6, cos, sin, *caches[1], slots)
    assert_ulps(out, ref, QK_ULPS[torch.float32])
    assert_ulps(caches[0][0], caches[1][0], QK_ULPS[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("B, T, rows", [(3, 1, [[9], [0], [31]]), (2, 3, [[4, 5, 6], [20, 21, 22]])],
                         ids=["decode", "three-tokens"])
def test_qk_norm_rope_per_sequence_slots(B, T, rows, dtype):
    # (B, T) slots, one row per sequence (a batched decode over sequences of different lengths): each row lands
    # where the (T,) slots of that sequence alone would put it; the reference against row-by-row calls, the kernel
    # against the reference; int32 and a strided slot tensor too
    Hq, Hkv, D, S = 4, 2, 64, 40
    slots = torch.tensor(rows, device=DEVICE)
    q, k, v = fused_qkv(B, T, Hq, Hkv, D, dtype)
    qw, kw = (1 + 0.2 * torch.randn(2, D, device=DEVICE)).to(dtype)
    cos, sin = mrope_tables(B, torch.arange(T), D, dtype)
    k_ref, v_ref = kv_cache(B, Hkv, S, D, dtype)
    q_ref = ok.qk_norm_rope_ref(q, k, v, qw, kw, 1e-6, cos, sin, k_ref, v_ref, slots)
    k_rows, v_rows = kv_cache(B, Hkv, S, D, dtype)
    for b in range(B):
        q_b = ok.qk_norm_rope_ref(q[b:b + 1], k[b:b + 1], v[b:b + 1], qw, kw, 1e-6, cos[b:b + 1], sin[b:b + 1],
                                  k_rows[b:b + 1], v_rows[b:b + 1], slots[b])
        assert torch.equal(q_b, q_ref[b:b + 1])
    assert torch.equal(k_rows, k_ref) and torch.equal(v_rows, v_ref)
    assert (k_ref[0, :, slots[1]] == 7).all() or B == 1    # row 0's cache is untouched at row 1's slots
    wide = torch.zeros(B, 2 * T, dtype=torch.int32, device=DEVICE)
    wide[:, ::2] = slots
    for given in (slots, wide[:, ::2]):
        k_cache, v_cache = kv_cache(B, Hkv, S, D, dtype)
        with ok.use_backend("triton", op="qk_norm_rope"):
            out = ok.qk_norm_rope(q, k, v, qw, kw, 1e-6, cos, sin, k_cache, v_cache, given)
        assert_ulps(out, q_ref, QK_ULPS[dtype])
        assert_ulps(k_cache, k_ref, QK_ULPS[dtype])
        assert torch.equal(v_cache, v_ref)


# ------------------------------------------------------------------------------------------------ prefill attention
def check_attention(q, k, v, causal=True, window=None, cu_seqlens=None):
    # the launcher itself: the dispatched op sends plain causal prefill on a GPU to SDPA (measured faster)
    scale = q.shape[-1] ** -0.5
    out = attention_triton(q, k, v, scale, causal, window, cu_seqlens)
    ref = attention_ref(q.float(), k.float(), v.float(), scale, causal, window, cu_seqlens)
    atol, rtol = ATTN_TOL[q.dtype]
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("B, T, Hq, Hkv, D", [
    (2, 1, 4, 1, 64),
    (2, 7, 4, 1, 64),
    (1, 129, 2, 2, 128),
    (1, 33, 8, 1, 72),
], ids=["T1-gqa4", "T7-gqa4", "T129-mha-hd128", "T33-gqa8-hd72"])
def test_prefill_attention_matches_reference(B, T, Hq, Hkv, D, dtype):
    q, k, v = (t.transpose(1, 2) for t in fused_qkv(B, T, Hq, Hkv, D, dtype))     # strided (B, H, T, D)
    check_attention(q, k, v)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_chunked_prefill_bottom_right_causal_over_cache_slices(dtype):
    B, Hq, Hkv, D, Tq, Tk = 2, 8, 2, 64, 9, 40                                     # Tq > 4: the prefill kernel
    q = torch.randn(B, Hq, Tq, D, device=DEVICE).to(dtype)
    k_cache, v_cache = kv_cache(B, Hkv, 64, D, dtype)
    k_cache.normal_(), v_cache.normal_()
    check_attention(q, k_cache[:, :, :Tk], v_cache[:, :, :Tk])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("Tq, Tk, window", [(40, 40, 8), (6, 50, 16), (20, 20, 72), (1, 90, 72)],
                         ids=["T40-w8", "chunk6of50-w16", "shorter-than-window", "decode-w72"])
def test_sliding_window_attention(Tq, Tk, window, dtype):
    B, Hq, Hkv, D = 1, 4, 2, 64
    q = torch.randn(B, Hq, Tq, D, device=DEVICE).to(dtype)
    k, v = (torch.randn(B, Hkv, Tk, D, device=DEVICE).to(dtype) for _ in range(2))
    check_attention(q, k, v, window=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("B, H, T, D", [(3, 4, 37, 72), (2, 2, 1, 64), (1, 2, 129, 64)],
                         ids=["frames3-hd72", "one-token", "T129"])
def test_bidirectional_attention_without_segments(B, H, T, D, dtype):
    # the audio encoder's windows and the vision encoder's frames as a batch: causal=False, no cu_seqlens; short
    # non-causal calls must not take the (causal) decode kernel
    q, k, v = (t.transpose(1, 2) for t in fused_qkv(B, T, H, H, D, dtype))
    check_attention(q, k, v, causal=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_block_diagonal_attention(causal, dtype):
    B, Hq, Hkv, D, T = 1, 4, 4, 64, 50
    q, k, v = (t.transpose(1, 2) for t in fused_qkv(B, T, Hq, Hkv, D, dtype))
    cu_seqlens = torch.tensor([0, 13, 14, 39, 50], device=DEVICE)                  # uneven, one single-token window
    check_attention(q, k, v, causal=causal, cu_seqlens=cu_seqlens)


def test_block_diagonal_reference_is_per_window_attention():
    q, k, v = (torch.randn(2, 3, 20, 16, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 7, 20])
    out = attention_ref(q, k, v, 0.25, causal=False, cu_seqlens=cu)
    for s, e in ((0, 7), (7, 20)):
        torch.testing.assert_close(out[:, :, s:e], attention_ref(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], 0.25,
                                                                 causal=False))


def test_window_reference_is_banded_softmax():
    q, k, v = (torch.randn(1, 2, 12, 8, dtype=torch.float64) for _ in range(3))
    scores = (q @ k.transpose(-1, -2)) * 0.3
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    expected = scores.masked_fill(~((j <= i) & (j > i - 5)), float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(attention_ref(q, k, v, 0.3, window=5), expected)


# ------------------------------------------------------------------------------------------------- decode attention
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("Tq, Hq, Hkv, D, num_splits, window", [
    (1, 8, 1, 128, 3, None),     # GQA 8, three splits, rows shorter than a split leave empty ones
    (1, 4, 4, 64, 0, 20),        # MHA, the split heuristic, a window across a split boundary
    (4, 8, 2, 72, 2, None),      # 4 queries per row (speculative / multi-token decode), odd head_dim
], ids=["gqa8-splits3", "mha-window20", "tq4-hd72"])
def test_decode_attention_with_per_row_lengths(Tq, Hq, Hkv, D, num_splits, window, dtype):
    B, S = 3, 300
    q = torch.randn(B, Hq, Tq, D, device=DEVICE).to(dtype)
    k_cache, v_cache = kv_cache(B, Hkv, S, D, dtype, fill=float("nan"))     # NaN past S too
    k_cache.normal_(), v_cache.normal_()
    seq_lens = torch.tensor([Tq + 1, S, 130], device=DEVICE, dtype=torch.int32)
    for b, n in enumerate(seq_lens.tolist()):       # slots past each row's length hold NaN that must never be read
        k_cache[b, :, n:], v_cache[b, :, n:] = float("nan"), float("nan")
    out = decode_attention_triton(q, k_cache, v_cache, seq_lens, D**-0.5, window, num_splits)
    ref = decode_attention_ref(q.float(), k_cache.float().nan_to_num(), v_cache.float().nan_to_num(), seq_lens,
                               D**-0.5, window)
    atol, rtol = ATTN_TOL[dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    # the reference equals attention over each row's valid slice
    for b, length in enumerate(seq_lens.tolist()):
        row = attention_ref(q[b:b + 1].float(), k_cache[b:b + 1, :, :length].float(),
                            v_cache[b:b + 1, :, :length].float(), D**-0.5, window=window)
        torch.testing.assert_close(ref[b:b + 1], row, atol=1e-5, rtol=1e-5)


def test_decode_entry_point_dispatch_and_attention_routing():
    B, Hq, Hkv, D, S = 2, 4, 2, 64, 70
    q = torch.randn(B, Hq, 1, D, device=DEVICE)
    k_cache, v_cache = (torch.randn(B, Hkv, S, D, device=DEVICE) for _ in range(2))
    seq_lens = torch.tensor([3, 70], device=DEVICE)
    with ok.use_backend("triton", op="decode_attention"):
        out = decode_attention(q, k_cache, v_cache, seq_lens, 0.125)
    torch.testing.assert_close(out, decode_attention_ref(q, k_cache, v_cache, seq_lens, 0.125), atol=1e-5, rtol=1e-5)
    check_attention(q, k_cache[:, :, :45], v_cache[:, :, :45])       # attention(Tq == 1) runs the decode kernel
    with pytest.raises(ValueError, match="seq_lens"):
        decode_attention(q, k_cache, v_cache, seq_lens[:1], 0.125)


def test_cuda_decode_predicate_checks_seq_lens_like_the_launcher(monkeypatch):
    # csrc/decode_attention.cu takes int32/int64 contiguous lengths on q's device; anything else must go to Triton.
    # So does a case whose shared memory the device cannot give (here a 99 KB one, as sm_86/89).
    from omni_kernels.attention import _cuda_decode_supports
    module = sys.modules["omni_kernels.attention"]   # the package's `attention` is the function
    monkeypatch.setattr(module, "_shared_memory_optin", lambda device: 101376)
    big = torch.randn(1, 32, 1, 256)
    assert not _cuda_decode_supports(big, big[:, :1], big[:, :1], torch.tensor([1]))              # fp32: 117 KB
    assert _cuda_decode_supports(big.half(), big[:, :1].half(), big[:, :1].half(), torch.tensor([1]))
    assert _cuda_decode_supports(big[:, :16], big[:, :1], big[:, :1], torch.tensor([1]))         # 16 rows
    q = torch.randn(2, 4, 1, 64)
    k_cache, v_cache = torch.randn(2, 2, 32, 64), torch.randn(2, 2, 32, 64)
    for lens in (torch.tensor([3, 9], dtype=torch.int32), torch.tensor([3, 9])):
        assert _cuda_decode_supports(q, k_cache, v_cache, lens)
    for lens in (torch.tensor([3, 9], dtype=torch.int16), torch.tensor([3, 0, 9, 0], dtype=torch.int32)[::2],
                 torch.tensor([3.0, 9.0])):
        assert not _cuda_decode_supports(q, k_cache, v_cache, lens)


# ----------------------------------------------------------------------------------------- errors, dispatch, compile
def test_bad_arguments_and_unsupported_cases():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="window"):
        ok.attention(q, q, q, 1.0, causal=False, window=4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ok.attention(q[:, :, :4], q, q, 1.0, cu_seqlens=torch.tensor([0, 8]))
    for bad in ([2, 8], [0, 5], [0, 6, 3, 8], []):   # not from 0, short of the 8 tokens, falling, none
        with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to the 8 tokens"):
            ok.attention(q, q, q, 1.0, causal=False, cu_seqlens=torch.tensor(bad, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"decode_attention: .*\(B, H, T, D\)"):
        ok.decode_attention(q[0], q, q, torch.tensor([8]), 1.0)
    # shapes the kernels would index out of bounds: keys of another batch, values unlike the keys, not 4-D
    with pytest.raises(ValueError, match="does not fit keys"):
        ok.attention(q, q[:, :1].expand(2, 1, 8, 16), q[:, :1].expand(2, 1, 8, 16), 1.0)
    for bad_v in (q[:, :, :4], q[..., :8], q[:, :1]):
        with pytest.raises(ValueError, match="values"):
            ok.attention(q, q, bad_v, 1.0)
    with pytest.raises(ValueError, match=r"\(B, H, T, D\)"):
        ok.attention(q[0], q[0], q[0], 1.0)
    big = torch.randn(1, 1, 2, 512, device=DEVICE)                  # head_dim over the kernels' 256
    with pytest.raises(ValueError, match="head_dim"):
        attention_triton(big, big, big, 1.0)
    with ok.use_backend("triton", op="attention"):                    # the dispatched op falls back
        out = ok.attention(big, big, big, 0.05)
    b64, causal = big.double(), torch.ones(2, 2, dtype=torch.bool, device=DEVICE).tril()
    expected = (b64 @ b64.transpose(-1, -2) * 0.05).masked_fill(~causal, float("-inf")).softmax(-1) @ b64
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)     # causal softmax(q k^T s) v, fp64


@pytest.mark.gpu
def test_dispatch_sends_plain_causal_prefill_to_sdpa_and_windows_to_the_kernel():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    q, k, v = (torch.randn(1, 4, 96, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with ok.use_backend("triton", op="attention"):
        plain, windowed = ok.attention(q, k, v, 0.125), ok.attention(q, k, v, 0.125, window=16)
    assert torch.equal(plain, attention_ref(q, k, v, 0.125))
    assert torch.equal(windowed, attention_triton(q, k, v, 0.125, True, 16, None))


def test_registered_as_triton_backends():
    for op in ("qk_norm_rope", "attention", "decode_attention"):
        assert "triton" in ok.dispatch.REGISTRY.backends(op)
        assert ok.selected_backend(op, "cpu") == "torch"              # the interpreter only when forced


def test_custom_ops_trace_under_torch_compile():
    B, T, Hq, Hkv, D = 1, 5, 4, 2, 32
    slots = torch.arange(2, 2 + T, device=DEVICE)
    cos, sin = mrope_tables(B, slots, D, torch.float32)
    qw, kw = torch.randn(2, D, device=DEVICE)
    seq_lens = torch.tensor([2 + T], device=DEVICE)

    def step(q, k, v, k_cache, v_cache):
        q = ok.qk_norm_rope(q, k, v, qw, kw, 1e-6, cos, sin, k_cache, v_cache, slots)
        prefill = ok.attention(q, k_cache[:, :, :2 + T], v_cache[:, :, :2 + T], D**-0.5)
        return prefill, decode_attention(q[:, :, -1:], k_cache, v_cache, seq_lens, D**-0.5)

    inputs = fused_qkv(B, T, Hq, Hkv, D, torch.float32)
    caches = [torch.randn(B, Hkv, 12, D, device=DEVICE) for _ in range(2)]
    expected_caches, got_caches = [c.clone() for c in caches], [c.clone() for c in caches]
    expected = step(*inputs, *expected_caches)
    torch._dynamo.reset()
    try:
        with ok.use_backend("triton"):
            got = torch.compile(step, fullgraph=True, backend="aot_eager")(*inputs, *got_caches)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_caches, expected_caches, atol=1e-5, rtol=1e-5)    # mutations reach the inputs


# ------------------------------------------------------------------------------------------ GPU: model-size shapes
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_model_size_shapes_on_gpu(dtype):
    torch.manual_seed(0)
    cases = [(32, 4, 128, 1000, {}), (16, 16, 64, 1000, {"window": 72}),
             (20, 20, 64, 1000, {"causal": False, "cu_seqlens": torch.tensor([0, 104, 208, 312, 1000],
                                                                              device="cuda")})]
    for hq, hkv, d, T, kwargs in cases:                 # thinker prefill, Code2Wav, audio encoder windows
        q = torch.randn(1, hq, T, d, device="cuda", dtype=dtype)
        k, v = (torch.randn(1, hkv, T, d, device="cuda", dtype=dtype) for _ in range(2))
        check_attention(q, k, v, **kwargs)
    B, S = 8, 4096                                      # thinker decode, lengths 1 .. S
    q = torch.randn(B, 32, 1, 128, device="cuda", dtype=dtype)
    k_cache, v_cache = (torch.randn(B, 4, S, 128, device="cuda", dtype=dtype) for _ in range(2))
    seq_lens = torch.tensor([1, 17, 64, 65, 1000, 2049, 4095, 4096], device="cuda", dtype=torch.int32)
    with ok.use_backend("triton", op="decode_attention"):
        out = decode_attention(q, k_cache, v_cache, seq_lens, 128**-0.5)
    ref = decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), seq_lens, 128**-0.5)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------------------------ CUDA graphs
@pytest.mark.gpu
def test_decode_graph_replays_with_new_lengths_and_slots():
    B, Hq, Hkv, D, S = 4, 8, 2, 128, 512
    dtype = torch.bfloat16
    qw, kw = (1 + 0.1 * torch.randn(2, D, device="cuda")).to(dtype)
    k_cache, v_cache = (torch.randn(B, Hkv, S, D, device="cuda").to(dtype) for _ in range(2))
    q, k, v = fused_qkv(B, 1, Hq, Hkv, D, dtype)
    cos, sin = torch.ones(B, 1, D, device="cuda", dtype=dtype), torch.zeros(B, 1, D, device="cuda", dtype=dtype)
    slot = torch.zeros(1, dtype=torch.long, device="cuda")
    seq_lens = torch.zeros(B, dtype=torch.int32, device="cuda")

    def step():
        q_rot = ok.qk_norm_rope(q, k, v, qw, kw, 1e-6, cos, sin, k_cache, v_cache, slot)
        return decode_attention(q_rot, k_cache, v_cache, seq_lens, D**-0.5)

    with ok.use_backend("triton"):
        slot.fill_(3), seq_lens.fill_(4), step()                      # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
    for position in (10, 200, 511):
        c, s = mrope_tables(B, torch.tensor([position]), D, dtype)
        cos.copy_(c), sin.copy_(s), slot.fill_(position)
        seq_lens.copy_(torch.tensor([position + 1, 5, position + 1, 1], device="cuda").clamp(min=1))
        for t in (q, k, v):
            t.normal_()
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        q_ref = ok.qk_norm_rope_ref(q, k, v, qw, kw, 1e-6, cos, sin, k_ref, v_ref, slot)
        expected = decode_attention_ref(q_ref.float(), k_ref.float(), v_ref.float(), seq_lens, D**-0.5)
        graph.replay()
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


# -------------------------------------------------------------------------------------------------- model parity
def test_thinker_greedy_tokens_match_reference_with_triton_attention(reference_checkpoint):
    from test_thinker_parity import chat_prompt, IM_END, reference_generate

    from omni_runtime import OmniModel, SamplingParams

    folder, hf_model = reference_checkpoint()
    model = OmniModel.from_pretrained(folder)
    prompt = chat_prompt(0)
    expected, _ = reference_generate(hf_model, prompt, 4, IM_END)
    with ok.use_backend("triton", op="qk_norm_rope"), ok.use_backend("triton", op="attention"):
        out = model.generate(prompt, max_new_tokens=4, thinker_sampling=SamplingParams(temperature=0.0))
    assert out.text_ids == expected


def test_cuda_decode_shared_memory_matches_the_kernels_layout():
    # decode_attention.cuh's SplitSmemBytes: fp32 at head_dim 256 with 32 rows is the one case over sm_86/89's 99 KB
    # (101376 B), so the CUDA dispatch sends it to Triton there; everything else fits
    from omni_kernels.attention import cuda_decode_shared_memory
    assert cuda_decode_shared_memory(4, 256, 32) == 4 * 16 * 260 * 4 + 4 * (32 * 256 + 128 * 32 + 32 * 16 + 64 + 512)
    assert cuda_decode_shared_memory(4, 256, 32) == 120064 > 101376
    assert cuda_decode_shared_memory(4, 200, 17) == 120064                                   # buckets 256 and 32
    sizes = [cuda_decode_shared_memory(e, d, r) for e in (2, 4) for d in (1, 64, 65, 128, 129, 256)
             for r in (1, 2, 4, 5, 8, 9, 16, 17, 32) if (e, d > 128, r > 16) != (4, True, True)]
    assert max(sizes) <= 101376
