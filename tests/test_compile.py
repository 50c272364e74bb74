"""Every op traces under torch.compile(fullgraph=True) and gives the eager result (CPU, inductor)."""
import pytest
import torch

import omni_kernels as ok


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def check(fn, *args):
    expected = fn(*args)
    got = torch.compile(fn, fullgraph=True)(*args)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_rms_norm_compiles():
    check(lambda x, w: ok.rms_norm(x, w, 1e-6), torch.randn(5, 64), torch.randn(64))


def test_fused_moe_compiles():
    E, H, I = 8, 32, 16
    args = torch.randn(3, H), torch.randn(E, H), torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    shared = ok.SharedExpert(torch.randn(24, H), torch.randn(24, H), torch.randn(H, 24), torch.randn(1, H))
    check(lambda x, r, gu, d: ok.fused_moe(x, r, gu, d, 2, True, shared=shared), *args)


def test_attention_prologue_and_attention_compile():
    B, T, Hq, Hkv, D, S = 1, 4, 4, 2, 16, 12
    cos, sin = ok.mrope_cos_sin_ref(torch.arange(3, 3 + T)[None], ok.rope_inv_freq(D, 1e6), None, torch.float32)
    q, k, v = torch.randn(B, T, Hq, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    qw, kw = torch.randn(D), torch.randn(D)

    def step(q, k, v, k_cache, v_cache):
        q = ok.qk_norm_rope(q, k, v, qw, kw, 1e-6, cos, sin, k_cache, v_cache, torch.arange(3, 3 + T))
        return ok.attention(q, k_cache[:, :, : 3 + T], v_cache[:, :, : 3 + T], D**-0.5), k_cache

    caches = [torch.randn(B, Hkv, S, D) for _ in range(2)]
    expected = step(q, k, v, *(c.clone() for c in caches))
    got = torch.compile(step, fullgraph=True)(q, k, v, *(c.clone() for c in caches))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
