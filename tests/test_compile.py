"""Every op traces under torch.compile(fullgraph=True) and gives the eager result (CPU, inductor), the Triton custom
ops (in the interpreter) too."""
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
    E, H, inter = 8, 32, 16
    args = torch.randn(3, H), torch.randn(E, H), torch.randn(E, 2 * inter, H), torch.randn(E, H, inter)
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


def test_code2wav_ops_compile():
    B, C, L, K = 2, 6, 9, 7
    x, w, b = torch.randn(B, C, L), torch.randn(C, C, K), torch.randn(C)
    state, snake = torch.randn(B, C, (K - 1) * 3), (torch.randn(C), torch.randn(C))
    check(lambda x, w, b, s: ok.causal_conv1d(x, w, b, 3, 1, s, snake), x, w, b, state)
    depthwise = torch.randn(C, 1, K)
    check(lambda x: ok.causal_conv1d(x, depthwise, None, 1, C), x)
    up = torch.randn(C, 4, 4)   # stride 2, kernel 2 x stride
    check(lambda x, s: ok.causal_conv_transpose1d(x, up, None, 2, s, snake), x, torch.randn(B, C, 1))
    codes, table = torch.randint(0, 10, (B, 4, L)), torch.randn(40, 16)
    check(lambda c, t: ok.rvq_embed_mean(c, t, 10), codes, table)


def test_decode_attention_and_norm_fusions_compile():
    q, kc, vc = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    check(lambda q, k, v, n: ok.decode_attention(q, k, v, n, 0.25), q, kc, vc, torch.tensor([5, 12]))
    x, r, w = torch.randn(3, 32), torch.randn(3, 32), torch.randn(32)
    check(lambda x, r, w: ok.add_rms_norm(x, r, w, 1e-6), x, r, w)
    check(ok.silu_mul, torch.randn(3, 2 * 24))
    check(ok.moe_combine, torch.randn(3, 6, 32), torch.randn(3, 1), torch.randn(3, 32))


def test_triton_custom_ops_trace_in_the_interpreter():
    """The Triton kernels sit behind torch.library custom ops with fake implementations: compiled with the Triton
    backend forced, the graph holds them opaque and gives the eager (interpreted) result."""
    from omni_kernels._triton import triton_runs
    if not triton_runs(torch.device("cpu")):
        pytest.skip("needs triton")
    conv_args = torch.randn(1, 5, 7), torch.randn(5, 5, 3), torch.randn(5)
    with ok.use_backend("triton"):
        check(lambda x, w, b: ok.causal_conv1d(x, w, b, 2), *conv_args)
        check(lambda x: ok.causal_conv_transpose1d(x, torch.ones(5, 3, 4), None, 2), torch.randn(1, 5, 6))
        check(lambda c, t: ok.rvq_embed_mean(c, t, 10), torch.randint(0, 10, (1, 4, 5)), torch.randn(40, 16))
        q, kc, vc = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
        check(lambda q, k, v: ok.decode_attention(q, k, v, torch.tensor([6]), 0.25), q, kc, vc)
        q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
        check(lambda q, k, v: ok.attention(q, k, v, 0.25, window=3), q, k, torch.randn(1, 2, 5, 16))
