"""Code2Wav's ops: RVQ embedding mean, causal (transposed) convs and SnakeBeta, against plain formulas in fp64, the
reference's modules, and streamed in chunks against the offline call."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from omni_kernels.causal_conv import (causal_conv1d, causal_conv1d_ref, causal_conv_transpose1d,
                                      causal_conv_transpose1d_ref, snake_beta, snake_beta_ref)
from omni_kernels.rvq_lookup import rvq_embed_mean

DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 2e-2), (torch.float16, 2e-3, 2e-3)]
LENGTHS = [1, 7, 129]
CHUNKS = [1, 3, 7, 2, 1, 16, 5]      # cycled until the input is used up


def randn(*shape, dtype=torch.float32, seed=0, layout="contiguous"):
    """A (B, C, L) tensor that is contiguous, a channel slice of a wider one, or a transposed (B, L, C) one."""
    g = torch.Generator().manual_seed(seed)
    if layout == "sliced":
        return torch.randn(shape[0], 2 * shape[1] + 1, *shape[2:], generator=g)[:, 1:shape[1] + 1].to(dtype)
    if layout == "transposed":
        return torch.randn(shape[0], shape[2], shape[1], generator=g).to(dtype).transpose(1, 2)
    return torch.randn(*shape, generator=g).to(dtype)


def chunked(length: int):
    """Chunk boundaries covering [0, length) with the sizes of CHUNKS, cycled."""
    start, sizes = 0, itertools.cycle(CHUNKS)
    while start < length:
        size = next(sizes)
        yield start, min(start + size, length)
        start += size


def assert_same_sums(streamed, offline):
    # The same products and sums, but torch's CPU conv picks its reduction order by length and by CPU: 1 ulp seen
    # here for a grouped conv, up to 4 ulps on an AVX-512 host for the transposed conv. The bound is 1e-5.
    eps = 8 * torch.finfo(offline.dtype).eps
    torch.testing.assert_close(streamed, offline, atol=eps, rtol=eps)


# --- RVQ embedding mean ---------------------------------------------------------------------------------------------

def rvq_embed_mean_loop(codes, table, codebook_size):
    out = torch.zeros(codes.shape[0], codes.shape[2], table.shape[1], dtype=torch.float64)
    for q in range(codes.shape[1]):
        out += table.double()[codes[:, q] + q * codebook_size]
    return out / codes.shape[1]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("batch, quantizers, frames", [(1, 1, 1), (2, 16, 7), (3, 5, 129)])
def test_rvq_embed_mean_matches_loop(dtype, atol, rtol, batch, quantizers, frames):
    codebook, hidden = 37, 33
    g = torch.Generator().manual_seed(1)
    table = torch.randn(quantizers * codebook, 2 * hidden, generator=g)[:, :hidden].to(dtype)     # non-contiguous
    codes = torch.randint(0, codebook, (batch, quantizers, 2 * frames), generator=g)[..., ::2]   # non-contiguous
    expected = rvq_embed_mean_loop(codes, table, codebook).to(dtype)
    for given in (codes, codes.to(torch.int32)):    # int32 ids (what a GPU sampler may hand over) as well
        out = rvq_embed_mean(given, table, codebook)
        assert out.shape == (batch, frames, hidden) and out.dtype == dtype
        torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)


def test_rvq_embed_mean_is_the_references_gather_then_mean():
    g = torch.Generator().manual_seed(2)
    table = torch.randn(16 * 64, 24, generator=g).bfloat16()
    codes = torch.randint(0, 64, (2, 16, 9), generator=g)
    offsets = torch.arange(16).view(1, -1, 1) * 64
    expected = torch.nn.Embedding.from_pretrained(table)(codes + offsets).mean(1)
    assert torch.equal(rvq_embed_mean(codes, table, 64), expected)


def test_rvq_embed_mean_rejects_bad_input():
    table = torch.randn(4 * 8, 6)
    with pytest.raises(ValueError, match="integer"):
        rvq_embed_mean(torch.zeros(1, 4, 3), table, 8)
    with pytest.raises(ValueError, match="integer"):
        rvq_embed_mean(torch.zeros(4, 3, dtype=torch.long), table, 8)
    with pytest.raises(ValueError, match="codebooks"):
        rvq_embed_mean(torch.zeros(1, 3, 3, dtype=torch.long), table, 8)


# --- causal conv ----------------------------------------------------------------------------------------------------

def causal_conv1d_loop(x, weight, bias, dilation, groups):
    """Sum over taps of the input shifted right by (K - 1 - j) * dilation, zeros before the start."""
    B, C, L = x.shape
    out_channels, per_group, kernel = weight.shape
    xg = x.double().reshape(B, groups, per_group, L)
    wg = weight.double().reshape(groups, out_channels // groups, per_group, kernel)
    y = torch.zeros(B, groups, out_channels // groups, L, dtype=torch.float64)
    for j in range(kernel):
        shift = (kernel - 1 - j) * dilation
        shifted = F.pad(xg, (shift, 0))[..., :L]
        y += torch.einsum("bgcl,goc->bgol", shifted, wg[..., j])
    return y.reshape(B, out_channels, L) + bias.double()[:, None]


CONVS = [  # in, out, kernel, dilation, groups
    (5, 7, 7, 1, 1), (6, 6, 7, 3, 6), (8, 4, 7, 9, 2), (3, 5, 1, 1, 1),
]


def conv_params(in_c, out_c, kernel, groups, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_c, in_c // groups, kernel, generator=g) / (in_c // groups * kernel) ** 0.5).to(dtype)
    return weight, torch.randn(out_c, generator=g).to(dtype)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("in_c, out_c, kernel, dilation, groups", CONVS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_causal_conv1d_matches_loop(dtype, atol, rtol, length, in_c, out_c, kernel, dilation, groups, layout):
    x = randn(2, in_c, length, dtype=dtype, layout=layout)
    weight, bias = conv_params(in_c, out_c, kernel, groups, dtype)
    y, state = causal_conv1d(x, weight, bias, dilation, groups)
    assert y.shape == (2, out_c, length) and y.dtype == dtype
    torch.testing.assert_close(y, causal_conv1d_loop(x, weight, bias, dilation, groups).to(dtype), atol=atol,
                               rtol=rtol)
    context = (kernel - 1) * dilation
    assert torch.equal(state, F.pad(x, (context, 0))[..., length:])   # the last `context` samples, zeros before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_c, out_c, kernel, dilation, groups", CONVS)
def test_causal_conv1d_streams_exactly(dtype, in_c, out_c, kernel, dilation, groups):
    x = randn(2, in_c, 129, dtype=dtype, seed=4, layout="sliced")
    weight, bias = conv_params(in_c, out_c, kernel, groups, dtype)
    offline, _ = causal_conv1d(x, weight, bias, dilation, groups)
    pieces, state = [], None
    for start, end in chunked(x.shape[-1]):
        y, state = causal_conv1d(x[..., start:end], weight, bias, dilation, groups, state)
        pieces.append(y)
    assert state.shape == (2, in_c, (kernel - 1) * dilation)      # fixed size, whatever the chunking
    assert_same_sums(torch.cat(pieces, dim=-1), offline)


def test_causal_conv1d_is_the_references_module():
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeCausalConvNet

    torch.manual_seed(5)
    for in_c, out_c, kernel, dilation, groups in CONVS:
        module = Qwen3OmniMoeCausalConvNet(in_c, out_c, kernel, dilation=dilation, groups=groups)
        x = torch.randn(2, in_c, 37)
        with torch.no_grad():
            expected = module(x)
        y, _ = causal_conv1d(x, module.conv.weight.detach(), module.conv.bias.detach(), dilation, groups)
        assert torch.equal(y, expected)


# --- causal transposed conv -----------------------------------------------------------------------------------------

def causal_conv_transpose1d_loop(x, weight, bias, stride):
    """Scatter x[i] * w[.., j] to full output i * stride + j, then trim K - stride from both ends."""
    B, _, L = x.shape
    kernel = weight.shape[-1]
    full = torch.zeros(B, weight.shape[1], (L - 1) * stride + kernel, dtype=torch.float64)
    for i in range(L):
        full[..., i * stride:i * stride + kernel] += torch.einsum("bc,cok->bok", x.double()[..., i], weight.double())
    trim = kernel - stride
    return full[..., trim:full.shape[-1] - trim] + bias.double()[:, None]


TRANS_CONVS = [  # in, out, stride, kernel
    (6, 5, 3, 6), (4, 4, 8, 16), (5, 3, 2, 2), (3, 4, 2, 6),
]


def trans_conv_params(in_c, out_c, stride, kernel, dtype, seed=6):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(in_c, out_c, kernel, generator=g) / (in_c * kernel // stride) ** 0.5).to(dtype)
    return weight, torch.randn(out_c, generator=g).to(dtype)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("in_c, out_c, stride, kernel", TRANS_CONVS)
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_causal_conv_transpose1d_matches_loop(dtype, atol, rtol, length, in_c, out_c, stride, kernel, layout):
    x = randn(2, in_c, length, dtype=dtype, layout=layout)
    weight, bias = trans_conv_params(in_c, out_c, stride, kernel, dtype)
    y, state = causal_conv_transpose1d(x, weight, bias, stride)
    lookahead = kernel // stride - 1
    assert y.shape == (2, out_c, max(length - lookahead, 0) * stride) and y.dtype == dtype
    torch.testing.assert_close(y, causal_conv_transpose1d_loop(x, weight, bias, stride).to(dtype), atol=atol,
                               rtol=rtol)
    assert torch.equal(state, x[..., length - min(lookahead, length):])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_c, out_c, stride, kernel", TRANS_CONVS)
def test_causal_conv_transpose1d_streams_exactly(dtype, in_c, out_c, stride, kernel):
    x = randn(2, in_c, 129, dtype=dtype, seed=7, layout="transposed")
    weight, bias = trans_conv_params(in_c, out_c, stride, kernel, dtype)
    offline, _ = causal_conv_transpose1d(x, weight, bias, stride)
    pieces, state, lookahead = [], None, kernel // stride - 1
    for start, end in chunked(x.shape[-1]):
        y, state = causal_conv_transpose1d(x[..., start:end], weight, bias, stride, state)
        # each new input completes `stride` outputs once the lookahead is filled
        assert y.shape[-1] == (max(end - lookahead, 0) - max(start - lookahead, 0)) * stride
        pieces.append(y)
    assert state.shape == (2, in_c, lookahead)
    assert_same_sums(torch.cat(pieces, dim=-1), offline)


def test_causal_conv_transpose1d_is_the_references_module():
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeCausalTransConvNet

    torch.manual_seed(8)
    for in_c, out_c, stride, kernel in TRANS_CONVS:
        module = Qwen3OmniMoeCausalTransConvNet(in_c, out_c, kernel, stride)
        x = torch.randn(2, in_c, 37)
        with torch.no_grad():
            expected = module(x)
        y, _ = causal_conv_transpose1d(x, module.conv.weight.detach(), module.conv.bias.detach(), stride)
        assert torch.equal(y, expected)


@pytest.mark.parametrize("stride, m, state_len, mixed, takes", [
    (8, 2, 1, False, True), (2, 1, None, False, True), (3, 4, 2, False, True), (5, 2, 0, False, True),
    (2, 5, 3, False, False),     # more taps per phase than the kernel's 4: Triton or the reference
    (3, 2, 1, True, False),      # SnakeBeta parameters in another dtype: the reference
])
def test_causal_conv_transpose1d_cuda_backend_routes_and_sizes_its_outputs(monkeypatch, stride, m, state_len, mixed,
                                                                           takes):
    """The cuda registration on CPU tensors, with the op replaced by the reference: it hands the kernel the outputs
    its launcher checks (out (B, C_out, n * stride), new_state (B, C_in, min(m - 1, S + L))) and sends the calls the
    kernel does not take elsewhere."""
    from omni_kernels import causal_conv

    calls = []

    def op(x, weight, bias, stride, state, alpha, beta, out, new_state):
        y, s = causal_conv_transpose1d_ref(x, weight, bias, stride, state, snake=(alpha, beta))
        assert out.shape == y.shape and new_state.shape == s.shape and out.dtype == new_state.dtype == x.dtype
        out.copy_(y), new_state.copy_(s)
        calls.append(stride)

    monkeypatch.setattr(torch.ops.omni, "causal_conv_transpose1d", op, raising=False)
    g = torch.Generator().manual_seed(stride + m)
    x = torch.randn(3, 5, 7, generator=g)
    weight = torch.randn(5, 3, m * stride, generator=g) / (5 * m) ** 0.5
    bias = torch.randn(3, generator=g)
    state = None if state_len is None else torch.randn(3, 5, state_len, generator=g)
    snake = tuple((0.2 * torch.randn(5, generator=g)).to(torch.bfloat16 if mixed else torch.float32) for _ in "ab")
    y, new_state = causal_conv._causal_conv_transpose1d_cuda(x, weight, bias, stride, state, snake=snake)
    y_ref, state_ref = causal_conv_transpose1d_ref(x, weight, bias, stride, state, snake=snake)
    assert calls == ([stride] if takes else [])
    # the fallback may be Triton's interpreter (numpy's sin)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_state, state_ref, atol=1e-6, rtol=1e-6)


def test_cuda_conv_transpose_fits_mirrors_the_launcher_limits():
    from omni_kernels.causal_conv import _cuda_conv_transpose_fits as fits

    x = torch.empty(2, 3, 10)
    assert all(fits(x, torch.empty(3, 2, m * 8), 8, None) for m in (1, 2, 3, 4))
    assert not fits(x, torch.empty(3, 2, 5 * 8), 8, None)
    one = torch.empty(1, 1, 1)  # expanded: the sizes without the memory
    assert fits(one.expand(65535, 1, 1), torch.empty(1, 2, 4), 2, None)
    assert not fits(one.expand(65536, 1, 1), torch.empty(1, 2, 4), 2, None)          # grid.z is the batch
    assert fits(one.expand(1, 1, 2**29 - 2), torch.empty(1, 2, 8), 4, one)            # (S + L) * stride < 2^31
    assert not fits(one.expand(1, 1, 2**29 - 1), torch.empty(1, 2, 8), 4, one)


# --- SnakeBeta ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 5e-2, 2e-2),
                                               (torch.float16, 5e-3, 5e-3)])
@pytest.mark.parametrize("length", LENGTHS)
def test_snake_beta_matches_formula(dtype, atol, rtol, length):
    x = randn(2, 9, length, dtype=dtype, layout="transposed")
    g = torch.Generator().manual_seed(9)
    alpha, beta = (0.5 * torch.randn(9, generator=g)).to(dtype), (0.5 * torch.randn(9, generator=g)).to(dtype)
    a, b, xd = alpha.double()[:, None], beta.double()[:, None], x.double()
    expected = xd + torch.sin(xd * a.exp()) ** 2 / (b.exp() + 1e-9)
    out = snake_beta(x, alpha, beta)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected.to(dtype), atol=atol, rtol=rtol)


def test_snake_beta_is_the_references_module():
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeSnakeBeta

    module = Qwen3OmniMoeSnakeBeta(9).to(torch.bfloat16)
    with torch.no_grad():
        module.alpha.normal_(0, 0.5), module.beta.normal_(0, 0.5)
        x = torch.randn(2, 9, 129).bfloat16()
        assert torch.equal(snake_beta_ref(x, module.alpha, module.beta), module(x))


# --- bad input ------------------------------------------------------------------------------------------------------

def test_conv_ops_reject_bad_input():
    x = torch.randn(2, 4, 10)
    weight, bias = torch.randn(6, 4, 7), torch.randn(6)
    with pytest.raises(ValueError, match="channels"):
        causal_conv1d(torch.randn(2, 5, 10), weight, bias)
    with pytest.raises(ValueError, match="bias"):
        causal_conv1d(x, weight, torch.randn(5))
    with pytest.raises(ValueError, match="groups"):
        causal_conv1d(x, weight, bias, groups=4)
    with pytest.raises(ValueError, match="state"):
        causal_conv1d(x, weight, bias, dilation=2, state=torch.zeros(2, 4, 6))        # needs 12 samples
    with pytest.raises(ValueError, match="state"):
        causal_conv1d(x, weight, bias, state=torch.zeros(2, 4, 6, dtype=torch.float64))
    trans = torch.randn(4, 3, 6)
    with pytest.raises(ValueError, match="multiple of stride"):
        causal_conv_transpose1d(x, trans, None, 4)
    with pytest.raises(ValueError, match="channels"):
        causal_conv_transpose1d(torch.randn(2, 3, 10), trans, None, 3)
    with pytest.raises(ValueError, match="state"):
        causal_conv_transpose1d(x, trans, None, 3, state=torch.zeros(2, 4, 2))
    with pytest.raises(ValueError, match="channels"):
        snake_beta(x, torch.zeros(3), torch.zeros(4))


def test_empty_chunks_keep_the_state():
    x, weight = torch.randn(1, 3, 5), torch.randn(2, 3, 7)
    _, state = causal_conv1d_ref(x, weight, None)
    y, same = causal_conv1d_ref(x[..., :0], weight, None, state=state)
    assert y.shape == (1, 2, 0) and torch.equal(same, state)
    trans = torch.randn(3, 2, 4)
    y, state = causal_conv_transpose1d_ref(x[..., :0], trans, None, 2)
    assert y.shape == (1, 2, 0) and state.shape == (1, 3, 0)
