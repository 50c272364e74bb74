"""CUDA Code2Wav ops (omni::rvq_embed_mean, omni::causal_conv1d, omni::causal_conv_transpose1d) against their
references, streamed, in place and under CUDA-graph replay (skipped without a GPU or without the built extension).

Tolerances: the kernels sum in fp32 in another order than torch/cuDNN (fp32: summation order only; the reference
conv runs with TF32 off), then round once; fp16/bf16 allow a couple of ulps for cuDNN's own roundings. The fused
SnakeBeta repeats snake_beta_ref's per-op roundings with the same expf/sinf, so it adds little.
"""
import pytest
import torch

import omni_kernels as ok
from omni_kernels._extension import has_cuda_op
from omni_kernels.causal_conv import causal_conv1d_ref, causal_conv_transpose1d_ref
from omni_kernels.rvq_lookup import rvq_embed_mean_ref

pytestmark = pytest.mark.gpu

DTYPES = [(torch.float32, 1e-4, 1e-4), (torch.float16, 4e-3, 4e-3), (torch.bfloat16, 3e-2, 2e-2)]


def needs(op):
    if not torch.cuda.is_available() or not has_cuda_op(op):
        pytest.skip(f"needs a GPU and the compiled extension with omni::{op}")


@pytest.fixture(autouse=True)
def no_tf32(monkeypatch):
    # cuDNN's fp32 conv defaults to TF32 (10-bit mantissa); the kernel is exact fp32
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def randn(*shape, dtype, g, scale=1.0, sliced=False):
    """On the GPU; ``sliced``: a channel slice (dim 1) of a wider tensor, i.e. non-contiguous."""
    if sliced:
        wide = torch.randn(shape[0], 2 * shape[1] + 1, *shape[2:], generator=g)
        return (wide[:, 1:shape[1] + 1] * scale).to(dtype).cuda()
    return (torch.randn(*shape, generator=g) * scale).to(dtype).cuda()


def check(out, expected, atol, rtol):
    assert out.shape == expected.shape and out.dtype == expected.dtype
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=rtol, equal_nan=True)


# --- RVQ embedding mean ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("B, Q, T, H, cb", [(1, 1, 1, 1, 3), (2, 16, 7, 129, 5), (1, 16, 129, 1024, 32),
                                            (3, 7, 1, 7, 11), (1, 8, 5, 2048, 2)])
@pytest.mark.parametrize("codes_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("layout", ["contiguous", "unaligned rows", "aligned rows"])
def test_rvq_embed_mean_cuda_matches_reference(B, Q, T, H, cb, dtype, atol, rtol, codes_dtype, layout):
    needs("rvq_embed_mean")
    g = torch.Generator().manual_seed(0)
    if layout == "contiguous":
        codes = torch.randint(0, cb, (B, Q, T), generator=g).to(codes_dtype).cuda()
        table = randn(Q * cb, H, dtype=dtype, g=g)
    elif layout == "unaligned rows":  # codes (B, T, Q) transposed, table a column slice (row stride H + 3)
        codes = torch.randint(0, cb, (B, T, Q), generator=g).to(codes_dtype).cuda().transpose(1, 2)
        table = randn(Q * cb, H + 3, dtype=dtype, g=g)[:, 1:H + 1]
    else:  # rows 16-byte aligned (stride rounded up to 8 elements): the vector path, a partial last vector
        codes = torch.randint(0, cb, (B, Q, T), generator=g).to(codes_dtype).cuda()
        table = randn(Q * cb, H + (-H % 8) + 8, dtype=dtype, g=g)[:, :H]
    with ok.use_backend("cuda", op="rvq_embed_mean"):
        assert ok.selected_backend("rvq_embed_mean", "cuda") == "cuda"
        out = ok.rvq_embed_mean(codes, table, cb)
    check(out, rvq_embed_mean_ref(codes.long(), table, cb), atol, rtol)


def test_rvq_embed_mean_cuda_strided_out_and_bad_ids():
    needs("rvq_embed_mean")
    codes = torch.tensor([[[0, 1, 2], [3, 0, 1]]], device="cuda")  # B=1, Q=2, T=3, codebook 4
    codes[0, 1, 2] = 4                                               # out of range: that frame is NaN
    table = torch.randn(8, 9, device="cuda")
    out = torch.full((1, 9, 3), 7.0, device="cuda").transpose(1, 2)  # (1, 3, 9), h stride 3
    torch.ops.omni.rvq_embed_mean(codes, table, 4, out)
    good = rvq_embed_mean_ref(codes[..., :2], table, 4)
    torch.testing.assert_close(out[:, :2], good)
    assert out[:, 2].isnan().all()
    with pytest.raises(RuntimeError, match="table must be"):
        torch.ops.omni.rvq_embed_mean(codes, table, 3, out)
    aliased = torch.randn(8, 3, device="cuda")
    with pytest.raises(RuntimeError, match="out must not overlap table"):
        torch.ops.omni.rvq_embed_mean(codes[..., :1], aliased, 4, aliased[None, :1])


def test_rvq_embed_mean_cuda_graph_replay():
    needs("rvq_embed_mean")
    g = torch.Generator().manual_seed(1)
    Q, cb, H = 16, 64, 256
    table = randn(Q * cb, H, dtype=torch.bfloat16, g=g)
    codes = torch.randint(0, cb, (1, Q, 1), generator=g).cuda()
    out = torch.empty(1, 1, H, dtype=torch.bfloat16, device="cuda")
    torch.ops.omni.rvq_embed_mean(codes, table, cb, out)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.omni.rvq_embed_mean(codes, table, cb, out)
    for _ in range(3):
        codes.copy_(torch.randint(0, cb, (1, Q, 1), generator=g))
        graph.replay()
        check(out, rvq_embed_mean_ref(codes, table, cb), 3e-2, 2e-2)


# --- causal conv ----------------------------------------------------------------------------------------------------
def conv_case(B, C_in, C_out, L, K, dilation, groups, dtype, g, *, bias=True, state=True, snake=False, sliced=False):
    x = randn(B, C_in, L, dtype=dtype, g=g, sliced=sliced)
    w = randn(C_out, C_in // groups, K, dtype=dtype, g=g, scale=(C_in // groups * K) ** -0.5)
    if sliced:  # a transposed-storage weight: strides (1, C_out * K, C_out) instead of contiguous
        w = w.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    b = randn(C_out, dtype=dtype, g=g, scale=0.1) if bias else None
    s = randn(B, C_in, (K - 1) * dilation, dtype=dtype, g=g, sliced=sliced) if state else None
    sn = (randn(C_in, dtype=dtype, g=g, scale=0.2), randn(C_in, dtype=dtype, g=g, scale=0.2)) if snake else None
    return x, w, b, s, sn


def tol(dtype, atol, rtol, snake):
    return (5e-2, 2e-2) if snake and dtype == torch.bfloat16 else (atol, rtol)


CONV_SHAPES = [  # B, C_in, C_out, L, K, dilation, groups
    (1, 7, 129, 1, 7, 1, 1), (2, 129, 7, 7, 7, 3, 1), (1, 64, 96, 129, 7, 9, 1), (2, 33, 17, 129, 1, 1, 1),
    (1, 1, 1, 1, 7, 1, 1), (1, 48, 48, 16, 7, 3, 1), (1, 20, 8, 200, 3, 2, 1),            # dense (K=3: looped taps)
    (2, 7, 7, 129, 7, 1, 7), (1, 129, 129, 7, 7, 9, 129), (1, 96, 96, 1, 7, 3, 96), (1, 5, 10, 33, 7, 1, 5),
]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", ["plain", "snake", "no_state_bias", "sliced_snake"])
def test_causal_conv1d_cuda_matches_reference(shape, dtype, atol, rtol, variant):
    needs("causal_conv1d")
    g = torch.Generator().manual_seed(0)
    snake = "snake" in variant
    x, w, b, s, sn = conv_case(*shape, dtype, g, bias=variant != "no_state_bias", state=variant != "no_state_bias",
                               snake=snake, sliced=variant.startswith("sliced"))
    dilation, groups = shape[5], shape[6]
    with ok.use_backend("cuda", op="causal_conv1d"):
        assert ok.selected_backend("causal_conv1d", "cuda") == "cuda"
        y, new_state = ok.causal_conv1d(x, w, b, dilation, groups, s, snake=sn)
    y_ref, state_ref = causal_conv1d_ref(x, w, b, dilation, groups, s, snake=sn)
    check(y, y_ref, *tol(dtype, atol, rtol, snake))
    check(new_state, state_ref, *tol(dtype, atol, rtol, snake))


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("groups", [1, 32])
def test_causal_conv1d_cuda_streams_in_place(dtype, atol, rtol, groups):
    """Chunks of 1..40 samples with new_state = state (one buffer) concatenate to the offline call."""
    needs("causal_conv1d")
    g = torch.Generator().manual_seed(2)
    x, w, b, _, sn = conv_case(1, 32, 32, 100, 7, 3, groups, dtype, g, state=False, snake=True)
    y_ref, state_ref = causal_conv1d_ref(x, w, b, 3, groups, None, snake=sn)
    state = torch.zeros(1, 32, 18, dtype=dtype, device="cuda")
    ys, start = [], 0
    for size in [1, 5, 40, 1, 16, 17, 20]:
        chunk = x[..., start:start + size]
        y = torch.empty(1, 32, chunk.shape[-1], dtype=dtype, device="cuda")
        torch.ops.omni.causal_conv1d(chunk, w, b, 3, groups, state, *sn, y, state)
        ys.append(y)
        start += size
    check(torch.cat(ys, -1), y_ref, *tol(dtype, atol, rtol, True))
    check(state, state_ref, *tol(dtype, atol, rtol, True))


@pytest.mark.parametrize("groups", [1, 64])
def test_causal_conv1d_cuda_graph_replay(groups):
    """Decode: one captured step (4 samples, in-place state) replayed on new inputs streams like the offline call."""
    needs("causal_conv1d")
    g = torch.Generator().manual_seed(3)
    dtype, steps, n = torch.bfloat16, 5, 4
    x_all, w, b, _, sn = conv_case(1, 64, 64, steps * n, 7, 9, groups, dtype, g, state=False, snake=True)
    x = torch.zeros(1, 64, n, dtype=dtype, device="cuda")
    state = torch.zeros(1, 64, 54, dtype=dtype, device="cuda")
    y = torch.empty(1, 64, n, dtype=dtype, device="cuda")
    torch.ops.omni.causal_conv1d(x, w, b, 9, groups, state, *sn, y, state)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.omni.causal_conv1d(x, w, b, 9, groups, state, *sn, y, state)
    state.zero_()
    ys = []
    for i in range(steps):
        x.copy_(x_all[..., i * n:(i + 1) * n])
        graph.replay()
        ys.append(y.clone())
    y_ref, state_ref = causal_conv1d_ref(x_all, w, b, 9, groups, None, snake=sn)
    check(torch.cat(ys, -1), y_ref, 5e-2, 2e-2)
    check(state, state_ref, 5e-2, 2e-2)


def test_causal_conv1d_cuda_rejects_and_falls_back():
    needs("causal_conv1d")
    g = torch.Generator().manual_seed(4)
    x, w, b, s, _ = conv_case(1, 8, 8, 9, 3, 1, 2, torch.float32, g)  # groups = 2: not a kernel case
    y, ns = torch.empty(1, 8, 9, device="cuda"), torch.empty(1, 8, 2, device="cuda")
    with pytest.raises(RuntimeError, match="groups must be 1"):
        torch.ops.omni.causal_conv1d(x, w, b, 1, 2, s, None, None, y, ns)
    with ok.use_backend("cuda", op="causal_conv1d"):  # the registration hands it to Triton or the reference
        y, ns = ok.causal_conv1d(x, w, b, 1, 2, s)
    y_ref, s_ref = causal_conv1d_ref(x, w, b, 1, 2, s)
    check(y, y_ref, 1e-4, 1e-4)
    check(ns, s_ref, 0, 0)
    x, w, b, s, _ = conv_case(1, 8, 8, 9, 7, 1000, 1, torch.float32, g)  # context 6000: over 48 KiB
    y, ns = torch.empty(1, 8, 9, device="cuda"), torch.empty(1, 8, 6000, device="cuda")
    with pytest.raises(RuntimeError, match="shared memory"):
        torch.ops.omni.causal_conv1d(x, w, b, 1000, 1, s, None, None, y, ns)
    with pytest.raises(RuntimeError, match="new_state must have shape"):
        torch.ops.omni.causal_conv1d(x, w, b, 1000, 1, s, None, None, y, ns[..., :5])
    x, w, b, s, _ = conv_case(1, 8, 8, 9, 3, 1, 1, torch.float32, g)   # a kernel case, but out overlaps x
    buffer = torch.empty(2 * x.numel(), device="cuda")   # out over the second half of x and beyond
    x_view, y_view = buffer[:x.numel()].view_as(x), buffer[x.numel() // 2:][:x.numel()].view_as(x)
    x_view.copy_(x)
    with pytest.raises(RuntimeError, match="out must not overlap x"):
        torch.ops.omni.causal_conv1d(x_view, w, b, 1, 1, s, None, None, y_view, torch.empty(1, 8, 2, device="cuda"))


# --- causal transposed conv -----------------------------------------------------------------------------------------
def trans_case(B, C_in, C_out, L, stride, m, state_len, dtype, g, *, bias=True, snake=False, sliced=False):
    """weight (C_in, C_out, m * stride); state (B, C_in, state_len) or None for state_len None."""
    x = randn(B, C_in, L, dtype=dtype, g=g, sliced=sliced)
    w = randn(C_in, C_out, m * stride, dtype=dtype, g=g, scale=(C_in * m) ** -0.5)
    if sliced:  # a transposed-storage weight: strides (1, K * C_in, C_in) instead of contiguous
        w = w.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    b = randn(C_out, dtype=dtype, g=g, scale=0.1) if bias else None
    s = randn(B, C_in, state_len, dtype=dtype, g=g, sliced=sliced) if state_len is not None else None
    sn = (randn(C_in, dtype=dtype, g=g, scale=0.2), randn(C_in, dtype=dtype, g=g, scale=0.2)) if snake else None
    return x, w, b, s, sn


TRANS_SHAPES = [  # C_in, C_out, stride, m (K = m * stride), state length
    (7, 129, 2, 2, 1), (129, 7, 3, 2, 1), (33, 17, 5, 2, 0), (96, 48, 8, 2, 1),  # the decoder's K = 2 * stride
    (17, 33, 2, 1, 0),                                                            # the upsampler's K = stride
    (20, 9, 4, 3, 2), (5, 3, 3, 3, 1), (9, 65, 2, 4, 3),                         # more lookahead, partial state
]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", TRANS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("L", [1, 7, 129])
@pytest.mark.parametrize("variant", ["plain", "snake", "no_state_bias", "sliced_snake"])
def test_causal_conv_transpose1d_cuda_matches_reference(shape, B, L, dtype, atol, rtol, variant):
    needs("causal_conv_transpose1d")
    g = torch.Generator().manual_seed(L + B)
    C_in, C_out, stride, m, state_len = shape
    snake = "snake" in variant
    x, w, b, s, sn = trans_case(B, C_in, C_out, L, stride, m, None if variant == "no_state_bias" else state_len,
                                dtype, g, bias=variant != "no_state_bias", snake=snake,
                                sliced=variant.startswith("sliced"))
    with ok.use_backend("cuda", op="causal_conv_transpose1d"):
        assert ok.selected_backend("causal_conv_transpose1d", "cuda") == "cuda"
        y, new_state = ok.causal_conv_transpose1d(x, w, b, stride, s, snake=sn)
    y_ref, state_ref = causal_conv_transpose1d_ref(x, w, b, stride, s, snake=sn)
    check(y, y_ref, *tol(dtype, atol, rtol, snake))
    check(new_state, state_ref, *tol(dtype, atol, rtol, snake))


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("stride", [2, 3, 5, 8])
def test_causal_conv_transpose1d_cuda_streams_in_place(dtype, atol, rtol, stride):
    """K = 2 * stride: a first chunk without state, then chunks of 1..40 samples with new_state = state (one buffer),
    concatenate to the offline call exactly (each output sums the same products in the same order)."""
    needs("causal_conv_transpose1d")
    g = torch.Generator().manual_seed(stride)
    x, w, b, _, sn = trans_case(3, 33, 17, 101, stride, 2, None, dtype, g, snake=True, sliced=True)
    op = torch.ops.omni.causal_conv_transpose1d
    state = torch.empty(3, 33, 1, dtype=dtype, device="cuda")
    ys = [torch.empty(3, 17, 0, dtype=dtype, device="cuda")]
    op(x[..., :1], w, b, stride, None, *sn, ys[0], state)  # one sample: no output yet, the state fills
    start = 1
    for size in [1, 5, 40, 1, 16, 17, 20]:
        chunk = x[..., start:start + size]
        ys.append(torch.empty(3, 17, chunk.shape[-1] * stride, dtype=dtype, device="cuda"))
        op(chunk, w, b, stride, state, *sn, ys[-1], state)
        start += size
    with ok.use_backend("cuda", op="causal_conv_transpose1d"):
        offline, offline_state = ok.causal_conv_transpose1d(x, w, b, stride, None, snake=sn)
    assert torch.equal(torch.cat(ys, -1), offline) and torch.equal(state, offline_state)
    y_ref, state_ref = causal_conv_transpose1d_ref(x, w, b, stride, None, snake=sn)
    check(offline, y_ref, *tol(dtype, atol, rtol, True))
    check(state, state_ref, *tol(dtype, atol, rtol, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_conv_transpose1d_cuda_streams_a_partial_state(dtype):
    """K = 3 * stride through the dispatch: the state grows 0 -> 1 -> 2 samples over the first chunks."""
    needs("causal_conv_transpose1d")
    g = torch.Generator().manual_seed(7)
    x, w, b, _, sn = trans_case(1, 20, 9, 60, 4, 3, None, dtype, g, snake=True)
    with ok.use_backend("cuda", op="causal_conv_transpose1d"):
        offline, _ = ok.causal_conv_transpose1d(x, w, b, 4, None, snake=sn)
        state, ys, start = None, [], 0
        for size in [1, 1, 1, 7, 30, 20]:
            y, state = ok.causal_conv_transpose1d(x[..., start:start + size], w, b, 4, state, snake=sn)
            ys.append(y)
            start += size
    assert torch.equal(torch.cat(ys, -1), offline)
    tolerance = (1e-4, 1e-4) if dtype == torch.float32 else (5e-2, 2e-2)
    check(offline, causal_conv_transpose1d_ref(x, w, b, 4, None, snake=sn)[0], *tolerance)


def test_causal_conv_transpose1d_cuda_graph_replay():
    """Decode: one captured step (4 samples, in-place state) replayed on new inputs streams like the offline call."""
    needs("causal_conv_transpose1d")
    g = torch.Generator().manual_seed(3)
    dtype, steps, n, stride = torch.bfloat16, 5, 4, 8
    x_all, w, b, _, sn = trans_case(1, 64, 32, 1 + steps * n, stride, 2, None, dtype, g, snake=True)
    op = torch.ops.omni.causal_conv_transpose1d
    x = torch.zeros(1, 64, n, dtype=dtype, device="cuda")
    state = torch.zeros(1, 64, 1, dtype=dtype, device="cuda")
    y = torch.empty(1, 32, n * stride, dtype=dtype, device="cuda")
    op(x, w, b, stride, state, *sn, y, state)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op(x, w, b, stride, state, *sn, y, state)
    op(x_all[..., :1], w, b, stride, None, *sn, torch.empty(1, 32, 0, dtype=dtype, device="cuda"), state)
    ys = []
    for i in range(steps):
        x.copy_(x_all[..., 1 + i * n:1 + (i + 1) * n])
        graph.replay()
        ys.append(y.clone())
    y_ref, state_ref = causal_conv_transpose1d_ref(x_all, w, b, stride, None, snake=sn)
    check(torch.cat(ys, -1), y_ref, 5e-2, 2e-2)
    check(state, state_ref, 5e-2, 2e-2)


def test_causal_conv_transpose1d_cuda_rejects_and_falls_back():
    needs("causal_conv_transpose1d")
    g = torch.Generator().manual_seed(4)
    op = torch.ops.omni.causal_conv_transpose1d
    x, w, b, s, _ = trans_case(2, 8, 6, 9, 2, 5, 4, torch.float32, g)  # K = 5 * stride: more taps than the kernel's 4
    y, ns = torch.empty(2, 6, 18, device="cuda"), torch.empty(2, 8, 4, device="cuda")
    with pytest.raises(RuntimeError, match="at most 4"):
        op(x, w, b, 2, s, None, None, y, ns)
    with ok.use_backend("cuda", op="causal_conv_transpose1d"):  # the registration hands it to Triton or the reference
        y, ns = ok.causal_conv_transpose1d(x, w, b, 2, s)
    y_ref, s_ref = causal_conv_transpose1d_ref(x, w, b, 2, s)
    check(y, y_ref, 1e-4, 1e-4)
    check(ns, s_ref, 0, 0)

    x, w, b, s, sn = trans_case(2, 8, 6, 9, 3, 2, 1, torch.float32, g, snake=True)
    y, ns = torch.empty(2, 6, 27, device="cuda"), torch.empty(2, 8, 1, device="cuda")
    op(x, w, b, 3, s, *sn, y, ns)  # the good call, then one thing wrong at a time
    check(y, causal_conv_transpose1d_ref(x, w, b, 3, s, snake=sn)[0], 1e-4, 1e-4)
    bad = [
        ((x.cpu(), w, b, 3, s, *sn, y, ns), "x must be a CUDA tensor"),
        ((x.double(), w, b, 3, s, *sn, y, ns), "dtype must be"),
        ((x, w, b, 4, s, *sn, y, ns), "multiple m \\* stride"),
        ((x, w[:7], b, 3, s, *sn, y, ns), "input channels"),
        ((x, w.half(), b, 3, s, *sn, y, ns), "weight must have x's dtype"),
        ((x, w, b[:5], 3, s, *sn, y, ns), "bias must have shape"),
        ((x, w, b, 3, torch.zeros(2, 8, 2, device="cuda"), *sn, y, ns), "state must be \\(B, C_in, <= 1\\)"),
        ((x, w, b, 3, s[:1], *sn, y, ns), "state must have shape"),
        ((x, w, b, 3, s, sn[0], None, y, ns), "given together"),
        ((x, w, b, 3, s, sn[0][:7], sn[1], y, ns), "snake_alpha must have shape"),
        ((x, w, b, 3, s, *sn, y[..., :26], ns), "out must have shape"),
        ((x, w, b, 3, s, *sn, y, ns[..., :0]), "new_state must have shape"),
        ((x, w, b, 3, s, *sn, y.bfloat16(), ns), "out must have x's dtype"),
    ]
    for args, message in bad:
        with pytest.raises(RuntimeError, match=message):
            op(*args)


def test_causal_conv_transpose1d_op_schema_and_fake():
    needs("causal_conv_transpose1d")
    g = torch.Generator().manual_seed(5)
    x, w, b, s, sn = trans_case(1, 8, 6, 5, 3, 2, 1, torch.float32, g, snake=True)
    args = (x, w, b, 3, s, *sn, torch.empty(1, 6, 15, device="cuda"), torch.empty(1, 8, 1, device="cuda"))
    torch.library.opcheck(torch.ops.omni.causal_conv_transpose1d.default, args,
                          test_utils=("test_schema", "test_faketensor"))
