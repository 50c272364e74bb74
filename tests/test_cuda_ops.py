"""CUDA extension ops against their references (skipped without a GPU or without the built extension)."""
import pytest
import torch

import omni_kernels as ok
from omni_kernels._extension import has_cuda_op

pytestmark = pytest.mark.gpu

# The reduction order differs from torch's, so the fp32 statistics may differ in the last bit and flip one rounding.
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1.6e-2, 1e-2), (torch.float16, 2e-3, 2e-3)]


@pytest.fixture(autouse=True)
def needs_extension():
    if not torch.cuda.is_available() or not has_cuda_op("rms_norm"):
        pytest.skip("needs a GPU and the compiled extension")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 129), (3, 5, 2048), (129, 7), (2, 128)])
@pytest.mark.parametrize("layout", ["contiguous", "unaligned rows", "aligned rows"])
def test_rms_norm_cuda_matches_reference(shape, dtype, atol, rtol, layout):
    # unaligned rows (a stride of hidden + 5) take the scalar kernel; aligned rows (a stride rounded up to 8
    # elements, 16 B) take the vector one, with a partial last vector where hidden is not a multiple of it
    pad = {"contiguous": 0, "unaligned rows": 5, "aligned rows": -shape[-1] % 8 + 8}[layout]
    wide = torch.randn(*shape[:-1], shape[-1] + pad, device="cuda").to(dtype)
    x = wide[..., : shape[-1]]
    w = (1 + 0.1 * torch.randn(shape[-1], device="cuda")).to(dtype)
    with ok.use_backend("cuda", op="rms_norm"):
        assert ok.selected_backend("rms_norm", "cuda") == "cuda"
        out = ok.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(out, ok.rms_norm_ref(x, w, 1e-6), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 1024), (7, 129), (3, 5, 2048), (129, 7)])
@pytest.mark.parametrize("layout", ["contiguous", "strided residual", "unaligned rows"])
def test_add_rms_norm_cuda_is_the_add_then_cuda_rms_norm(shape, dtype, atol, rtol, layout):
    # The GPU default: omni::add_rms_norm, one kernel. The sum is the reference's add bit for bit; the norm is the
    # two-kernel path's (the add, then omni::rms_norm) bit for bit where both move 16-byte vectors, else within the
    # rms_norm tolerances (another summation order of the statistics).
    from omni_kernels.add_rms_norm import add_rms_norm_cuda, add_then_rms_norm_cuda
    pad = 5 if layout == "unaligned rows" else 0
    x = torch.randn(*shape[:-1], shape[-1] + pad, device="cuda").to(dtype)[..., : shape[-1]]
    r = torch.randn(shape, device="cuda").to(dtype)
    if layout == "strided residual":   # rows of the residual stream as a transposed view: not one row dim
        r = r.transpose(0, -1).contiguous().transpose(0, -1)
    w = (1 + 0.1 * torch.randn(shape[-1], device="cuda")).to(dtype)
    assert ok.selected_backend("add_rms_norm", "cuda") == "cuda"
    total, normed = ok.add_rms_norm(x, r, w, 1e-6)
    ref_total, ref_normed = ok.add_rms_norm_ref(x, r, w, 1e-6)
    assert torch.equal(total, ref_total)
    torch.testing.assert_close(normed, ref_normed, atol=atol, rtol=rtol)
    two_total, two_normed = add_then_rms_norm_cuda(x, r, w, 1e-6)
    assert torch.equal(total, two_total)
    if layout == "contiguous":
        assert torch.equal(normed, two_normed)
    assert torch.equal(add_rms_norm_cuda(x, r, w, 1e-6)[1], normed)


def test_add_rms_norm_cuda_refuses_overlapping_outputs():
    x, r, w = torch.randn(5, 64, device="cuda"), torch.randn(5, 64, device="cuda"), torch.ones(64, device="cuda")
    total, out = torch.empty_like(x), torch.empty_like(x)
    torch.ops.omni.add_rms_norm(x, r, w, 1e-6, total, out)
    expected = ok.add_rms_norm_ref(x, r, w, 1e-6)
    assert torch.equal(total, expected[0])
    torch.testing.assert_close(out, expected[1], atol=1e-6, rtol=1e-5)
    for sum_out, normed, message in ((x, out, "sum must not overlap x"), (total, r, "out must not overlap residual"),
                                     (total, total, "out must not overlap sum")):
        with pytest.raises(RuntimeError, match=message):
            torch.ops.omni.add_rms_norm(x, r, w, 1e-6, sum_out, normed)
    with pytest.raises(RuntimeError, match="must have x's dtype"):
        torch.ops.omni.add_rms_norm(x, r.half(), w, 1e-6, total, out)


def test_rms_norm_cuda_in_place_and_overlap():
    x = torch.randn(5, 129, device="cuda")
    expected = ok.rms_norm_ref(x, torch.ones(129, device="cuda"), 1e-6)
    torch.ops.omni.rms_norm(x, torch.ones(129, device="cuda"), 1e-6, x)        # out is x: allowed
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=1e-5)
    buf = torch.randn(6 * 129, device="cuda")
    with pytest.raises(RuntimeError, match="out must be x itself or not overlap it"):
        torch.ops.omni.rms_norm(buf[129:].view(5, 129), torch.ones(129, device="cuda"), 1e-6, buf[:-129].view(5, 129))


def test_rms_norm_cuda_rejects_bad_weight():
    with pytest.raises(ValueError, match="hidden size"):
        ok.rms_norm(torch.randn(4, 8, device="cuda"), torch.randn(7, device="cuda"), 1e-6)
