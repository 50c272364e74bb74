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
@pytest.mark.parametrize("contiguous", [True, False])
def test_rms_norm_cuda_matches_reference(shape, dtype, atol, rtol, contiguous):
    wide = torch.randn(*shape[:-1], shape[-1] + (0 if contiguous else 5), device="cuda").to(dtype)
    x = wide[..., : shape[-1]]
    w = (1 + 0.1 * torch.randn(shape[-1], device="cuda")).to(dtype)
    with ok.use_backend("cuda", op="rms_norm"):
        assert ok.selected_backend("rms_norm", "cuda") == "cuda"
        out = ok.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(out, ok.rms_norm_ref(x, w, 1e-6), atol=atol, rtol=rtol)


def test_rms_norm_cuda_rejects_bad_weight():
    with pytest.raises(ValueError, match="hidden size"):
        ok.rms_norm(torch.randn(4, 8, device="cuda"), torch.randn(7, device="cuda"), 1e-6)
