"""Each op's reference against a straightforward float64 formulation, over dtypes, odd shapes and strided inputs.

Backend-specific kernels (Triton, CUDA) are tested against these references in their own files.
"""
import pytest
import torch
import torch.nn.functional as F

import omni_kernels as ok

DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 2e-2), (torch.float16, 2e-3, 2e-3)]


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous view (every other column of a wider buffer)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    out = wide[..., ::2]
    assert not out.is_contiguous() or t.shape[-1] == 1
    return out


# ---------------------------------------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 129), (3, 5, 2048), (129, 7)])
def test_rms_norm_matches_formula(shape, dtype, atol, rtol):
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], dtype=torch.float64)).to(dtype)
    x64 = x.double()
    expected = w.double() * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    for given in (x, strided(x)):               # a non-contiguous x is read through its strides
        torch.testing.assert_close(ok.rms_norm(given, w, 1e-6).double(), expected, atol=atol, rtol=rtol)


def test_rms_norm_rounds_before_the_weight_multiply():
    # The reference casts the normalised value to bf16 and only then multiplies by the bf16 weight.
    x = torch.randn(4, 64).bfloat16()
    w = torch.randn(64).bfloat16()
    x32 = x.float()
    normalised = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    assert torch.equal(ok.rms_norm_ref(x, w, 1e-6), w * normalised)


def test_rms_norm_cuda_backend_falls_back_where_the_kernel_refuses():
    # csrc/rms_norm.cu rejects these; the backend entry must hand them to the reference (promoted dtype and all)
    # instead of raising. Its predicate is pure shape/stride/dtype logic, so it runs on CPU tensors here.
    from omni_kernels.rms_norm import _rms_norm_cuda, cuda_supports
    x, w = torch.randn(6, 4, 16), torch.randn(16)
    assert cuda_supports(x, w, None) and cuda_supports(x[:, :1], w, None) and cuda_supports(x[:, ::2], w, None)
    refused = {
        "1-D x": (x[0, 0], w),
        "strided hidden": (torch.randn(6, 4, 32)[..., ::2], w),
        "unmergeable leading dims": (x.transpose(0, 1), w),
        "strided weight": (x, torch.randn(32)[::2]),
        "mixed dtypes": (x.bfloat16(), w),
        "fp64": (x.double(), w.double()),
    }
    for name, (xx, ww) in refused.items():
        assert not cuda_supports(xx, ww, None), name
        out = _rms_norm_cuda(xx, ww, 1e-6, None)
        expected = ok.rms_norm_ref(xx, ww, 1e-6)
        assert out.dtype == expected.dtype and torch.equal(out, expected), name
    assert not cuda_supports(x, w, torch.empty(6, 16, 4).transpose(1, 2))      # out rows not one strided dim
    out = torch.empty(6, 4, 16)
    assert _rms_norm_cuda(x.bfloat16(), w, 1e-6, out) is out
    torch.testing.assert_close(out, ok.rms_norm_ref(x.bfloat16(), w, 1e-6), atol=0, rtol=0)


def test_rms_norm_out_and_bad_weight():
    x, w = torch.randn(5, 16), torch.randn(16)
    out = torch.empty(5, 16)
    assert ok.rms_norm(x, w, 1e-6, out=out) is out
    torch.testing.assert_close(out, ok.rms_norm_ref(x, w, 1e-6))
    for bad in (torch.randn(15), torch.tensor(1.0), torch.randn(1, 16)):
        with pytest.raises(ValueError, match="hidden size"):
            ok.rms_norm(x, bad, 1e-6)


# ------------------------------------------------------------------------------------------------------------ RoPE
def mrope_angles_loop(positions, inv_freq, section):
    """Angle of every (token, slot) picked one slot at a time: t/h/w row by j % 3 within the sections."""
    half = inv_freq.numel()
    angles = torch.empty(positions.shape[-1], half, dtype=torch.float64)
    for j in range(half):
        row = 0
        if j % 3 == 1 and j < 3 * section[1]:
            row = 1
        elif j % 3 == 2 and j < 3 * section[2]:
            row = 2
        angles[:, j] = (positions[row].float() * inv_freq[j]).double()  # fp32 angle, as the model computes it
    return torch.cat([angles, angles], dim=-1)


@pytest.mark.parametrize("head_dim, section", [(128, (24, 20, 20)), (16, (4, 2, 2)), (32, (6, 5, 5))])
def test_mrope_tables_pick_interleaved_sections(head_dim, section):
    T = 37
    positions = torch.stack([torch.arange(T), torch.randint(0, 50, (T,)), torch.randint(0, 50, (T,))])
    inv_freq = ok.rope_inv_freq(head_dim, 1e6)
    cos, sin = ok.mrope_cos_sin_ref(positions[:, None], inv_freq, section, torch.float32)
    angles = mrope_angles_loop(positions, inv_freq, section)
    torch.testing.assert_close(cos[0].double(), angles.cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[0].double(), angles.sin(), atol=1e-6, rtol=0)


def test_mrope_with_equal_rows_is_plain_rope():
    positions = torch.arange(11)[None]
    inv_freq = ok.rope_inv_freq(128, 1e6)
    cos3, sin3 = ok.mrope_cos_sin_ref(positions.expand(3, 1, -1), inv_freq, (24, 20, 20), torch.float32)
    cos1, sin1 = ok.mrope_cos_sin_ref(positions, inv_freq, None, torch.float32)
    torch.testing.assert_close(cos3, cos1, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin3, sin1, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("heads, T, D", [(1, 1, 16), (3, 7, 64), (5, 129, 128)])
def test_apply_rope_rotates_pairs_half_apart(heads, T, D, dtype, atol, rtol):
    x = torch.randn(2, heads, T, D).to(dtype)
    angles = torch.rand(2, T, D // 2, dtype=torch.float64) * 10
    cos = torch.cat([angles.cos()] * 2, -1).to(dtype)
    sin = torch.cat([angles.sin()] * 2, -1).to(dtype)
    a, b = x[..., : D // 2].double(), x[..., D // 2:].double()
    c, s = angles.cos()[:, None], angles.sin()[:, None]
    expected = torch.cat([a * c - b * s, b * c + a * s], dim=-1)
    torch.testing.assert_close(ok.apply_rope_ref(x, cos, sin).double(), expected, atol=atol * 4, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T, start", [(1, 0), (7, 3), (17, 40)])
def test_qk_norm_rope_writes_cache_slots_and_returns_rotated_queries(T, start, dtype):
    B, Hq, Hkv, D, S = 1, 6, 2, 32, 64
    q, k, v = (strided(torch.randn(B, T, h, D).to(dtype)) for h in (Hq, Hkv, Hkv))
    qw, kw = torch.randn(D).to(dtype), torch.randn(D).to(dtype)
    cos, sin = ok.mrope_cos_sin_ref(torch.arange(start, start + T)[None], ok.rope_inv_freq(D, 1e6), None, dtype)
    k_cache = torch.full((B, Hkv, S, D), 7.0, dtype=dtype)
    v_cache = k_cache.clone()
    slots = torch.arange(start, start + T)
    q_out = ok.qk_norm_rope(q, k, v, qw, kw, 1e-6, cos, sin, k_cache, v_cache, slots)
    expect_q = ok.apply_rope_ref(ok.rms_norm_ref(q, qw, 1e-6).transpose(1, 2), cos, sin)
    expect_k = ok.apply_rope_ref(ok.rms_norm_ref(k, kw, 1e-6).transpose(1, 2), cos, sin)
    assert torch.equal(q_out, expect_q)
    assert torch.equal(k_cache[:, :, slots], expect_k)
    assert torch.equal(v_cache[:, :, slots], v.transpose(1, 2))
    untouched = torch.ones(S, dtype=torch.bool)
    untouched[slots] = False
    assert (k_cache[:, :, untouched] == 7).all() and (v_cache[:, :, untouched] == 7).all()


def test_qk_norm_rope_rejects_mismatched_cache():
    q, k = torch.randn(1, 3, 4, 16), torch.randn(1, 3, 2, 16)
    cos = sin = torch.ones(1, 3, 16)
    with pytest.raises(ValueError, match="cache"):
        ok.qk_norm_rope(q, k, k, None, None, 1e-6, cos, sin, torch.zeros(1, 4, 8, 16), torch.zeros(1, 4, 8, 16),
                        torch.arange(3))


@pytest.mark.parametrize("case", ["cache-batch", "v", "v_cache", "head_dim", "k-batch", "weight", "one-weight",
                                  "cos", "slots-dtype"])
def test_qk_norm_rope_rejects_shapes_the_kernels_would_overrun(case):
    # each of these would make a kernel (Triton or CUDA) read or write out of bounds: the entry point names them
    B, T, Hq, Hkv, D, S = 2, 3, 4, 2, 16, 8
    args = dict(q=torch.randn(B, T, Hq, D), k=torch.randn(B, T, Hkv, D), v=torch.randn(B, T, Hkv, D),
                q_norm_weight=torch.ones(D), k_norm_weight=torch.ones(D), eps=1e-6, cos=torch.ones(1, T, D),
                sin=torch.zeros(1, T, D), k_cache=torch.zeros(B, Hkv, S, D), v_cache=torch.zeros(B, Hkv, S, D),
                cache_positions=torch.arange(T))
    bad, match = {
        "cache-batch": (dict(k_cache=torch.zeros(1, Hkv, S, D), v_cache=torch.zeros(1, Hkv, S, D)), "cache"),
        "v": (dict(v=torch.randn(B, T, Hkv, D // 2)), "v "),
        "v_cache": (dict(v_cache=torch.zeros(B, Hkv, S - 1, D)), "v_cache"),
        "head_dim": (dict(q=torch.randn(B, T, Hq, 2 * D)), "must be"),
        "k-batch": (dict(k=torch.randn(1, T, Hkv, D), v=torch.randn(1, T, Hkv, D)), "must be"),
        "weight": (dict(q_norm_weight=torch.ones(D + 1)), "norm weights"),
        "one-weight": (dict(k_norm_weight=None), "norm weights"),
        "cos": (dict(cos=torch.ones(T, D)), "cos/sin"),
        "slots-dtype": (dict(cache_positions=torch.arange(T).float()), "integers"),
    }[case]
    with pytest.raises(ValueError, match=match):
        ok.qk_norm_rope(**{**args, **bad})


# ------------------------------------------------------------------------------------------------------- Attention
def attention_formula(q, k, v, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    scores = q.double() @ k.transpose(-1, -2) * scale
    q_len, kv_len = q.shape[2], k.shape[2]
    visible = torch.arange(kv_len - q_len, kv_len)[:, None] >= torch.arange(kv_len)[None, :]
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("Hq, Hkv", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("q_len, kv_len", [(1, 1), (1, 129), (7, 7), (129, 129), (5, 23)])
def test_attention_matches_causal_softmax(q_len, kv_len, Hq, Hkv, dtype, atol, rtol):
    D = 32
    q = torch.randn(2, Hq, q_len, D).to(dtype)
    cache = torch.randn(2, 2, Hkv, kv_len + 9, D).to(dtype)     # read through a slice, as from the KV cache
    k, v = cache[0, :, :, :kv_len], cache[1, :, :, :kv_len]
    out = ok.attention(q, k, v, D**-0.5)
    torch.testing.assert_close(out.double(), attention_formula(q, k, v, D**-0.5), atol=atol * 2, rtol=rtol)


def test_attention_rejects_mismatched_heads():
    with pytest.raises(ValueError, match="does not fit"):
        ok.attention(torch.randn(1, 6, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), 1.0)


# ------------------------------------------------------------------------------------------------------------- MoE
def moe_formula(x, router, gate_up, down, top_k, renormalize, shared=None):
    """Token by token, slot by slot, in float64 (routing decided on the op's own router probabilities)."""
    weights, ids = ok.moe_route_ref(x, router, top_k, renormalize)
    inter = down.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = x[t].double()
        for slot in range(top_k):
            e = ids[t, slot]
            h = gate_up[e].double() @ xt
            y = down[e].double() @ (F.silu(h[:inter]) * h[inter:])
            out[t] += weights[t, slot].double() * y
    if shared is not None:
        s = [p.double() for p in shared[:4]]
        mlp = s[2] @ (F.silu(s[0] @ x.double().T) * (s[1] @ x.double().T))
        out += (torch.sigmoid(s[3] @ x.double().T) * mlp).T
    return out


def moe_weights(E, H, inter, dtype, shared_inter=0):
    g = torch.Generator().manual_seed(E * 1000 + H)
    rnd = lambda *s: (torch.randn(*s, generator=g) * 0.1).to(dtype)  # noqa: E731
    router, gate_up, down = rnd(E, H), rnd(E, 2 * inter, H), rnd(E, H, inter)
    shared = ok.SharedExpert(rnd(shared_inter, H), rnd(shared_inter, H), rnd(H, shared_inter), rnd(1, H)) \
        if shared_inter else None
    return router, gate_up, down, shared


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 129])
def test_shared_expert_with_one_input_gemm_equals_three(T, dtype, atol, rtol):
    # the GPU runtime's layout (fuse_projections): gate_proj, up_proj and the sigmoid gate as rows of one weight
    from omni_kernels.moe import shared_expert_parts, shared_expert_ref
    _, _, _, shared = moe_weights(8, 48, 24, dtype, shared_inter=40)
    fused = shared._replace(fused=torch.cat([shared.gate_proj, shared.up_proj, shared.gate]))
    x = strided(torch.randn(T, 48).to(dtype))
    gate, mlp = shared_expert_parts(x, fused)
    assert gate.shape == (T, 1) and mlp.shape == (T, 48)
    torch.testing.assert_close(torch.sigmoid(gate) * mlp, shared_expert_ref(x, shared), atol=atol, rtol=rtol)
    gate, mlp = shared_expert_parts(x, shared)   # three input GEMMs: the reference's own calls
    assert torch.equal(torch.sigmoid(gate) * mlp, shared_expert_ref(x, shared))


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 17, 129])
@pytest.mark.parametrize("E, top_k, renormalize", [(8, 1, True), (8, 2, False), (128, 6, True), (128, 8, True)])
def test_fused_moe_matches_per_token_loop(T, E, top_k, renormalize, dtype, atol, rtol):
    H, inter = 48, 24
    router, gate_up, down, _ = moe_weights(E, H, inter, dtype)
    x = strided(torch.randn(T, H).to(dtype))
    out = ok.fused_moe(x, router, gate_up, down, top_k, renormalize)
    expected = moe_formula(x, router, gate_up, down, top_k, renormalize)
    torch.testing.assert_close(out.double(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, E", [(1, 8), (6, 32), (7, 128)])
def test_moe_decode_loop_equals_grouped_gemm(rows, E, dtype):
    # Fewer rows than experts on CPU: a loop over the used experts instead of grouped_mm's loop over all of them,
    # which must not change a bit (the parity tests' bf16 logits are exact).
    from omni_kernels.moe import _grouped_linear
    g = torch.Generator().manual_seed(rows)
    x, weight = torch.randn(rows, 64, generator=g).to(dtype), torch.randn(E, 48, 64, generator=g).to(dtype)
    ids = torch.sort(torch.randint(0, E, (rows,), generator=g)).values
    offsets = torch.cumsum(torch.bincount(ids, minlength=E), dim=0, dtype=torch.int32)
    assert torch.equal(_grouped_linear(x, weight, offsets), F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets))


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_fused_moe_odd_sizes_take_the_unaligned_path(dtype, atol, rtol):
    H, inter, E = 33, 7, 5          # rows of 7 or 33 elements break the grouped GEMM's 16-byte stride rule
    router, gate_up, down, _ = moe_weights(E, H, inter, dtype)
    x = torch.randn(11, H).to(dtype)
    torch.testing.assert_close(ok.fused_moe(x, router, gate_up, down, 3, True).double(),
                               moe_formula(x, router, gate_up, down, 3, True), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_fused_moe_with_shared_expert(dtype, atol, rtol):
    H, inter, E = 40, 16, 8
    router, gate_up, down, shared = moe_weights(E, H, inter, dtype, shared_inter=56)
    x = torch.randn(9, H).to(dtype)
    out = ok.fused_moe(x, router, gate_up, down, 2, True, shared=shared)
    torch.testing.assert_close(out.double(), moe_formula(x, router, gate_up, down, 2, True, shared),
                               atol=atol, rtol=rtol)


def test_moe_router_picks_best_experts_and_renormalises():
    x, router = torch.randn(33, 16), torch.randn(10, 16)
    weights, ids = ok.moe_route_ref(x, router, 3, renormalize=True)
    probs = torch.softmax(x @ router.T, dim=-1)
    assert torch.equal(ids, probs.topk(3).indices)
    torch.testing.assert_close(weights.sum(-1), torch.ones(33))
    raw, _ = ok.moe_route_ref(x, router, 3, renormalize=False)
    torch.testing.assert_close(raw, probs.topk(3).values)


def test_fused_moe_rejects_bad_shapes():
    router, gate_up, down, _ = moe_weights(4, 8, 6, torch.float32)
    with pytest.raises(ValueError, match="shapes disagree"):
        ok.fused_moe(torch.randn(3, 9), router, gate_up, down, 2, True)
    with pytest.raises(ValueError, match="top_k"):
        ok.fused_moe(torch.randn(3, 8), router, gate_up, down, 5, True)
    # an odd gate_up (7 rows) with a down of 3 columns: no gate/up split fits both
    with pytest.raises(ValueError, match="gate rows then up rows"):
        ok.fused_moe(torch.randn(3, 8), router, gate_up[:, :7], down[..., :3], 2, True)
    with pytest.raises(ValueError, match=r"\(E, 2I, H\)"):
        ok.fused_moe(torch.randn(3, 8), router, gate_up[0], down, 2, True)
