"""The C++ CPU twin of the code-predictor frame against its pure-torch reference, and the runtime's use of it."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import omni_kernels as ok
from omni_kernels._extension import has_op
from omni_runtime import OmniModel
from omni_runtime.sampling import Sampler, SamplingParams

needs_twin = pytest.mark.skipif(not has_op("code_predictor_frame"), reason="extension built without the CPU twins")

# (hidden, heads, kv_heads, head_dim, inter, vocab, layers, groups): the test model's, then odd ones
SHAPES = [(48, 4, 2, 16, 96, 2048, 2, 15), (7, 1, 1, 2, 5, 129, 1, 3), (33, 6, 2, 8, 19, 257, 3, 15),
          (64, 8, 8, 12, 1, 7, 2, 1)]


def random_weights(hidden, heads, kv_heads, head_dim, inter, vocab, layers, groups, dtype=torch.float32,
                   seed=0, transposed=False) -> ok.PredictorWeights:
    """Fan-in scaled random weights; ``transposed`` gives every matrix and vector as a non-contiguous view."""
    g = torch.Generator().manual_seed(seed)

    def matrix(rows, cols):
        if transposed:
            return (torch.randn(cols, rows, generator=g) / cols**0.5).to(dtype).t()
        return (torch.randn(rows, cols, generator=g) / cols**0.5).to(dtype)

    def norm(n):
        w = 1 + 0.2 * torch.randn(2 * n if transposed else n, generator=g)
        return (w[::2] if transposed else w).to(dtype)

    stack = tuple(ok.DecoderLayerWeights(
        norm(hidden), matrix(heads * head_dim, hidden), matrix(kv_heads * head_dim, hidden),
        matrix(kv_heads * head_dim, hidden), matrix(hidden, heads * head_dim), norm(head_dim), norm(head_dim),
        norm(hidden), matrix(inter, hidden), matrix(inter, hidden), matrix(hidden, inter)) for _ in range(layers))
    angles = torch.arange(groups + 1, dtype=torch.float32)[:, None] * ok.rope_inv_freq(head_dim, 1e6)
    angles = torch.cat((angles, angles), dim=-1)
    return ok.PredictorWeights(stack, norm(hidden), tuple(matrix(vocab, hidden) * hidden**0.5 for _ in range(groups)),
                               tuple(matrix(vocab, hidden) for _ in range(groups)), angles.cos().to(dtype),
                               angles.sin().to(dtype), heads, kv_heads, 1e-6)


def prefix_for(hidden, dtype=torch.float32, seed=1, strided=False) -> torch.Tensor:
    x = torch.randn(2, 2 * hidden if strided else hidden, generator=torch.Generator().manual_seed(seed))
    return (x[:, ::2] if strided else x).to(dtype)


def run(backend, prefix, weights, **sampling):
    with ok.use_backend(backend, op="code_predictor_frame"):
        return ok.code_predictor_frame(prefix, weights, **sampling)


@needs_twin
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_greedy_frame_matches_reference(shape, strided):
    weights, prefix = random_weights(*shape, transposed=strided), prefix_for(shape[0], strided=strided)
    codes, embed_sum = run("cpp", prefix, weights)
    ref_codes, ref_sum = ok.code_predictor_frame_ref(prefix, weights)
    assert codes.dtype == torch.int64 and codes.shape == (shape[-1],) and embed_sum.shape == (shape[0],)
    assert torch.equal(codes, ref_codes)
    # the projections are the reference's GEMMs; norms and attention reduce in another order (a few ulps)
    torch.testing.assert_close(embed_sum, ref_sum, rtol=1e-5, atol=1e-5)


@needs_twin
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_frame_draws_as_the_reference(seed):
    weights, prefix = random_weights(*SHAPES[0]), prefix_for(SHAPES[0][0])
    sampling = dict(temperature=0.9, top_k=50, top_p=0.8)
    draws = [run("cpp", prefix, weights, generator=torch.Generator().manual_seed(seed), **sampling)[0]
             for _ in range(2)]
    expected = ok.code_predictor_frame_ref(prefix, weights, generator=torch.Generator().manual_seed(seed), **sampling)
    assert torch.equal(draws[0], expected[0]) and torch.equal(draws[0], draws[1])
    other = run("cpp", prefix, weights, generator=torch.Generator().manual_seed(seed + 10), **sampling)[0]
    assert not torch.equal(other, draws[0])   # the draws come from the generator


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_other_dtypes_take_the_reference(dtype):
    weights, prefix = random_weights(*SHAPES[1], dtype=dtype), prefix_for(SHAPES[1][0], dtype=dtype)
    codes, embed_sum = ok.code_predictor_frame(prefix, weights)
    ref_codes, ref_sum = ok.code_predictor_frame_ref(prefix, weights)
    assert embed_sum.dtype == dtype and torch.equal(codes, ref_codes) and torch.equal(embed_sum, ref_sum)


@needs_twin
def test_rejects_bad_arguments():
    shape = SHAPES[1]
    weights, prefix = random_weights(*shape), prefix_for(shape[0])
    with pytest.raises(ValueError, match="prefix must be"):
        ok.code_predictor_frame(prefix[:1], weights)
    with pytest.raises(ValueError, match="temperature"):
        ok.code_predictor_frame(prefix, weights, temperature=-1.0)
    layer = weights.layers[0]._replace(k_proj=torch.zeros(3, shape[0]))
    bad = dataclasses.replace(weights, layers=(layer,))
    with pytest.raises(RuntimeError, match="k_proj must be"):
        run("cpp", prefix, bad)
    bad = dataclasses.replace(weights, heads=weights.heads[:-1])
    with pytest.raises(RuntimeError, match="one head per embedding table"):
        run("cpp", prefix, bad)


@needs_twin
def test_runtime_predicts_frames_in_one_call(reference_checkpoint):
    # fp32 on CPU: the talker runner's frames go to the twin, with the module path's codes; forced to the torch
    # backend it runs the module path itself.
    folder, _ = reference_checkpoint()
    runner = OmniModel.from_pretrained(folder).talker_runner
    assert ok.selected_backend("code_predictor_frame", "cpu") == "cpp"
    greedy = Sampler(SamplingParams(temperature=0.0), torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for _ in range(5):
            hidden = torch.randn(1, 1, runner.cfg.text.hidden_size, generator=generator)
            code0 = torch.randint(0, 2048, (1,), generator=generator)
            codes, embed = runner.predict_residuals(hidden, code0, greedy)
            expected = runner._predict(hidden, code0, greedy)
            assert torch.equal(codes, expected[0])
            torch.testing.assert_close(embed, expected[1], rtol=1e-5, atol=1e-5)
            with ok.use_backend("torch", op="code_predictor_frame"):
                forced = runner.predict_residuals(hidden, code0, greedy)
            assert torch.equal(forced[0], expected[0]) and torch.equal(forced[1], expected[1])
