"""The fused sampling kernel (the interpreter on CPU) against the reference warpers: the same token for the same race
noise, the reference's kept set at the top-k/top-p boundaries, the reference's tokens for a seed (the noise is
torch.multinomial's own), and the Sampler and seeded speech with the kernel forced."""
import textwrap

import pytest
import torch

import omni_kernels as ok
from omni_kernels._triton import HAS_TRITON, triton_runs
from omni_kernels.fused_sampling import MAX_FUSED_VOCAB, fused_sample, sample_with_noise_ref
from omni_kernels.sampling import penalised_logits, warped_probs
from omni_runtime.sampling import Sampler, SamplingParams
from aot_compile import compile_script_lines

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not (HAS_TRITON and triton_runs(DEVICE)), reason="needs triton")
SETTINGS = {   # temperature, top_k, top_p: off, the talker's, the predictor's, top-p alone, top-k 1, top-k >= V
    "plain": (1.0, 0, 1.0), "talker": (0.9, 50, 1.0), "predictor": (1.0, 50, 0.8), "top-p": (0.7, 0, 0.5),
    "top-k 1": (1.3, 1, 1.0), "top-k all": (1.0, 5000, 0.9)}


def make_logits(batch, vocab, dtype, layout, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(batch, vocab + 3, generator=g)).to(DEVICE, dtype)
    if layout == "transposed":          # column stride `batch`
        return logits[:, :vocab].t().contiguous().t()
    return logits[:, 3:]                # row stride vocab + 3


def check_same_draw(ours, logits, temperature, top_k, top_p, noise, seen=None, penalty=1.0, suppress=None):
    """Our tokens are the reference's, or (rounding) a token whose race value is the reference's best to 1e-5."""
    expected = sample_with_noise_ref(logits, temperature, top_k, top_p, noise, seen, penalty, suppress)
    masked = penalised_logits(logits.float(), seen, penalty, suppress)
    race = warped_probs(masked, temperature, top_k, top_p) / noise
    best = race.gather(1, expected[:, None])
    assert (race.gather(1, ours[:, None]) >= best * (1 - 1e-5)).all() and (race.gather(1, ours[:, None]) > 0).all()
    assert (ours == expected).float().mean() >= 0.5   # rounding ties are rare, not the rule


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("batch, vocab", [(1, 1), (3, 7), (2, 129), (3, 2048), (1, 3072)])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_draw_matches_reference_for_the_same_noise(dtype, batch, vocab, setting):
    if vocab < 129 and setting in ("talker", "predictor"):
        pytest.skip("top-k 50 of fewer tokens: the top-k all case")
    temperature, top_k, top_p = SETTINGS[setting]
    layout = "transposed" if vocab % 2 else "row-strided"
    logits = make_logits(batch, vocab, dtype, layout, seed=vocab + batch)
    noise = torch.empty(batch, vocab).exponential_(generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ours = fused_sample(logits, temperature, top_k, top_p, noise=noise)
    assert ours.dtype == torch.int64 and ours.shape == (batch,)
    check_same_draw(ours, logits, temperature, top_k, top_p, noise)


@needs_triton
def test_tiny_top_p_keeps_the_best_token():
    # 1 - 1e-9 rounds to 1.0 in fp32: every running sum is within it, and the best token is still kept
    logits = make_logits(3, 300, torch.float32, "row-strided", seed=8)
    noise = torch.empty(3, 300).exponential_(generator=torch.Generator().manual_seed(3)).to(DEVICE)
    assert torch.equal(fused_sample(logits, 1.0, 0, 1e-9, noise=noise), logits.argmax(-1))


@needs_triton
@pytest.mark.parametrize("setting", ["talker", "predictor", "top-p", "top-k 1"])
def test_kept_set_is_the_reference_s_at_its_boundaries(setting):
    # near-zero noise on one token makes it win if it is kept: the best token the reference drops must lose, the
    # weakest token it keeps must win
    temperature, top_k, top_p = SETTINGS[setting]
    batch, vocab = 4, 2048
    logits = make_logits(batch, vocab, torch.float32, "row-strided", seed=5)
    probs = warped_probs(logits.float(), temperature, top_k, top_p)
    raw = torch.softmax(logits.float() / temperature, dim=-1)
    dropped_best = raw.masked_fill(probs > 0, -1).argmax(-1)
    kept_weakest = raw.masked_fill(probs == 0, 2).argmin(-1)
    for probe, wins in ((dropped_best, False), (kept_weakest, True)):
        noise = torch.ones(batch, vocab, device=DEVICE).scatter(1, probe[:, None], 1e-30)
        ours = fused_sample(logits, temperature, top_k, top_p, noise=noise)
        assert torch.equal(ours == probe, torch.full_like(ours, wins, dtype=torch.bool)), (probe, ours)
        assert torch.equal(ours, sample_with_noise_ref(logits, temperature, top_k, top_p, noise))


@needs_triton
def test_ties_at_the_k_th_logit_are_kept_and_negative_zero_is_zero():
    below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()   # one ulp under the k-th: dropped
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, -0.0, 0.0, below_one], [0.0, -0.0, -0.0, -5.0, -5.0, -5.0, -5.0]],
                          device=DEVICE)
    for token in range(7):   # each token in turn gets the near-zero noise: it wins iff top-k keeps it
        noise = torch.ones_like(logits).index_fill_(1, torch.tensor([token], device=DEVICE), 1e-30)
        for top_k in (1, 2, 3, 4, 5):
            ours = fused_sample(logits, 1.0, top_k, 1.0, noise=noise)
            assert torch.equal(ours, sample_with_noise_ref(logits, 1.0, top_k, 1.0, noise)), (token, top_k)


@needs_triton
def test_penalty_over_seen_and_suppressed_tokens_fold_in():
    batch, vocab = 3, 3072
    logits = make_logits(batch, vocab, torch.float32, "row-strided", seed=9)
    g = torch.Generator().manual_seed(2)
    seen = (torch.rand(batch, vocab + 1, generator=g) < 0.3).to(DEVICE)[:, 1:]       # a strided mask
    suppress = torch.zeros(vocab, dtype=torch.bool, device=DEVICE)
    suppress[2048:] = True
    suppress[2150] = False
    for name in ("talker", "predictor"):
        temperature, top_k, top_p = SETTINGS[name]
        noise = torch.empty(batch, vocab).exponential_(generator=g).to(DEVICE)
        ours = fused_sample(logits, temperature, top_k, top_p, noise=noise, seen=seen, penalty=1.3, suppress=suppress)
        check_same_draw(ours, logits, temperature, top_k, top_p, noise, seen=seen, penalty=1.3, suppress=suppress)
        assert not suppress[ours].any()
    # the suppressed token that would win is never drawn
    noise = torch.ones(batch, vocab, device=DEVICE)
    noise[:, 2500] = 1e-30
    assert (fused_sample(logits, 1.0, 0, 1.0, noise=noise, suppress=suppress) != 2500).all()


@needs_triton
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_a_seed_draws_the_reference_s_tokens(setting):
    # the race's noise is torch.multinomial's own (exponential_ from the generator): the same seed, the same token,
    # with one generator for the batch and with one per row; penalty and suppressed tokens folded in
    from omni_kernels.fused_sampling import _sample_draw_fused, sample_draw_ref
    temperature, top_k, top_p = SETTINGS[setting]
    batch, vocab = 3, 2048
    logits = make_logits(batch, vocab, torch.float32, "row-strided", seed=13).float()
    seen = torch.zeros(batch, vocab, dtype=torch.bool, device=DEVICE)
    seen[:, ::7] = True
    suppress = torch.zeros(vocab, dtype=torch.bool, device=DEVICE)
    suppress[-100:] = True
    gen = lambda seed: torch.Generator(DEVICE).manual_seed(seed)   # noqa: E731
    for seed in range(3):
        args = (logits, temperature, top_k, top_p)
        expected = sample_draw_ref(*args, [gen(seed)], seen, 1.05, suppress)
        assert torch.equal(_sample_draw_fused(*args, [gen(seed)], seen, 1.05, suppress), expected), seed
        rows = [gen(10 * seed + i) for i in range(batch)]
        expected = sample_draw_ref(*args, rows, seen, 1.05, suppress)
        rows = [gen(10 * seed + i) for i in range(batch)]
        assert torch.equal(_sample_draw_fused(*args, rows, seen, 1.05, suppress), expected), seed


@needs_triton
def test_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    rows = 256
    logits = probs.log().expand(rows, 4).to(DEVICE)
    noise = torch.empty(rows, 4).exponential_(generator=torch.Generator().manual_seed(5)).to(DEVICE)
    tokens = fused_sample(logits, 1.0, 0, 1.0, noise)
    counts = torch.bincount(tokens.cpu(), minlength=4).double()
    chi2 = ((counts - rows * probs.double()) ** 2 / (rows * probs.double())).sum()
    assert chi2 < 21.1, counts   # 3 degrees of freedom: p = 1e-4 (the noise is seeded: not a flaky test)


def test_bad_arguments_are_named():
    logits, noise = torch.randn(2, 10), torch.ones(2, 10)
    for kwargs, message in [
        (dict(logits=torch.randn(1, MAX_FUSED_VOCAB + 1), noise=torch.ones(1, MAX_FUSED_VOCAB + 1)), "vocabulary"),
        (dict(temperature=0.0), "temperature > 0"),
        (dict(noise=torch.ones(2, 9)), "noise"),
        (dict(seen=torch.zeros(2, 9, dtype=torch.bool)), "seen"),
        (dict(suppress=torch.zeros(9, dtype=torch.bool)), "suppress"),
    ]:
        args = dict(logits=logits, temperature=1.0, top_k=0, top_p=1.0, noise=noise) | kwargs
        with pytest.raises(ValueError, match=message):
            fused_sample(**args)


@needs_triton
def test_sampler_with_the_fused_kernel_forced():
    # seeded streams repeat, rows drawn from their own generators draw as alone, greedy is argmax, and the
    # thinker's vocabulary (past MAX_FUSED_VOCAB) takes the reference
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.8, repetition_penalty=1.05, seed=4)
    logits = make_logits(3, 2048, torch.float32, "row-strided", seed=3).float()
    seen = torch.zeros(3, 2048, dtype=torch.bool, device=DEVICE)
    seen[:, :100] = True
    with ok.use_backend("triton", op="sample_draw"):
        assert ok.selected_backend("sample_draw", DEVICE) == "triton"
        stream = lambda: [Sampler(params, DEVICE)(logits, seen=seen).tolist() for _ in range(2)]  # noqa: E731
        assert stream() == stream()
        generators = [torch.Generator(DEVICE).manual_seed(s) for s in (1, 2, 3)]
        together = Sampler(params, DEVICE).draw_rows(logits, generators, seen)
        generators = [torch.Generator(DEVICE).manual_seed(s) for s in (1, 2, 3)]
        alone = [Sampler(params, DEVICE, generator=g)(logits[i:i + 1], seen=seen[i:i + 1]) for i, g in
                 enumerate(generators)]
        assert torch.equal(together, torch.cat(alone))
        greedy = Sampler(SamplingParams(temperature=0.0), DEVICE)
        assert torch.equal(greedy(logits), logits.argmax(-1))
        wide = torch.randn(1, MAX_FUSED_VOCAB + 1, device=DEVICE)
        wide_params = SamplingParams(temperature=1.0, seed=1)
        fused = Sampler(wide_params, DEVICE)(wide)
    assert torch.equal(fused, Sampler(wide_params, DEVICE)(wide))


AOT_SCRIPT = textwrap.dedent("""
    import os, re, subprocess, sys, tempfile
    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        sys.exit(3)
    from omni_kernels import fused_sampling as fs

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    signature = dict(logits_ptr="*fp32", seen_ptr="*u8", suppress_ptr="*u8", noise_ptr="*fp32",
                     out_ptr="*i64", vocab="i32", stride_lb="i32", stride_lv="i32", stride_sb="i32", stride_sv="i32",
                     stride_nb="i32", temperature="fp32", penalty="fp32", top_k="i32", top_p_drop="fp32")
    for capability in (80, 90):
        for block in (1024, 2048, 4096, 8192):
            assert block <= fs.MAX_FUSED_VOCAB
            meta = dict(HAS_SEEN=True, HAS_SUPPRESS=True, TOP_K=True, TOP_P=True, ACCURATE_EXP=True, BLOCK_V=block)
            kernel = triton.compile(ASTSource(fs._fused_sample_kernel, signature | dict.fromkeys(meta, "constexpr"),
                                              meta, {}),
                                    target=GPUTarget("cuda", capability, 32),
                                    options=dict(num_warps=fs.num_warps(block)))
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(kernel.asm["cubin"])
                f.flush()
                usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
            print(capability, block, re.search(r"REG:\\d+ STACK:\\d+", usage.stdout).group(0))
""")


def test_kernel_compiles_for_ampere_and_hopper_without_spills():
    lines = compile_script_lines(AOT_SCRIPT)
    assert len(lines) == 8 and all(line.endswith("STACK:0") for line in lines), lines


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sampled_speech_with_the_fused_draw(reference_checkpoint, monkeypatch, dtype):
    # the runtime's talker (and, off the fp32 C++ frame, predictor) draws through the kernel: seeded speech repeats,
    # never draws a codec special, and in fp32 is the default path's for the same seed (the race's noise is
    # torch.multinomial's). bf16 logits tie often (8 bits of mantissa), and a tie group straddling the top-p boundary
    # stays whole here where the reference's sort drops part of it, so bf16 draws may part ways.
    from omni_kernels import fused_sampling
    from omni_runtime import OmniModel
    calls = []
    kernel = fused_sampling.fused_sample
    monkeypatch.setattr(fused_sampling, "fused_sample", lambda *a, **k: calls.append(a[0].shape) or kernel(*a, **k))
    model = OmniModel.from_pretrained(reference_checkpoint()[0], dtype=dtype)
    prompt = [151644, 872, 198, 1000, 1001, 151645, 198, 151644, 77091, 198]
    kwargs = dict(max_new_tokens=3, return_audio=True, talker_max_new_tokens=4,
                  talker_sampling=SamplingParams(temperature=0.9, top_k=50, repetition_penalty=1.05, seed=2))
    with ok.use_backend("triton", op="sample_draw"):
        a, b = model.generate(prompt, **kwargs), model.generate(prompt, **kwargs)
    assert torch.equal(a.codes, b.codes) and (a.codes[0] < 2048).all()
    frames = a.codes.shape[1] + b.codes.shape[1]
    assert len(calls) >= frames * (1 if dtype == torch.float32 else 16)
    if dtype == torch.float32:
        assert ok.selected_backend("sample_draw", model.device) == "torch"
        reference = model.generate(prompt, **kwargs)
        assert torch.equal(a.codes, reference.codes) and a.text_ids == reference.text_ids
