"""The Triton Code2Wav kernels (RVQ embedding mean, causal conv with optional fused SnakeBeta, causal transposed conv)
against their references, streamed in chunks against the offline call, and inside the tiny Code2Wav model.

On CPU they run in the Triton interpreter (~25 ms of Python per program): shapes are small and the launch configs give
few, large tiles. Tolerances: fp32 differs only in summation order and in sin/exp's last bit. fp16 repeats the
reference's roundings (both convs: an fp32 sum over every tap and channel, the bias, one rounding, as oneDNN; snake:
every op rounded). bf16 does too, but the interpreter truncates fp32 -> bf16 casts instead of rounding, one ulp
(2^-8 relative) per rounding; the fused snake has seven, so bf16 allows a few ulps. (On a CPU without bf16
instructions torch's transposed conv rounds each tap's sum instead: the tolerances cover that too.)
"""

import pytest
import torch
from torch.utils._pytree import tree_map_only

import omni_kernels as ok
from omni_kernels import causal_conv
from omni_kernels._triton import HAS_TRITON, INTERPRET, triton_runs
from omni_kernels.causal_conv import causal_conv1d_triton, causal_conv_transpose1d_triton
from omni_kernels.rvq_lookup import rvq_embed_mean_ref, rvq_embed_mean_triton
from test_rvq_conv_ops import chunked

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not (HAS_TRITON and triton_runs(DEVICE)), reason="needs triton (GPU or interpreter)")

BF16_TOL = 4e-2 if INTERPRET else 2e-2
# a fused-snake input one (truncated) ulp off at |x| ~ 4 is 0.03 off; a conv output that cancels to ~0.1 keeps it.
# fp16: on a GPU, sin and exp differ from torch's CPU ones in the last fp32 bit, which can flip one of the snake's
# fp16 roundings: one fp16 ulp at |x| ~ 4 is 0.004.
SNAKE_ATOL = {torch.bfloat16: 1e-1 if INTERPRET else 5e-2, torch.float16: 2e-3 if INTERPRET else 1e-2}
DTYPES = [(torch.float32, 2e-5, 1e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, BF16_TOL, BF16_TOL)]


def _moved(tree, device):
    return tree_map_only(torch.Tensor, lambda t: t.to(device), tree)


def on_cpu(reference):
    """The reference run on CPU, results moved back to DEVICE: the roundings the kernels repeat are those of torch's
    CPU convs (cuDNN's pick their algorithm, and with it their summation order and roundings, per shape)."""
    def run(*args, **kwargs):
        return _moved(reference(*_moved(args, "cpu"), **_moved(kwargs, "cpu")), DEVICE)
    return run


causal_conv1d_ref = on_cpu(causal_conv.causal_conv1d_ref)
causal_conv_transpose1d_ref = on_cpu(causal_conv.causal_conv_transpose1d_ref)


def rand(*shape, dtype=torch.float32, g, scale=1.0, sliced=False):
    """Random values on DEVICE; ``sliced``: the same shape as a channel slice of a wider (non-contiguous) tensor."""
    if sliced:
        wide = torch.randn(shape[0], 2 * shape[1] + 1, *shape[2:], generator=g)
        return (wide[:, 1:shape[1] + 1] * scale).to(dtype).to(DEVICE)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def check(out, expected, atol, rtol):
    assert out.shape == expected.shape and out.dtype == expected.dtype
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=rtol)


def snake_atol(dtype, snake, atol):
    return SNAKE_ATOL.get(dtype, atol) if snake is not None else atol


def snake_params(channels, dtype, g):
    return rand(channels, dtype=dtype, g=g, scale=0.2), rand(channels, dtype=dtype, g=g, scale=0.2)


# --- RVQ embedding mean ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("batch, quantizers, frames, hidden", [(1, 1, 1, 5), (2, 16, 7, 96), (1, 5, 129, 33)])
def test_rvq_embed_mean(dtype, atol, rtol, batch, quantizers, frames, hidden):
    g = torch.Generator().manual_seed(frames)
    codebook = 37
    table = torch.randn(quantizers * codebook, 2 * hidden, generator=g)[:, :hidden].to(dtype).to(DEVICE)  # strided
    codes = torch.randint(0, codebook, (batch, quantizers, 2 * frames), generator=g)[..., ::2].to(DEVICE)
    out = rvq_embed_mean_triton(codes, table, codebook)
    check(out, rvq_embed_mean_ref(codes, table, codebook), atol=1e-6 if dtype == torch.float32 else atol, rtol=rtol)
    with ok.use_backend("triton", op="rvq_embed_mean"):
        assert torch.equal(ok.rvq_embed_mean(codes.int(), table, codebook), out)


# --- causal conv1d --------------------------------------------------------------------------------------------------

CONV_CASES = [  # C_in, C_out, K, dilation, groups
    (5, 5, 7, 1, 1),
    (96, 96, 7, 3, 1),
    (96, 192, 7, 9, 1),
    (96, 96, 7, 1, 96),      # ConvNeXt depthwise
    (6, 4, 7, 3, 2),         # grouped, not depthwise
    (192, 96, 1, 1, 1),      # pointwise
]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("c_in, c_out, kernel, dilation, groups", CONV_CASES)
@pytest.mark.parametrize("length", [1, 129])
def test_causal_conv1d(dtype, atol, rtol, c_in, c_out, kernel, dilation, groups, length):
    g = torch.Generator().manual_seed(c_in + length)
    x = rand(2, c_in, length, dtype=dtype, g=g, sliced=True)
    weight = rand(c_out, c_in // groups, kernel, dtype=dtype, g=g, scale=(c_in // groups * kernel) ** -0.5)
    bias = rand(c_out, dtype=dtype, g=g, scale=0.1)
    context = (kernel - 1) * dilation
    state = rand(2, c_in, context, dtype=dtype, g=g) if length == 129 else None   # a mid-stream and a first call
    snake = snake_params(c_in, dtype, g) if (c_in + length) % 2 else None          # half the cases fuse the snake
    y, new_state = causal_conv1d_triton(x, weight, bias, dilation, groups, state, snake=snake)
    y_ref, state_ref = causal_conv1d_ref(x, weight, bias, dilation, groups, state, snake=snake)
    check(y, y_ref, snake_atol(dtype, snake, atol), rtol)
    check(new_state, state_ref, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "snake"])
def test_causal_conv1d_snake_and_no_bias(dtype, atol, rtol, fused):
    g = torch.Generator().manual_seed(3)
    x = rand(1, 7, 96, dtype=dtype, g=g, scale=3.0).transpose(1, 2)                             # length-major
    weight = rand(96, 96, 7, dtype=dtype, g=g, scale=0.04)
    snake = snake_params(96, dtype, g) if fused else None
    y, new_state = causal_conv1d_triton(x, weight, None, 3, 1, None, snake=snake)
    y_ref, state_ref = causal_conv1d_ref(x, weight, None, 3, 1, None, snake=snake)
    check(y, y_ref, snake_atol(dtype, snake, atol), rtol)
    check(new_state, state_ref, atol, rtol)          # 18 > 7 samples: the zeros of the causal pad and all of x


@pytest.mark.parametrize("c_in, c_out, kernel, dilation, groups", [(96, 96, 7, 9, 1), (96, 96, 7, 1, 96)])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "snake"])
def test_causal_conv1d_streams(c_in, c_out, kernel, dilation, groups, fused):
    g = torch.Generator().manual_seed(4)
    x = rand(1, c_in, 41, g=g)
    weight = rand(c_out, c_in // groups, kernel, g=g, scale=(c_in // groups * kernel) ** -0.5)
    bias = rand(c_out, g=g, scale=0.1)
    snake = snake_params(c_in, torch.float32, g) if fused else None
    offline, _ = causal_conv1d_triton(x, weight, bias, dilation, groups, snake=snake)
    state, pieces = None, []
    with ok.use_backend("triton", op="causal_conv1d"):
        for start, end in chunked(x.shape[-1]):
            y, state = ok.causal_conv1d(x[..., start:end], weight, bias, dilation, groups, state, snake=snake)
            pieces.append(y)
    check(torch.cat(pieces, -1), offline, 5e-6, 5e-6)   # numpy/BLAS sums other tile shapes in another order
    check(offline, causal_conv1d_ref(x, weight, bias, dilation, groups, snake=snake)[0], 2e-5, 1e-5)


# --- causal transposed conv ----------------------------------------------------------------------------------------

TRANS_CASES = [  # C_in, C_out, stride, m (K = m * stride), state length (None: first call)
    (5, 5, 3, 2, None),
    (96, 96, 5, 2, 1),
    (192, 96, 8, 2, 0),
    (96, 5, 4, 3, 2),        # two samples of lookahead
    (6, 6, 2, 1, None),      # K == stride: no overlap, no state
]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("c_in, c_out, stride, m, state_len", TRANS_CASES)
@pytest.mark.parametrize("length", [1, 7, 129])
def test_causal_conv_transpose1d(dtype, atol, rtol, c_in, c_out, stride, m, state_len, length):
    if length == 129 and c_in == 192:
        pytest.skip("the large case is covered at length 1 and 7 (interpreter time)")
    g = torch.Generator().manual_seed(c_in + length)
    x = rand(2, c_in, length, dtype=dtype, g=g, sliced=True)
    weight = rand(c_in, c_out, m * stride, dtype=dtype, g=g, scale=c_in ** -0.5)
    bias = rand(c_out, dtype=dtype, g=g, scale=0.1) if length != 7 else None
    state = rand(2, c_in, state_len, dtype=dtype, g=g) if state_len is not None else None
    snake = snake_params(c_in, dtype, g) if (c_in + length) % 2 else None
    y, new_state = causal_conv_transpose1d_triton(x, weight, bias, stride, state, snake=snake)
    y_ref, state_ref = causal_conv_transpose1d_ref(x, weight, bias, stride, state, snake=snake)
    check(y, y_ref, snake_atol(dtype, snake, atol), rtol)
    check(new_state, state_ref, atol, rtol)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "snake"])
def test_causal_conv_transpose1d_streams(fused):
    g = torch.Generator().manual_seed(5)
    x = rand(2, 96, 41, g=g)
    weight, bias = rand(96, 48, 10, g=g, scale=96 ** -0.5), rand(48, g=g, scale=0.1)
    snake = snake_params(96, torch.float32, g) if fused else None
    offline, _ = causal_conv_transpose1d_triton(x, weight, bias, 5, snake=snake)
    state, pieces = None, []
    with ok.use_backend("triton", op="causal_conv_transpose1d"):
        for start, end in chunked(x.shape[-1]):
            y, state = ok.causal_conv_transpose1d(x[..., start:end], weight, bias, 5, state, snake=snake)
            pieces.append(y)
    check(torch.cat(pieces, -1), offline, 5e-6, 5e-6)   # numpy/BLAS sums other tile shapes in another order
    check(offline, causal_conv_transpose1d_ref(x, weight, bias, 5, snake=snake)[0], 2e-5, 1e-5)


# --- several tiles in every axis --------------------------------------------------------------------------------------
# The default interpreter configs make each case above one program: one C_out block, one length block, one pass of
# the input-channel loop. Blocks of 16 (tl.dot's least) split 20 channels and 20 samples into a full block and a
# tail on every axis; fp32 runs two batch rows for the batch's place in the folded grid (bf16 one: ~40 ms of
# interpreter a program). The new state is copied 16 channels x 4 samples a block, so its 6 samples take two passes.
SMALL_TILES = {"BLOCK_CO": 16, "BLOCK_L": 16, "BLOCK_CI": 16, "BLOCK_C": 16, "BLOCK_S": 4}
TILED = [(torch.float32, 2e-5, 1e-5, 2), (torch.bfloat16, BF16_TOL, BF16_TOL, 1)]   # dtype, atol, rtol, batch


@pytest.mark.parametrize("dtype, atol, rtol, batch", TILED)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "snake"])
@pytest.mark.parametrize("groups, kernel, dilation", [(1, 3, 3), (20, 7, 1)], ids=["dense", "depthwise"])
def test_causal_conv1d_small_tiles(dtype, atol, rtol, batch, fused, groups, kernel, dilation):
    g = torch.Generator().manual_seed(8)
    x = rand(batch, 20, 20, dtype=dtype, g=g, sliced=True)
    weight = rand(20, 20 // groups, kernel, dtype=dtype, g=g, scale=(20 // groups * kernel) ** -0.5)
    bias = rand(20, dtype=dtype, g=g, scale=0.1)
    state = rand(batch, 20, (kernel - 1) * dilation, dtype=dtype, g=g)
    snake = snake_params(20, dtype, g) if fused else None
    y, new_state = causal_conv1d_triton(x, weight, bias, dilation, groups, state, snake=snake, config=SMALL_TILES)
    y_ref, state_ref = causal_conv1d_ref(x, weight, bias, dilation, groups, state, snake=snake)
    check(y, y_ref, snake_atol(dtype, snake, atol), rtol)
    check(new_state, state_ref, atol, rtol)


def test_causal_conv1d_small_tiles_grouped():
    # groups of 2 inputs and 2 outputs: a C_out block spans 8 groups, the tail block 2
    g = torch.Generator().manual_seed(8)
    x, weight, state = rand(2, 20, 20, g=g), rand(20, 2, 3, g=g, scale=6 ** -0.5), rand(2, 20, 6, g=g)
    y, new_state = causal_conv1d_triton(x, weight, None, 3, 10, state, config=SMALL_TILES)
    y_ref, state_ref = causal_conv1d_ref(x, weight, None, 3, 10, state)
    check(y, y_ref, 2e-5, 1e-5)
    check(new_state, state_ref, 0, 0)


@pytest.mark.parametrize("dtype, atol, rtol, batch", TILED)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "snake"])
def test_causal_conv_transpose1d_small_tiles(dtype, atol, rtol, batch, fused):
    g = torch.Generator().manual_seed(9)
    x = rand(batch, 20, 20, dtype=dtype, g=g, sliced=True)
    weight = rand(20, 20, 4, dtype=dtype, g=g, scale=20 ** -0.5)                      # stride 2, m = 2
    bias, state = rand(20, dtype=dtype, g=g, scale=0.1), rand(batch, 20, 1, dtype=dtype, g=g)
    snake = snake_params(20, dtype, g) if fused else None
    y, new_state = causal_conv_transpose1d_triton(x, weight, bias, 2, state, snake=snake, config=SMALL_TILES)
    y_ref, state_ref = causal_conv_transpose1d_ref(x, weight, bias, 2, state, snake=snake)
    check(y, y_ref, snake_atol(dtype, snake, atol), rtol)
    check(new_state, state_ref, atol, rtol)


def test_causal_conv1d_long_context():
    # a context past 2^16 samples, where the new-state copy used to stop (one block of at most 2^16); on a GPU the
    # copy loops over it in blocks, here one block holds it (the SMALL_TILES cases loop)
    g = torch.Generator().manual_seed(10)
    x, weight, state = rand(1, 2, 5, g=g), rand(2, 2, 3, g=g), rand(1, 2, 80_000, g=g)
    y, new_state = causal_conv1d_triton(x, weight, None, 40_000, 1, state)
    y_ref, state_ref = causal_conv1d_ref(x, weight, None, 40_000, 1, state)
    check(y, y_ref, 2e-5, 1e-5)
    assert torch.equal(new_state, state_ref)
    with pytest.raises(ValueError, match="BLOCK_M"):
        causal_conv1d_triton(x, weight, None, 40_000, 1, state, config={"BLOCK_M": 16})


def test_fused_snake_keeps_the_reference_signature():
    # positional calls without ``snake`` are unchanged; the fused form equals snake_beta then the conv
    g = torch.Generator().manual_seed(6)
    x, weight = rand(1, 8, 9, g=g), rand(8, 8, 7, g=g, scale=0.1)
    alpha, beta = snake_params(8, torch.float32, g)
    plain = causal_conv.causal_conv1d_ref(x, weight, None, 1, 1, None)
    fused = causal_conv.causal_conv1d_ref(x, weight, None, 1, 1, None, snake=(alpha, beta))
    unfused = causal_conv.causal_conv1d_ref(ok.snake_beta_ref(x, alpha, beta), weight, None, 1, 1, None)
    assert all(torch.equal(a, b) for a, b in zip(fused, unfused)) and not torch.equal(plain[0], fused[0])
    with pytest.raises(ValueError, match="snake"):
        ok.causal_conv1d(x, weight, None, snake=(alpha[:4], beta))


# --- the tiny Code2Wav with these kernels ----------------------------------------------------------------------------

def test_code2wav_with_triton_kernels_matches_torch(reference_checkpoint):
    from omni_runtime.models.code2wav import Code2WavStream, load_code2wav

    folder, _ = reference_checkpoint()
    model = load_code2wav(folder).to(DEVICE)
    codes = torch.randint(0, 2048, (1, 16, 3), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    ops = ("rvq_embed_mean", "causal_conv1d", "causal_conv_transpose1d")
    with torch.inference_mode():
        expected = model(codes)
        with ok.use_backend("triton", op=ops[0]), ok.use_backend("triton", op=ops[1]), \
                ok.use_backend("triton", op=ops[2]):
            assert all(ok.selected_backend(op, DEVICE) == "triton" for op in ops)
            wav = model(codes)
            stream = Code2WavStream(model)
            streamed = torch.cat([stream.push(codes[..., :1]), stream.push(codes[..., 1:])], dim=-1)
    assert wav.shape == expected.shape and 0.05 < expected.std()
    torch.testing.assert_close(wav, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(streamed, expected, atol=1e-5, rtol=1e-5)
