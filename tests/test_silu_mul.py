"""silu_mul: the Triton kernel (the interpreter on CPU) against the reference, and the reference against F.silu."""
import pytest
import torch
import torch.nn.functional as F

import omni_kernels as ok
from omni_kernels._triton import HAS_TRITON, INTERPRET, triton_runs
from omni_kernels.silu_mul import silu_mul_ref, silu_mul_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# fp32: exp implementations differ by an ulp; bf16/fp16: one rounding of the output (the interpreter truncates)
TOLERANCES = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (1e-2, 1.6e-2), torch.float16: (1e-3, 2e-3)}
needs_triton = pytest.mark.skipif(not (HAS_TRITON and triton_runs(DEVICE)), reason="needs triton")


def test_reference_is_silu_of_gate_times_up():
    x = torch.randn(3, 10, dtype=torch.float64)
    torch.testing.assert_close(silu_mul_ref(x), x[:, :5] * torch.sigmoid(x[:, :5]) * x[:, 5:])


@needs_triton
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("rows, inter", [(1, 1), (7, 7), (129, 48), (2, 768), (1, 1025)])
@pytest.mark.parametrize("layout", ["contiguous", "row-strided", "transposed"])
def test_triton_matches_reference(dtype, rows, inter, layout):
    g = torch.Generator().manual_seed(rows)
    if layout == "transposed":                                               # column stride `rows`, row stride 1
        x = (3 * torch.randn(2 * inter, rows, generator=g)).to(DEVICE, dtype).t()
    else:                                                                    # row-strided: a row stride past 2I
        x = 3 * torch.randn(rows, 2 * inter + (5 if layout == "row-strided" else 0), generator=g)
        x = x.to(DEVICE, dtype)[:, x.shape[1] - 2 * inter:]                 # sliced after the cast, which copies
    out = silu_mul_triton(x)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out, silu_mul_ref(x), atol=atol, rtol=rtol)
    assert out.shape == (rows, inter) and out.dtype == dtype


@needs_triton
def test_triton_keeps_leading_dims_and_dispatches():
    x = torch.randn(2, 3, 2 * 33).to(DEVICE)
    with ok.use_backend("triton", op="silu_mul"):
        out = ok.silu_mul(x)
    torch.testing.assert_close(out, F.silu(x[..., :33]) * x[..., 33:], atol=1e-6, rtol=1e-6)
    assert out.shape == (2, 3, 33)
    from omni_kernels._extension import has_cuda_op   # Triton: opt-in until measured on a GPU; CUDA: the default
    assert ok.selected_backend("silu_mul", DEVICE) == ("cuda" if has_cuda_op("silu_mul") else "torch")
    assert silu_mul_triton(x[:, :0]).shape == (2, 0, 33)


def test_rejects_an_odd_width():
    with pytest.raises(ValueError, match="gate and up halves"):
        ok.silu_mul(torch.randn(2, 7))
    if INTERPRET or DEVICE.type == "cuda":
        assert silu_mul_triton(torch.randn(2, 6, dtype=torch.float64)).dtype == torch.float64   # reference dtype


def _cuda_silu_mul():
    from omni_kernels._extension import has_cuda_op
    if not torch.cuda.is_available() or not has_cuda_op("silu_mul"):
        pytest.skip("needs a GPU and the compiled extension")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", [(1, 2), (1, 6144), (7, 258), (129, 96), (3, 5, 1536), (2050,)])
@pytest.mark.parametrize("layout", ["contiguous", "row-strided", "unaligned rows", "transposed"])
def test_cuda_is_the_reference_bit_for_bit(dtype, shape, layout):
    # torch's CUDA F.silu(gate) * up: the same expf, IEEE division and roundings, so equal, not close; the vector
    # path (16-byte rows) and the scalar one (odd widths, unaligned row strides), and a transposed x the kernel does
    # not take (the reference runs)
    _cuda_silu_mul()
    from omni_kernels.silu_mul import silu_mul_cuda
    pad = {"contiguous": 0, "row-strided": 16, "unaligned rows": 3, "transposed": 0}[layout]
    x = (3 * torch.randn(*shape[:-1], shape[-1] + pad, device="cuda")).to(dtype)[..., : shape[-1]]
    if layout == "transposed" and x.dim() >= 2:
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    assert ok.selected_backend("silu_mul", "cuda") == "cuda"
    out = ok.silu_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.is_contiguous()
    assert torch.equal(out, silu_mul_ref(x))
    assert torch.equal(silu_mul_cuda(x), out)


@pytest.mark.gpu
def test_cuda_refuses_bad_arguments():
    _cuda_silu_mul()
    x = torch.randn(4, 8, device="cuda")
    for out, message in ((torch.empty(4, 5, device="cuda"), "out must have shape"),
                         (torch.empty(4, 4, device="cuda", dtype=torch.half), "out must have x's dtype"),
                         (x[:, :4], "out must not overlap x")):
        with pytest.raises(RuntimeError, match=message):
            torch.ops.omni.silu_mul(x, out)
    with pytest.raises(RuntimeError, match="gate and up halves"):
        torch.ops.omni.silu_mul(torch.randn(4, 7, device="cuda"), torch.empty(4, 3, device="cuda"))
