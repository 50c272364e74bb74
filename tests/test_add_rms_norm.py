"""add_rms_norm: the reference against add-then-rms_norm, the Triton kernel (the interpreter on CPU) against it."""
import pytest
import torch

import omni_kernels as ok
from omni_kernels._extension import has_cuda_op
from omni_kernels._triton import HAS_TRITON, INTERPRET, triton_runs
from omni_kernels.add_rms_norm import add_rms_norm_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# fp32: the statistics sum in another order; bf16/fp16: one rounding of the output (the interpreter truncates)
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}
needs_triton = pytest.mark.skipif(not (HAS_TRITON and triton_runs(DEVICE)), reason="needs triton")


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_reference_is_add_then_rms_norm(dtype):
    x, r, w = torch.randn(3, 5, 48).to(dtype), torch.randn(3, 5, 48).to(dtype), (1 + torch.randn(48)).to(dtype)
    total, normed = ok.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(total, x + r) and torch.equal(normed, ok.rms_norm_ref(x + r, w, 1e-6))


@needs_triton
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("rows, hidden", [(1, 1), (7, 7), (33, 129), (2, 2048)])
@pytest.mark.parametrize("layout", ["contiguous", "row-strided", "column-strided"])
def test_triton_matches_reference(dtype, rows, hidden, layout):
    # row-strided: rows of a wider tensor (the kernel's row strides, x's and the residual's unequal); column-strided:
    # every other element (copied first)
    g = torch.Generator().manual_seed(rows * hidden)
    wide = {"contiguous": (hidden, hidden), "row-strided": (hidden + 3, hidden + 5),
            "column-strided": (2 * hidden, 2 * hidden)}[layout]
    x, r = (torch.randn(rows, width, generator=g) for width in wide)
    x, r = (t.to(DEVICE, dtype) for t in (x, r))                 # then sliced: a cast would copy the slice
    x, r = (t[:, ::2] if layout == "column-strided" else t[:, :hidden] for t in (x, r))
    w = (1 + 0.3 * torch.randn(hidden, generator=g)).to(DEVICE, dtype)
    total, normed = add_rms_norm_triton(x, r, w, 1e-6)
    ref_total, ref_normed = ok.add_rms_norm_ref(x, r, w, 1e-6)
    if INTERPRET and dtype == torch.bfloat16:   # the interpreter truncates fp32 -> bf16: one ulp
        torch.testing.assert_close(total, ref_total, atol=1e-6, rtol=2.0**-7)
    else:                                       # one rounded add, the same everywhere
        assert torch.equal(total, ref_total)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(normed, ref_normed, atol=atol, rtol=rtol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_strided_weight(dtype):
    # a weight that is a view (every other element of a buffer) must be read through its stride, not at stride 1
    x, r = (torch.randn(5, 48).to(DEVICE, dtype) for _ in range(2))
    buf = (1 + 0.3 * torch.randn(96)).to(DEVICE, dtype)
    w = buf[::2]
    _, normed = add_rms_norm_triton(x, r, w, 1e-6)
    _, ref = ok.add_rms_norm_ref(x, r, w.contiguous(), 1e-6)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(normed, ref, atol=atol, rtol=rtol)


@needs_triton
def test_triton_keeps_leading_dims_and_dispatches():
    x, r, w = torch.randn(2, 3, 40).to(DEVICE), torch.randn(2, 3, 40).to(DEVICE), torch.rand(40).to(DEVICE)
    with ok.use_backend("triton", op="add_rms_norm"):
        total, normed = ok.add_rms_norm(x, r, w, 1e-6)
    assert total.shape == normed.shape == (2, 3, 40)
    torch.testing.assert_close(normed, ok.rms_norm_ref(x + r, w, 1e-6), atol=1e-5, rtol=1e-5)
    # the Triton pass is opt-in until measured on a GPU; there the default is the add and the CUDA rms_norm
    assert ok.selected_backend("add_rms_norm", DEVICE) == ("cuda" if DEVICE.type == "cuda" and has_cuda_op("rms_norm")
                                                           else "torch")


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not fit"):
        ok.add_rms_norm(torch.tensor(1.0), torch.tensor(1.0), torch.ones(1), 1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        ok.add_rms_norm(torch.randn(2, 8), torch.randn(2, 7), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        ok.add_rms_norm(torch.randn(2, 8), torch.randn(2, 8), torch.ones(7), 1e-6)


@needs_triton
def test_empty_inputs_give_empty_outputs():
    for shape in ((0, 16), (3, 0)):
        x = torch.randn(shape).to(DEVICE)
        total, normed = add_rms_norm_triton(x, x, torch.ones(shape[1], device=DEVICE), 1e-6)
        assert total.shape == normed.shape == shape
