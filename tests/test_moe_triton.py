"""The Triton fused MoE against fused_moe_ref: routing, the expert sort, both GEMM paths, launch configs, dispatch.

On CPU the kernels run in the Triton interpreter (~25 ms of Python per program instance), so shapes are small and the
launch configs the interpreter gets use few, large tiles. Inputs are drawn without routing ties: torch.topk orders
equal probabilities arbitrarily (differently on CPU and GPU) while the kernel takes the lowest expert id, and in bf16
ties are common. The tie rule itself is tested on the routing kernel alone.
"""
import json
import textwrap

import pytest
import torch
import torch.nn.functional as F

import omni_kernels as ok
from omni_kernels import moe
from omni_kernels._triton import HAS_TRITON, triton_runs
from aot_compile import compile_script_lines

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not (HAS_TRITON and triton_runs(DEVICE)), reason="needs triton (GPU or interpreter)")

# Output tolerance in ulps of max|ref| (errors scale with the largest outputs, here |y| ~0.01-0.08 on average, up to
# ~0.5). fp32: exact products in the interpreter, only the summation order differs (<= 2.5 seen). fp16/bf16: the
# kernel rounds gate, up, silu, h, y and w*y to the model dtype like the reference (fp16 <= 0.3 seen), but the
# interpreter truncates fp32->bf16 instead of rounding, so each of those steps may land an ulp lower (<= 3.3 seen).
DTYPES = [(torch.float32, 8), (torch.float16, 4), (torch.bfloat16, 6)]
SMALL_TILES = dict(BLOCK_M=16, gate_up=dict(BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1),
                   down=dict(BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1))


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous view (every other column of a wider buffer)."""
    wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
    wide[:, ::2] = t
    return wide[:, ::2]


def untied_tokens(num_tokens, router, top_k, g):
    """x (T, H) whose top-(k+1) router probabilities are all distinct (rows redrawn until they are)."""
    hidden, num_experts = router.shape[1], router.shape[0]
    x = torch.randn(num_tokens, hidden, generator=g).to(router.dtype)
    for _ in range(200):
        values = torch.softmax(F.linear(x, router).float(), -1).topk(min(top_k + 1, num_experts)).values
        tied = ((values[:, :-1] - values[:, 1:]) <= 1e-4 * values[:, :-1]).any(-1)
        if not tied.any():
            return x
        x[tied] = torch.randn(int(tied.sum()), hidden, generator=g).to(router.dtype)
    raise AssertionError("could not draw tokens without routing ties")


def moe_inputs(num_tokens, num_experts, top_k, hidden, inter, dtype, shared_inter=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: (torch.randn(*s, generator=g) * 0.1).to(dtype)  # noqa: E731
    router = rnd(num_experts, hidden)
    gate_up, down = rnd(num_experts, 2 * inter, hidden), rnd(num_experts, hidden, inter)
    shared = ok.SharedExpert(rnd(shared_inter, hidden), rnd(shared_inter, hidden), rnd(hidden, shared_inter),
                             rnd(1, hidden)) if shared_inter else None
    x = untied_tokens(num_tokens, router, top_k, g)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(x), to(router), to(gate_up), to(down), shared and ok.SharedExpert(*map(to, shared))


def check(out, expected, atol, rtol):
    assert out.shape == expected.shape and out.dtype == expected.dtype
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=rtol)


def assert_ulps(out, expected, ulps):
    """Elementwise |out - expected| <= ulps x eps(dtype) x max|expected|."""
    check(out, expected, ulps * torch.finfo(out.dtype).eps * expected.float().abs().max().item(), 0)


# ------------------------------------------------------------------------------------------ end to end, per dtype
@pytest.mark.parametrize("dtype, ulps", DTYPES)
@pytest.mark.parametrize("T, E, top_k, renormalize, is_strided", [
    (1, 128, 8, True, True),     # decode, one token: the GEMV path
    (3, 8, 2, False, False),     # decode, tl.dot on 16-row tiles
    (17, 128, 1, True, True),    # prefill just past the split, many experts
    (128, 8, 6, True, False),    # prefill
    (133, 8, 8, False, True),    # prefill, non-power-of-two tokens
])
def test_matches_reference(T, E, top_k, renormalize, is_strided, dtype, ulps):
    # hidden 40, intermediate 24: masked N and K tails in both GEMMs
    x, router, gate_up, down, _ = moe_inputs(T, E, top_k, 40, 24, dtype, seed=T)
    x = strided(x) if is_strided else x
    with ok.use_backend("triton", op="fused_moe"):
        out = ok.fused_moe(x, router, gate_up, down, top_k, renormalize)
    assert_ulps(out, ok.fused_moe_ref(x, router, gate_up, down, top_k, renormalize), ulps)


@pytest.mark.parametrize("dtype, ulps", DTYPES)
@pytest.mark.parametrize("fused", [False, True], ids=["three input GEMMs", "one fused input GEMM"])
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("combine", [None, "triton"], ids=["default combine", "triton combine"])
def test_talker_shared_expert(T, fused, combine, dtype, ulps):
    x, router, gate_up, down, shared = moe_inputs(T, 128, 6, 40, 24, dtype, shared_inter=56, seed=1)
    if fused:   # as fuse_projections lays it out: gate_proj, up_proj, gate rows of one weight
        shared = shared._replace(fused=torch.cat([shared.gate_proj, shared.up_proj, shared.gate]))
    with ok.use_backend("triton", op="fused_moe"), ok.use_backend(combine, op="moe_combine"):
        out = ok.fused_moe(strided(x), router, gate_up, down, 6, True, shared=shared)
    assert_ulps(out, ok.fused_moe_ref(x, router, gate_up, down, 6, True, shared), ulps)


# ------------------------------------------------------------------------------- both paths on the same inputs
@pytest.mark.parametrize("tiles", ["default", "small"])
@pytest.mark.parametrize("T, E, top_k", [(1, 8, 2), (3, 8, 4), (17, 16, 2)])
def test_decode_and_prefill_paths_agree(T, E, top_k, tiles):
    # small tiles: several K steps with a masked tail, several N tiles, grouped program order; transposed w_gate_up
    # and w_down (K not contiguous) check that strides are honoured
    x, router, gate_up, down, _ = moe_inputs(T, E, top_k, 40, 24, torch.float32, seed=7)
    if tiles == "small":
        gate_up, down = (w.transpose(1, 2).contiguous().transpose(1, 2) for w in (gate_up, down))
    config = SMALL_TILES if tiles == "small" else None
    expected = ok.fused_moe_ref(x, router, gate_up, down, top_k, True)
    decode = moe.fused_moe_triton(x, router, gate_up, down, top_k, True, decode=True, config=config)
    prefill = moe.fused_moe_triton(x, router, gate_up, down, top_k, True, decode=False, config=config)
    check(decode, expected, 1e-6, 1e-5)
    check(prefill, expected, 1e-6, 1e-5)
    check(decode, prefill, 1e-6, 1e-5)


# ---------------------------------------------------------------------------------------------- the pieces
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("E, top_k", [(8, 1), (8, 2), (128, 6), (128, 8)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_matches_reference(E, top_k, renormalize, dtype):
    x, router, *_ = moe_inputs(9, E, top_k, 16, 8, dtype, seed=E + top_k)
    weights, ids = moe.moe_route(F.linear(x, router), top_k, renormalize)
    ref_weights, ref_ids = ok.moe_route_ref(x, router, top_k, renormalize)
    assert ids.dtype == torch.int32 and weights.dtype == dtype
    assert torch.equal(ids.long(), ref_ids)
    # fp16/bf16: the interpreter truncates the final cast, one ulp (2^-10, 2^-7 of a weight <= 1)
    tolerance = {torch.float32: (1e-7, 1e-6), torch.float16: (0, 1e-3), torch.bfloat16: (0, 8e-3)}[dtype]
    check(weights, ref_weights, *tolerance)


def test_route_breaks_ties_by_lowest_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]], device=DEVICE)
    weights, ids = moe.moe_route(logits, 3, False)
    assert ids.tolist() == [[1, 2, 4], [0, 1, 2]]
    torch.testing.assert_close(weights[1], torch.full((3,), 0.2, device=DEVICE))


def test_align_sorts_pairs_by_expert_and_pads_each_run():
    g = torch.Generator().manual_seed(0)
    choices = torch.tensor([0, 1, 3, 4, 6])                      # experts 2 and 5 get no pairs
    ids = choices[torch.randint(0, 5, (37, 3), generator=g)].to(torch.int32).to(DEVICE)
    block_m = 16
    rows = moe.moe_align(ids, 7, block_m, block_p=16)           # 7 chunks: the scan crosses chunk boundaries
    flat = ids.reshape(-1).cpu()
    counts = torch.bincount(flat, minlength=7)
    padded = (counts + block_m - 1) // block_m * block_m
    assert rows.num_padded.item() == padded.sum().item() <= rows.sorted_pairs.numel()
    slots, experts = rows.sorted_pairs.cpu(), rows.block_expert.cpu()
    start = 0
    for e in range(7):
        run = slots[start:start + padded[e]]
        expected = torch.nonzero(flat == e).flatten()            # stable: pairs in order
        assert torch.equal(run[:counts[e]].long(), expected)
        assert (run[counts[e]:] == flat.numel()).all()           # padding names no pair
        assert (experts[start // block_m:(start + padded[e]) // block_m] == e).all()
        start += int(padded[e])


def test_launch_config_table_lookup(tmp_path, monkeypatch):
    entry = lambda n: dict(BLOCK_M=n, gate_up=dict(BLOCK_N=n), down=dict(BLOCK_N=n))  # noqa: E731
    name = moe.config_file_name(128, 768, 2048, torch.bfloat16, "cpu")
    assert name == "E=128,N=768,K=2048,device_name=cpu,dtype=bfloat16.json"
    (tmp_path / name).write_text(json.dumps({str(m): entry(m) for m in (1, 16, 64, 512)}))
    monkeypatch.setattr(moe, "CONFIG_DIR", tmp_path)
    lookup = lambda T: moe.moe_launch_config(T, 8, 128, 768, 2048, torch.bfloat16, torch.device("cpu"))  # noqa: E731
    # the nearest token count that runs the same kernel variant: GEMV (1), decode (2-16), prefill (17+)
    assert [lookup(T)["BLOCK_M"] for T in (1, 2, 12, 16, 17, 300, 4096)] == [1, 16, 16, 16, 64, 512, 512]
    gemv_only = tmp_path / "gemv_only"
    gemv_only.mkdir()
    (gemv_only / name).write_text(json.dumps({"1": entry(1)}))
    monkeypatch.setattr(moe, "CONFIG_DIR", gemv_only)          # no entry for the variant: the heuristic
    assert lookup(1)["BLOCK_M"] == 1 and lookup(2) == moe.default_config(2, 8, 128, 768, 2048)
    monkeypatch.setattr(moe, "CONFIG_DIR", tmp_path / "none")  # no table at all
    assert lookup(17) == moe.default_config(17, 8, 128, 768, 2048)


def test_prefill_default_uses_hopper_tiles_only_where_they_fit(monkeypatch):
    monkeypatch.setattr(moe, "INTERPRET", False)  # the GPU heuristic, not the interpreter's few-programs one
    H100, A100, RTX_5090 = moe.GpuTarget(90, 232448), moe.GpuTarget(80, 166912), moe.GpuTarget(120, 101376)
    thinker = lambda T, dtype=torch.bfloat16, target=H100: moe.default_config(T, 8, 128, 768, 2048, dtype, target)  # noqa: E731
    big = thinker(4096)
    assert big["BLOCK_M"] == 128 and big["gate_up"]["BLOCK_N"] == 128 and big["down"]["BLOCK_N"] == 256
    assert [big[role]["num_stages"] for role in ("gate_up", "down")] == [4, 4]
    for role, tiles in (("gate_up", 2), ("down", 1)):
        assert moe.gemm_shared_memory(128, big[role], tiles, 2, 90) == 4 * 48 * 1024 <= H100.shared_memory
    assert moe.default_config(4096, 8, 128, 768, 2048, torch.bfloat16, moe.GpuTarget(90, 160 * 1024)) == {
        **big, "gate_up": {**big["gate_up"], "num_stages": 3}, "down": {**big["down"], "num_stages": 3}}
    sixty_four = thinker(4096, target=None)
    assert sixty_four["BLOCK_M"] == 64
    # Ampere (the same tiles spill there), too little shared memory, fp32, or too few rows per expert: 64-row tiles
    assert thinker(4096, target=A100) == thinker(4096, target=RTX_5090) == thinker(4096, torch.float32) == sixty_four
    assert thinker(1024)["BLOCK_M"] == 64 and thinker(1536)["BLOCK_M"] == 128   # 64 and 96 rows per expert
    for T in (1, 8, 200, 1024, 4096):
        for target in (H100, A100):
            cfg = thinker(T, target=target)
            for role, tiles in (("gate_up", 2), ("down", 1)):
                assert moe.gemm_shared_memory(cfg["BLOCK_M"], cfg[role], tiles, 2, target.capability) <= \
                    target.shared_memory


# ---------------------------------------------------------------------------------------- dispatch and tracing
def test_dispatch_uses_the_reference_on_cpu_unless_forced(monkeypatch):
    assert ok.selected_backend("fused_moe", "cpu") == "torch"
    calls = []
    monkeypatch.setattr(moe, "fused_moe_triton", lambda *a: calls.append(a) or torch.zeros_like(a[0]))
    x, router, gate_up, down, _ = moe_inputs(2, 8, 2, 16, 8, torch.float32)
    ok.fused_moe(x, router, gate_up, down, 2, True)
    assert not calls or DEVICE.type == "cuda"
    with ok.use_backend("triton", op="fused_moe"):
        assert ok.selected_backend("fused_moe", DEVICE) == "triton"
        ok.fused_moe(x, router, gate_up, down, 2, True)
    assert len(calls) == (1 if DEVICE.type == "cpu" else 2)


def test_custom_op_has_a_fake_and_traces():
    x, router, gate_up, down, shared = moe_inputs(2, 8, 2, 16, 8, torch.float32, shared_inter=8)
    torch.library.opcheck(torch.ops.omni.fused_moe_triton.default, (x, router, gate_up, down, 2, True, *shared[:4]),
                          test_utils=("test_schema", "test_faketensor"))
    # a column-major x: the output is row-major all the same, and the fakes say so
    column_major = x.t().contiguous().t()
    for op in (torch.ops.omni.fused_moe_triton, torch.ops.omni.fused_moe_ref):
        torch.library.opcheck(op.default, (column_major, router, gate_up, down, 2, True, *shared[:4]),
                              test_utils=("test_schema", "test_faketensor"))
    torch._dynamo.reset()
    with ok.use_backend("triton", op="fused_moe"):
        step = lambda x: ok.fused_moe(x, router, gate_up, down, 2, True, shared)  # noqa: E731
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()
    check(got, ok.fused_moe_ref(x, router, gate_up, down, 2, True, shared), 1e-6, 1e-5)


AOT_SCRIPT = textwrap.dedent("""
    import os, re, subprocess, sys, tempfile
    import torch
    import triton
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        sys.exit(3)
    from omni_kernels import moe

    I, H, E = 768, 2048, 128
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    def build(fn, args, meta, num_warps, num_stages):
        # specialise like the JIT: pointers and multiples of 16 are 16-aligned, ints equal to 1 are constants
        signature, constants, attrs = {}, dict(meta), {}
        for name, value in args.items():
            index = fn.arg_names.index(name)
            if isinstance(value, str):
                signature[name] = value
                attrs[(index,)] = [["tt.divisibility", 16]]
            elif value == 1:
                constants[name] = 1
            else:
                signature[name] = "i32"
                if value % 16 == 0:
                    attrs[(index,)] = [["tt.divisibility", 16]]
        signature.update({name: "constexpr" for name in constants})
        kernel = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=num_warps, num_stages=num_stages))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True)
        print(fn.__name__, meta.get("BLOCK_M"), re.search(r"REG:\\d+ STACK:\\d+", usage.stdout).group(0))
        return kernel.metadata.shared

    ptrs = dict(ids_ptr="*i32", sorted_ptr="*i32", block_expert_ptr="*i32", num_padded_ptr="*i32")
    hopper = moe.GpuTarget(90, 232448)  # H100/H200: 227 KB of shared memory a block
    for T, dtype in [(1, "bf16"), (8, "bf16"), (64, "bf16"), (4096, "bf16"), (8, "fp32")]:
        cfg = moe.default_config(T, 8, E, I, H, torch.bfloat16 if dtype == "bf16" else torch.float32, hopper)
        decode = T <= moe.DECODE_MAX_TOKENS
        block_m = (1 if T == 1 else 16) if decode else cfg["BLOCK_M"]
        for fn, role, args in [
            (moe._moe_gate_up_kernel, "gate_up", dict(x_ptr="*" + dtype, w_ptr="*" + dtype, h_ptr="*" + dtype, **ptrs,
             num_pairs=8 * T, num_pid_m=64, top_k=8, inter=I, hidden=H, stride_xt=H, stride_xh=1,
             stride_we=2 * I * H, stride_wn=H, stride_wk=1)),
            (moe._moe_down_kernel, "down", dict(h_ptr="*" + dtype, w_ptr="*" + dtype, weights_ptr="*" + dtype,
             out_ptr="*" + dtype, **ptrs, num_pairs=8 * T, num_pid_m=64, hidden=H, inter=I, stride_we=I * H,
             stride_wn=I, stride_wk=1))]:
            c = cfg[role]
            meta = dict(SORTED=not decode, BLOCK_P=triton.next_power_of_2(8 * T) if decode else 16, BLOCK_M=block_m,
                        BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], GROUP_M=c["GROUP_M"],
                        PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False)
            shared = build(fn, args, meta, c["num_warps"], c["num_stages"])
            estimate = moe.gemm_shared_memory(block_m, c, 2 if role == "gate_up" else 1, 2 if dtype == "bf16" else 4,
                                              hopper.capability)
            if block_m > 1 and not shared <= min(estimate, hopper.shared_memory):
                sys.exit(f"{fn.__name__} T={T}: {shared} B of shared memory, estimated {estimate}")
    build(moe._moe_route_kernel, dict(logits_ptr="*bf16", weights_ptr="*bf16", ids_ptr="*i32", num_tokens=64,
          num_experts=E, stride_lt=E), dict(TOP_K=8, RENORMALIZE=True, BLOCK_T=16, BLOCK_E=E, BLOCK_K=8), 4, 1)
    build(moe._moe_align_count_kernel, dict(ids_ptr="*i32", rank_ptr="*i32", chunk_counts_ptr="*i32", num_pairs=512),
          dict(BLOCK_P=64, BLOCK_E=E), 4, 1)
    build(moe._moe_align_scan_kernel, dict(chunk_counts_ptr="*i32", chunk_base_ptr="*i32", block_expert_ptr="*i32",
          sorted_ptr="*i32", num_padded_ptr="*i32", num_chunks=8, num_pairs=512, max_blocks=64),
          dict(BLOCK_M=64, BLOCK_E=E, BLOCK_C=32, BLOCK_B=32, BLOCK_Q=1024), 4, 1)
    build(moe._moe_align_scatter_kernel, dict(ids_ptr="*i32", rank_ptr="*i32", chunk_base_ptr="*i32",
          sorted_ptr="*i32", num_pairs=512), dict(BLOCK_P=64, BLOCK_E=E), 4, 1)
""")


def test_kernels_compile_for_hopper_without_spills():
    """Compile every kernel for sm_90 with the default configs for an H100 (ptxas ships with triton; no GPU
    needed): no spills, and shared memory within the device's and within gemm_shared_memory's estimate."""
    lines = compile_script_lines(AOT_SCRIPT)
    assert len(lines) == 14 and all(line.endswith("STACK:0") for line in lines), lines


def test_thinker_with_triton_moe_matches_reference(reference_checkpoint):
    """The runtime on the tiny checkpoint, MoE forced to the Triton kernels (prefill path for the prompt, the no-sort
    decode path for each new token), gives the reference's greedy tokens."""
    from test_thinker_parity import IM_END, chat_prompt, reference_generate

    from omni_runtime import OmniModel
    folder, hf_model = reference_checkpoint()
    prompt = chat_prompt(0)
    expected, _ = reference_generate(hf_model, prompt, 4, IM_END)
    model = OmniModel.from_pretrained(folder)
    with ok.use_backend("triton", op="fused_moe"):
        assert model.generate(prompt, max_new_tokens=4, eos_token_id=IM_END).text_ids == expected
