"""omni::decode_attention (CUDA flash-decoding) against decode_attention_ref; skipped without a GPU or the op."""
import pytest
import torch

import omni_kernels as ok
from omni_kernels._extension import has_cuda_op
from omni_kernels.attention import decode_attention, decode_attention_ref

pytestmark = pytest.mark.gpu

# (atol, rtol) of outputs against the fp32 reference: the kernel accumulates in fp32 but rounds P to nothing, the
# reference (SDPA) may run P.V in the input dtype.
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 2e-2), (torch.float16, 3e-3, 3e-3)]


@pytest.fixture(autouse=True)
def needs_extension():
    if not torch.cuda.is_available() or not has_cuda_op("decode_attention"):
        pytest.skip("needs a GPU and the compiled extension")


def caches(B, Hkv, S, D, dtype, pad=3):
    """(k, v): views of one larger allocation (strided over S), slots past S hold NaN that must never be read."""
    kv = torch.randn(2, B, Hkv, S + pad, D, device="cuda").to(dtype)
    kv[:, :, :, S:] = float("nan")
    return kv[0, :, :, :S], kv[1, :, :, :S]


def run_cuda(q, k_cache, v_cache, seq_lens, scale, window=None):
    with ok.use_backend("cuda", op="decode_attention"):
        assert ok.selected_backend("decode_attention", "cuda") == "cuda"
        return decode_attention(q, k_cache, v_cache, seq_lens, scale, window)


def poison_past_lengths(k_cache, v_cache, seq_lens):
    for b, n in enumerate(seq_lens.tolist()):
        k_cache[b, :, n:] = float("nan")
        v_cache[b, :, n:] = float("nan")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("B, Hq, Hkv, Tq, D, S, window", [
    (1, 1, 1, 1, 64, 1, None),        # one key
    (3, 8, 1, 1, 128, 300, None),     # GQA 8 (thinker), lengths across splits
    (2, 32, 4, 1, 128, 129, None),    # thinker heads, just over a power of two
    (7, 4, 4, 1, 64, 129, 20),        # MHA with a window (Code2Wav-like), odd batch
    (2, 8, 2, 4, 72, 300, None),      # 4 queries per row, head_dim 72 (not a bucket size)
    (1, 16, 2, 2, 256, 517, 33),      # head_dim 256, 16 rows, window
    (2, 32, 1, 1, 96, 7, None),       # 32 rows, cache shorter than a tile
    (1, 32, 1, 1, 256, 77, None),     # 32 rows at head_dim 256: fp32 needs 117 KB (Triton where a GPU has less)
])
def test_decode_attention_cuda_matches_reference(B, Hq, Hkv, Tq, D, S, window, dtype, atol, rtol):
    torch.manual_seed(0)
    q = torch.randn(B, Hq, Tq, D, device="cuda").to(dtype)
    k_cache, v_cache = caches(B, Hkv, S, D, dtype)
    lens = [S, Tq, (S + Tq) // 2, S - 1, Tq + 1, S, 5]
    seq_lens = torch.tensor([max(Tq, min(S, n)) for n in lens[:B]], device="cuda", dtype=torch.int32)
    poison_past_lengths(k_cache, v_cache, seq_lens)
    out = run_cuda(q, k_cache, v_cache, seq_lens, D**-0.5, window)
    assert out.shape == q.shape and out.dtype == dtype
    ref = decode_attention_ref(q.float(), k_cache.float().nan_to_num(), v_cache.float().nan_to_num(), seq_lens,
                               D**-0.5, window)
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_decode_attention_cuda_non_contiguous_and_int64_lengths(dtype, atol, rtol):
    B, Hq, Hkv, D, S = 3, 8, 2, 128, 200
    qkv = torch.randn(B, 1, Hq + 2 * Hkv, D, device="cuda").to(dtype)      # q from a fused projection, transposed
    q = qkv[:, :, :Hq].transpose(1, 2)
    big = torch.randn(B, 2 * Hkv, S + 8, D, device="cuda").to(dtype)        # every other head, strided over S
    k_cache, v_cache = big[:, 0::2, :S], big[:, 1::2, :S]
    seq_lens = torch.tensor([1, 200, 77], device="cuda", dtype=torch.int64)
    out = run_cuda(q, k_cache, v_cache, seq_lens, 0.1)
    ref = decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), seq_lens, 0.1)
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    out2 = torch.empty_like(q.transpose(1, 2)).transpose(1, 2)            # strided out through the raw op
    rows = Hq // Hkv
    po = torch.empty(B * Hkv, 3, rows, D, device="cuda")
    lse = torch.empty(B * Hkv, 3, rows, device="cuda")
    torch.ops.omni.decode_attention(q, k_cache, v_cache, seq_lens, 0.1, None, po, lse, out2)
    torch.testing.assert_close(out2.float(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("splits", [1, 2, 5, 128])
def test_decode_attention_cuda_split_counts_agree(splits):
    B, Hq, Hkv, D, S = 2, 8, 2, 64, 400
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache = caches(B, Hkv, S, D, torch.bfloat16)
    seq_lens = torch.tensor([400, 31], device="cuda", dtype=torch.int32)
    out = torch.empty_like(q)
    po = torch.empty(B * Hkv, splits, Hq // Hkv, D, device="cuda")
    lse = torch.empty(B * Hkv, splits, Hq // Hkv, device="cuda")
    torch.ops.omni.decode_attention(q, k_cache, v_cache, seq_lens, 0.125, 50, po, lse, out)
    ref = decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), seq_lens, 0.125, 50)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_decode_attention_cuda_rejects_bad_arguments():
    q = torch.randn(1, 4, 1, 64, device="cuda")
    k = torch.randn(1, 2, 16, 64, device="cuda")
    lens = torch.tensor([16], device="cuda", dtype=torch.int32)
    po, lse, out = torch.empty(2, 1, 2, 64, device="cuda"), torch.empty(2, 1, 2, device="cuda"), torch.empty_like(q)
    op = torch.ops.omni.decode_attention
    with pytest.raises(RuntimeError, match="head_dim must be a multiple"):
        op(q[..., :63], k[..., :63], k[..., :63], lens, 1.0, None, po[..., :63], lse, out[..., :63])
    with pytest.raises(RuntimeError, match="seq_lens must be int32 or int64"):
        op(q, k, k, lens.float(), 1.0, None, po, lse, out)
    with pytest.raises(RuntimeError, match="partial_lse must be"):
        op(q, k, k, lens, 1.0, None, po, lse[:1], out)
    with pytest.raises(RuntimeError, match="window must be >= 1"):
        op(q, k, k, lens, 1.0, 0, po, lse, out)
    many = torch.randn(1, 66, 1, 64, device="cuda")                        # 33 rows per KV head
    with pytest.raises(RuntimeError, match="at most 32"):
        op(many, k, k, lens, 1.0, None, po, lse, torch.empty_like(many))
    # the dispatched entry point falls back outside the kernel's limits
    ref = decode_attention_ref(many, k, k, lens, 1.0)
    torch.testing.assert_close(run_cuda(many, k, k, lens, 1.0), ref, atol=1e-5, rtol=1e-5)


def test_decode_attention_cuda_graph_replays_with_new_lengths():
    B, Hq, Hkv, D, S = 8, 32, 4, 128, 1024      # thinker decode; graph batch 8 with padded rows of length 1
    dtype = torch.bfloat16
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=dtype)
    k_cache, v_cache = caches(B, Hkv, S, D, dtype, pad=0)
    seq_lens = torch.ones(B, dtype=torch.int32, device="cuda")
    run_cuda(q, k_cache, v_cache, seq_lens, D**-0.5)                       # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with ok.use_backend("cuda", op="decode_attention"), torch.cuda.graph(graph):
        out = decode_attention(q, k_cache, v_cache, seq_lens, D**-0.5)
    for lengths in ([1, 17, 64, 65, 1000, 1023, 1024, 1], [5, 5, 300, 1, 1, 1, 1, 1], [1024] * 8):
        q.normal_(), k_cache.normal_(), v_cache.normal_()
        seq_lens.copy_(torch.tensor(lengths, device="cuda"))
        graph.replay()
        ref = decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), seq_lens, D**-0.5)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_registered_as_cuda_backend():
    assert "cuda" in ok.dispatch.REGISTRY.backends("decode_attention")
    assert ok.selected_backend("decode_attention", "cuda") == "cuda"
