"""The CUDA fused MoE (torch.ops.omni.fused_moe, torch.ops.omni.moe_route) against fused_moe_ref: routing and its tie
rule, the decode path (<= 16 tokens) and the prefill path (align + grouped GEMMs), 16-byte and scalar layouts, the
shared expert, argument checks, CUDA-graph capture and dispatch. Skipped without a GPU or without the compiled op.

Inputs come from test_moe_triton's helpers: drawn without routing ties (torch.topk orders ties arbitrarily, the
kernel takes the lowest id). fp32 differs from the reference only in summation order; fp16/bf16 round gate, up,
silu, h, y and w*y like the reference, but a different accumulation order can move an fp32 sum across a rounding
boundary, one ulp in the model dtype, so the tolerances are an ulp or two of the outputs' scale.
"""
import pytest
import torch
import torch.nn.functional as F
from test_moe_triton import check, moe_inputs, strided

import omni_kernels as ok
from omni_kernels import moe
from omni_kernels._extension import has_cuda_op

pytestmark = pytest.mark.gpu

DTYPES = [(torch.float32, 1e-5, 1e-4), (torch.float16, 2e-3, 4e-3), (torch.bfloat16, 1.6e-2, 1.6e-2)]


@pytest.fixture(autouse=True)
def needs_extension():
    if not torch.cuda.is_available() or not has_cuda_op("fused_moe"):
        pytest.skip("needs a GPU and the compiled extension with omni::fused_moe")


def run_cuda(x, router, gate_up, down, top_k, renormalize, shared=None):
    with ok.use_backend("cuda", op="fused_moe"):
        assert ok.selected_backend("fused_moe", x.device) == "cuda"
        return ok.fused_moe(x, router, gate_up, down, top_k, renormalize, shared)


def check_scaled(out, expected, atol, rtol):
    # atol relative to the outputs' scale: large hidden sizes give outputs of a few units, not ~0.1
    scale = max(1.0, expected.float().abs().mean().item())
    check(out, expected, atol * scale, rtol)


# ------------------------------------------------------------------------------------------ end to end, per dtype
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 16, 17, 128, 333])       # decode up to 16, prefill from 17
@pytest.mark.parametrize("E, top_k", [(8, 1), (8, 2), (128, 6), (128, 8)])
def test_matches_reference(T, E, top_k, dtype, atol, rtol):
    # hidden 72, intermediate 40: 16-byte rows, but N and K tails in every tile
    x, router, gate_up, down, _ = moe_inputs(T, E, top_k, 72, 40, dtype, seed=T + E + top_k)
    check(run_cuda(x, router, gate_up, down, top_k, True), ok.fused_moe_ref(x, router, gate_up, down, top_k, True),
          atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 17, 333])
@pytest.mark.parametrize("renormalize", [True, False])
def test_strided_x_and_renormalize(T, renormalize, dtype, atol, rtol):
    # a non-contiguous x (column stride 2) takes the scalar decode GEMV / the SIMT GEMM for gate_up
    x, router, gate_up, down, _ = moe_inputs(T, 8, 2, 72, 40, dtype, seed=T)
    x = strided(x)
    check(run_cuda(x, router, gate_up, down, 2, renormalize),
          ok.fused_moe_ref(x, router, gate_up, down, 2, renormalize), atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("hidden, inter", [(36, 20), (33, 17), (8, 8), (1, 1)])
@pytest.mark.parametrize("T", [3, 128])
def test_odd_sizes(T, hidden, inter, dtype, atol, rtol):
    # sizes that are not whole 16-byte chunks (fp16/bf16: 36, 20, 33, 17; fp32: 33, 17) take the scalar paths
    x, router, gate_up, down, _ = moe_inputs(T, 8, 2, hidden, inter, dtype, seed=hidden)
    check(run_cuda(x, router, gate_up, down, 2, True), ok.fused_moe_ref(x, router, gate_up, down, 2, True),
          atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("T", [1, 16, 17, 333])
def test_model_sized_rows(T, dtype, atol, rtol):
    # the thinker's hidden 2048 / intermediate 768: many K steps, several N tiles; 8 experts keep the draw cheap.
    # Outputs ~25 from intermediates ~100: twice the tolerance (an fp32 emulation of the kernel's roundings lands
    # within half of it against the CPU reference)
    x, router, gate_up, down, _ = moe_inputs(T, 8, 2, 2048, 768, dtype, seed=T)
    check_scaled(run_cuda(x, router, gate_up, down, 2, True), ok.fused_moe_ref(x, router, gate_up, down, 2, True),
                 2 * atol, 2 * rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("T", [3, 128])
def test_non_unit_weight_strides(T, dtype, atol, rtol):
    # w_down with I not contiguous (and w_gate_up offset by one element): no 16-byte loads, strides honoured
    x, router, gate_up, down, _ = moe_inputs(T, 8, 2, 72, 40, dtype, seed=3)
    down = down.transpose(1, 2).contiguous().transpose(1, 2)
    flat = torch.empty(gate_up.numel() + 1, dtype=dtype, device=gate_up.device)
    flat[1:].copy_(gate_up.reshape(-1))
    gate_up = flat[1:].view(gate_up.shape)
    check(run_cuda(x, router, gate_up, down, 2, True), ok.fused_moe_ref(x, router, gate_up, down, 2, True),
          atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("T", [3, 128])
@pytest.mark.parametrize("with_shared", [True, False])
def test_talker_shared_expert(T, with_shared, dtype, atol, rtol):
    x, router, gate_up, down, shared = moe_inputs(T, 128, 6, 72, 40, dtype, shared_inter=56, seed=1)
    shared = shared if with_shared else None
    check(run_cuda(x, router, gate_up, down, 6, True, shared),
          ok.fused_moe_ref(x, router, gate_up, down, 6, True, shared), atol, rtol)


def test_zero_tokens():
    x, router, gate_up, down, _ = moe_inputs(3, 8, 2, 16, 8, torch.bfloat16)
    out = run_cuda(x[:0], router, gate_up, down, 2, True)
    assert out.shape == (0, 16)


def test_deterministic():
    x, router, gate_up, down, _ = moe_inputs(333, 8, 8, 72, 40, torch.bfloat16)
    first = run_cuda(x, router, gate_up, down, 8, True)
    assert all(torch.equal(first, run_cuda(x, router, gate_up, down, 8, True)) for _ in range(3))


# ------------------------------------------------------------------------------------------------------ routing
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("E, top_k", [(8, 1), (8, 2), (128, 6), (128, 8), (512, 8), (1000, 3)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_matches_reference(E, top_k, renormalize, dtype):
    x, router, *_ = moe_inputs(9, E, top_k, 16, 8, dtype, seed=E + top_k)
    weights, ids = moe.moe_route_cuda(F.linear(x, router), top_k, renormalize)
    ref_weights, ref_ids = ok.moe_route_ref(x, router, top_k, renormalize)
    assert ids.dtype == torch.int32 and weights.dtype == dtype
    assert torch.equal(ids.long(), ref_ids)
    # fp32: the softmax sums over up to 1000 experts in another order
    check(weights, ref_weights, *((1e-7, 1e-5) if dtype == torch.float32 else (0, 8e-3)))


def test_route_breaks_ties_by_lowest_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]], device="cuda")
    weights, ids = moe.moe_route_cuda(logits, 3, False)
    assert ids.tolist() == [[1, 2, 4], [0, 1, 2]]
    torch.testing.assert_close(weights[1], torch.full((3,), 0.2, device="cuda"))
    # 64 equal experts: the tie spans lanes (expert e lives in lane e % 32)
    _, ids = moe.moe_route_cuda(torch.zeros(2, 64, device="cuda"), 40, True)
    assert ids.tolist() == [list(range(40))] * 2


def test_route_nan_keeps_ids_distinct_and_in_range():
    logits = torch.full((2, 16), float("nan"), device="cuda")
    weights, ids = moe.moe_route_cuda(logits, 4, True)
    assert ((ids >= 0) & (ids < 16)).all() and all(len(set(row)) == 4 for row in ids.tolist())
    assert weights.isnan().all()


# ------------------------------------------------------------------------------------------------ bad arguments
def test_rejects_bad_arguments():
    x, router, gate_up, down, _ = moe_inputs(3, 8, 2, 16, 8, torch.bfloat16)
    logits = F.linear(x, router)
    out = torch.empty_like(x)
    op = torch.ops.omni.fused_moe
    with pytest.raises(RuntimeError, match="one dtype"):
        op(x, logits, gate_up.float(), down, 2, True, out)
    with pytest.raises(RuntimeError, match="one dtype"):
        op(x, logits.float(), gate_up, down, 2, True, out)
    with pytest.raises(RuntimeError, match="dtype must be"):
        op(x.double(), logits.double(), gate_up.double(), down.double(), 2, True, out.double())
    with pytest.raises(RuntimeError, match="weight shapes"):
        op(x, logits, gate_up[:, :-1], down, 2, True, out)
    with pytest.raises(RuntimeError, match="weight shapes"):
        op(x, logits, gate_up, down[:, :-1], 2, True, out)
    with pytest.raises(RuntimeError, match="router_logits must be"):
        op(x, logits[:, :-1], gate_up, down, 2, True, out)
    with pytest.raises(RuntimeError, match="out must be"):
        op(x, logits, gate_up, down, 2, True, out[:-1])
    with pytest.raises(RuntimeError, match="x must be"):
        op(x[None], logits, gate_up, down, 2, True, out)
    with pytest.raises(RuntimeError, match="top_k"):
        op(x, logits, gate_up, down, 9, True, out)
    with pytest.raises(RuntimeError, match="top_k"):
        op(x, logits, gate_up, down, 0, True, out)
    with pytest.raises(RuntimeError, match="must be on"):
        op(x, logits.cpu(), gate_up, down, 2, True, out)
    with pytest.raises(RuntimeError):  # no CPU kernel: the dispatcher refuses (NotImplementedError)
        op(x.cpu(), logits.cpu(), gate_up.cpu(), down.cpu(), 2, True, out.cpu())
    with pytest.raises(ValueError, match="top_k"):
        run_cuda(x, router, gate_up, down, 9, True)
    with pytest.raises(ValueError, match="shapes disagree"):
        run_cuda(x, router[:, :-1], gate_up, down, 2, True)


def test_route_rejects_bad_arguments():
    logits = torch.randn(3, 8, device="cuda")
    weights, ids = torch.empty(3, 2, device="cuda"), torch.empty(3, 2, dtype=torch.int32, device="cuda")
    op = torch.ops.omni.moe_route
    with pytest.raises(RuntimeError, match="top_k"):
        op(logits, 9, True, torch.empty(3, 9, device="cuda"), torch.empty(3, 9, dtype=torch.int32, device="cuda"))
    with pytest.raises(RuntimeError, match="ids must be int32"):
        op(logits, 2, True, weights, ids.long())
    with pytest.raises(RuntimeError, match="weights must have"):
        op(logits, 2, True, weights.half(), ids)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(logits, 2, True, weights, torch.empty(2, 3, dtype=torch.int32, device="cuda").t())
    with pytest.raises(RuntimeError, match="number of experts"):
        op(torch.randn(3, 1025, device="cuda"), 2, True, weights, ids)
    with pytest.raises(RuntimeError, match="logits must be"):
        op(logits[None], 2, True, weights, ids)


# ------------------------------------------------------------------------------------- graphs, tracing, dispatch
@pytest.mark.parametrize("T", [3, 128])
def test_graph_replays_with_new_tokens(T):
    # no host synchronisation on either path: capture once, replay on other tokens (other routing)
    x, router, gate_up, down, _ = moe_inputs(T, 128, 8, 72, 40, torch.bfloat16, seed=5)
    x2 = moe_inputs(T, 128, 8, 72, 40, torch.bfloat16, seed=6)[0]
    static = x.clone()
    run_cuda(static, router, gate_up, down, 8, True)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with ok.use_backend("cuda", op="fused_moe"), torch.cuda.graph(graph):
        out = ok.fused_moe(static, router, gate_up, down, 8, True)
    for tokens in (x2, x):
        static.copy_(tokens)
        graph.replay()
        torch.cuda.synchronize()
        check(out, ok.fused_moe_ref(tokens, router, gate_up, down, 8, True), 1.6e-2, 1.6e-2)


def test_op_schema_and_fake():
    x, router, gate_up, down, _ = moe_inputs(3, 8, 2, 16, 8, torch.float32)
    torch.library.opcheck(torch.ops.omni.fused_moe.default, (x, F.linear(x, router), gate_up, down, 2, True,
                                                             torch.empty_like(x)),
                          test_utils=("test_schema", "test_faketensor"))


def test_cuda_backend_is_opt_in():
    assert ok.selected_backend("fused_moe", "cuda") != "cuda"
    with ok.use_backend("cuda", op="fused_moe"):
        assert ok.selected_backend("fused_moe", "cuda") == "cuda"
