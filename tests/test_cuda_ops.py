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
@pytest.mark.parametrize("shape", [(1, 1024), (7, 129), (3, 5, 2048)])
def test_add_rms_norm_default_on_a_gpu_is_the_add_then_cuda_rms_norm(shape, dtype, atol, rtol):
    x, r = (torch.randn(shape, device="cuda").to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(shape[-1], device="cuda")).to(dtype)
    assert ok.selected_backend("add_rms_norm", "cuda") == "cuda"
    total, normed = ok.add_rms_norm(x, r.transpose(0, -1).contiguous().transpose(0, -1), w, 1e-6)
    ref_total, ref_normed = ok.add_rms_norm_ref(x, r, w, 1e-6)
    assert torch.equal(total, ref_total)
    torch.testing.assert_close(normed, ref_normed, atol=atol, rtol=rtol)


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
