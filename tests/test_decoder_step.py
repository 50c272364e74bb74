"""The C++ CPU twin of a decode step (thinker and talker) against its pure-torch reference, and the runtime's use."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import omni_kernels as ok
from omni_kernels._extension import has_op
from omni_runtime import OmniModel

needs_twin = pytest.mark.skipif(not has_op("decoder_step"), reason="extension built without the CPU twins")

# name: (hidden, heads, kv_heads, head_dim, vocab, layer kinds, experts, top_k, renormalize); kinds: d dense,
# m MoE, s MoE with the shared expert
CASES = {
    "talker-like": (48, 4, 2, 16, 3072, "ss", 8, 2, True),
    "thinker-like": (64, 4, 2, 16, 1000, "dmm", 32, 4, True),
    "odd": (7, 1, 1, 2, 129, "mds", 5, 1, False),
    "gqa3-top3": (33, 6, 2, 8, 257, "mm", 7, 3, False),
}


def random_weights(hidden, heads, kv_heads, head_dim, vocab, kinds, experts, top_k, renormalize, seed=0,
                   dtype=torch.float32, transposed=False) -> ok.DecoderWeights:
    """Fan-in scaled random weights; ``transposed`` gives every matrix and vector as a non-contiguous view."""
    g = torch.Generator().manual_seed(seed)

    def matrix(rows, cols, *batch):
        w = torch.randn(*batch, cols, rows, generator=g).transpose(-1, -2) if transposed else \
            torch.randn(*batch, rows, cols, generator=g)
        return (w / cols**0.5).to(dtype)

    def norm(n):
        w = 1 + 0.2 * torch.randn(2 * n if transposed else n, generator=g)
        return (w[::2] if transposed else w).to(dtype)

    inter, shared = 2 * hidden + 1, hidden + 3
    layers = []
    for kind in kinds:
        layer = ok.DecoderLayerWeights(norm(hidden), matrix(heads * head_dim, hidden),
                                       matrix(kv_heads * head_dim, hidden), matrix(kv_heads * head_dim, hidden),
                                       matrix(hidden, heads * head_dim), norm(head_dim), norm(head_dim), norm(hidden))
        if kind == "d":
            layer = layer._replace(gate_proj=matrix(inter, hidden), up_proj=matrix(inter, hidden),
                                   down_proj=matrix(hidden, inter))
        else:
            layer = layer._replace(router=matrix(experts, hidden) * 4,
                                   experts_gate_up=matrix(2 * inter, hidden, experts),
                                   experts_down=matrix(hidden, inter, experts))
        if kind == "s":
            layer = layer._replace(shared_gate_proj=matrix(shared, hidden), shared_up_proj=matrix(shared, hidden),
                                   shared_down_proj=matrix(hidden, shared), shared_expert_gate=matrix(1, hidden))
        layers.append(layer)
    return ok.DecoderWeights(tuple(layers), norm(hidden), matrix(vocab, hidden), heads, kv_heads, top_k, renormalize,
                             1e-6)


def rope_row(position: int, head_dim: int, dtype=torch.float32):
    angles = position * ok.rope_inv_freq(head_dim, 1e6)
    angles = torch.cat((angles, angles))
    return angles.cos().to(dtype), angles.sin().to(dtype)


def filled_cache(weights, kv_heads, head_dim, slots, dtype=torch.float32, seed=2):
    """A cache whose earlier slots already hold keys and values, as mid-sequence."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, len(weights.layers), 1, kv_heads, slots, head_dim, generator=g).to(dtype)


def run(backend, *args):
    with ok.use_backend(backend, op="decoder_step"):
        return ok.decoder_step(*args)


@needs_twin
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("slot, slots", [(0, 17), (6, 17), (16, 17), (127, 130), (200, 257)])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_step_matches_reference(case, slot, slots, strided):
    # slots >= 128: the twin's long-context attention (its products through at::mm)
    hidden, heads, kv_heads, head_dim, vocab, *_ = CASES[case]
    weights = random_weights(*CASES[case], transposed=strided)
    x = torch.randn(1, 2 * hidden if strided else hidden, generator=torch.Generator().manual_seed(slot))
    x = x[:, ::2] if strided else x
    cos, sin = rope_row(slot + 3, head_dim)
    cache = filled_cache(weights, kv_heads, head_dim, slots)
    ref_cache = cache.clone()
    h, logits = run("cpp", x, weights, cache, slot, cos, sin)
    ref_h, ref_logits = ok.decoder_step_ref(x, weights, ref_cache, slot, cos, sin)
    assert h.shape == (1, hidden) and logits.shape == (1, vocab) and logits.dtype == torch.float32
    # the projections and routing are the reference's; norms and attention reduce in another order (a few ulps)
    torch.testing.assert_close(h, ref_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))
    torch.testing.assert_close(cache, ref_cache, rtol=1e-5, atol=1e-6)
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[slot] = False
    assert torch.equal(cache[..., untouched, :], ref_cache[..., untouched, :])


@needs_twin
@pytest.mark.parametrize("case", ["talker-like", "thinker-like"])
def test_rows_step_each_over_its_own_cache_row(case):
    # a batched runner's step: 3 sequences at slots 5, 0, 140 (the long-context path) in rows 0..2 of a 4-row cache;
    # each row is its own sequence's step alone, row 3 is untouched
    hidden, heads, kv_heads, head_dim, vocab, *_ = CASES[case]
    weights = random_weights(*CASES[case])
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(1))
    slots = torch.tensor([5, 0, 140])
    rotary = [rope_row(int(p) + 2, head_dim) for p in slots]
    cos, sin = torch.stack([c for c, _ in rotary]), torch.stack([s for _, s in rotary])
    cache = torch.cat([filled_cache(weights, kv_heads, head_dim, 150, seed=row) for row in range(4)], dim=2)
    before = cache.clone()
    h, logits = run("cpp", x, weights, cache, slots, cos, sin)
    ref_h, ref_logits = ok.decoder_step_ref(x, weights, before.clone(), slots, cos, sin)
    assert h.shape == (3, hidden) and logits.shape == (3, vocab)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for row in range(3):
        alone = before[:, :, row:row + 1].contiguous()
        one_h, one_logits = run("cpp", x[row:row + 1], weights, alone, int(slots[row]), cos[row], sin[row])
        torch.testing.assert_close(h[row:row + 1], one_h, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(logits[row:row + 1], one_logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(cache[:, :, row:row + 1], alone)             # the same keys and values, in its own row
    assert torch.equal(cache[:, :, 3], before[:, :, 3])
    with pytest.raises(ValueError, match="2 slots for 3 rows"):
        ok.decoder_step(x, weights, cache, slots[:2], cos, sin)
    with pytest.raises(ValueError, match=">= 3"):
        ok.decoder_step(x, weights, cache[:, :, :2], slots, cos, sin)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_other_dtypes_take_the_reference(dtype):
    hidden, heads, kv_heads, head_dim, *_ = CASES["odd"]
    weights = random_weights(*CASES["odd"], dtype=dtype)
    x, (cos, sin) = torch.randn(1, hidden).to(dtype), rope_row(4, head_dim, dtype)
    cache = filled_cache(weights, kv_heads, head_dim, 8, dtype)
    ref_cache = cache.clone()
    out = ok.decoder_step(x, weights, cache, 4, cos, sin)
    ref = ok.decoder_step_ref(x, weights, ref_cache, 4, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(out, ref)) and torch.equal(cache, ref_cache)


@needs_twin
def test_rejects_bad_arguments():
    hidden, heads, kv_heads, head_dim, *_ = CASES["odd"]
    weights = random_weights(*CASES["odd"])
    x, (cos, sin) = torch.randn(1, hidden), rope_row(0, head_dim)
    cache = filled_cache(weights, kv_heads, head_dim, 8)
    with pytest.raises(ValueError, match="x must be"):
        ok.decoder_step(x[0], weights, cache, 0, cos, sin)
    with pytest.raises(ValueError, match="slot 8 outside"):
        ok.decoder_step(x, weights, cache, 8, cos, sin)
    no_mlp = weights.layers[0]._replace(router=None)
    with pytest.raises(RuntimeError, match="either a dense MLP or a router"):
        run("cpp", x, dataclasses.replace(weights, layers=(no_mlp,)), cache[:, :1].contiguous(), 0, cos, sin)
    bad_k = weights.layers[0]._replace(k_proj=torch.zeros(3, hidden))
    with pytest.raises(RuntimeError, match="k_proj must be"):
        run("cpp", x, dataclasses.replace(weights, layers=(bad_k,)), cache[:, :1].contiguous(), 0, cos, sin)
    with pytest.raises(RuntimeError, match="kv_cache must be"):
        run("cpp", x, weights, cache[:, :1], 0, cos, sin)


@needs_twin
def test_runtime_decodes_in_one_call(reference_checkpoint):
    # fp32 on CPU both runners step through the twin; forced to the torch backend they run the module path.
    folder, _ = reference_checkpoint()
    model = OmniModel.from_pretrained(folder)
    assert ok.selected_backend("decoder_step", "cpu") == "cpp"
    talker = model.talker_runner
    hidden = talker.cfg.text.hidden_size
    positions = torch.arange(6).view(1, 1, -1).expand(3, 1, 6)
    runs = {}
    with torch.inference_mode():
        for backend in ("cpp", "torch"):
            g = torch.Generator().manual_seed(0)
            with ok.use_backend(backend, op="decoder_step"):
                talker.prefill(torch.randn(1, 6, hidden, generator=g), positions)
                runs[backend] = [talker.decode(torch.randn(1, 1, hidden, generator=g)) for _ in range(8)]
    for (logits, state), (ref_logits, ref_state) in zip(runs["cpp"], runs["torch"]):
        assert logits.shape == ref_logits.shape and state.shape == ref_state.shape == (1, 1, hidden)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state, ref_state, rtol=1e-5, atol=1e-5)
        assert torch.equal(logits.argmax(-1), ref_logits.argmax(-1))
