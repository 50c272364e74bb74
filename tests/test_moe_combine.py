"""moe_combine: the reference against the op-by-op formula, the Triton kernel (the interpreter on CPU) and the CUDA
kernel (GPU) against the reference, the dispatch and its argument checks."""
import pytest
import torch

import omni_kernels as ok
from omni_kernels._triton import HAS_TRITON, triton_runs
from omni_kernels.moe_combine import moe_combine_ref, moe_combine_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not (HAS_TRITON and triton_runs(DEVICE)), reason="needs triton")
# the sum, the sigmoid, its product and the final add each round to the dtype; fp32: exp implementations differ by
# an ulp; bf16: the interpreter truncates where torch rounds. An ulp of the operands, not of the result: the sum and
# the gated shared expert may cancel.
ULPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
SHAPES = [(1, 1, 1), (1, 6, 1024), (3, 6, 7), (7, 8, 129), (129, 2, 48)]   # (tokens, top_k, hidden)


def exact_values(*shape, g) -> torch.Tensor:
    """Values with 8 significant bits (every dtype holds them) within 2^-3..2^4: any sum of up to 8 of them is exact
    in fp32, so the order the rows are added in cannot show."""
    mantissa = 1 + torch.randint(0, 128, shape, generator=g) / 128
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    return sign * mantissa * 2.0 ** torch.randint(-3, 4, shape, generator=g)


def combine_inputs(tokens, top_k, hidden, dtype, layout, g, values=None):
    """rows (T, K, H), gate (T, 1) and shared (T, H) in the layouts fused_moe passes and stranger ones:
    "contiguous"; "strided": rows a (K, T, H) buffer seen as (T, K, H) with hidden every other element, the gate a
    column of the fused projection's output (row stride 2 Is + 1), shared rows apart."""
    values = values or (lambda *s: torch.randn(*s, generator=g))
    rows, gate, shared = values(tokens, top_k, hidden), 4 * torch.randn(tokens, 1, generator=g), values(tokens, hidden)
    rows, gate, shared = (t.to(DEVICE, dtype) for t in (rows, gate, shared))
    if layout == "strided":
        wide = torch.zeros(top_k, tokens, 2 * hidden, dtype=dtype, device=DEVICE)
        wide[..., ::2] = rows.transpose(0, 1)
        rows = wide[..., ::2].transpose(0, 1)
        projected = torch.zeros(tokens, 2 * 5 + 1, dtype=dtype, device=DEVICE)
        projected[:, 10:] = gate
        gate = projected[:, 10:]
        padded = torch.zeros(tokens, hidden + 3, dtype=dtype, device=DEVICE)
        padded[:, 3:] = shared
        shared = padded[:, 3:]
    return rows, gate, shared


def assert_combined_close(out, rows, gate, shared, ulps=4):
    """out within ``ulps`` ulps of the magnitudes it combines (sum_k |rows| + |shared|) of the reference."""
    ref = moe_combine_ref(rows, gate, shared)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    scale = rows.double().abs().sum(1) + (0 if shared is None else shared.double().abs())
    error = (out.double() - ref.double()).abs()
    bound = ulps * ULPS[rows.dtype] * scale
    assert (error <= bound).all(), f"max error {(error - bound).max().item():.3g} past {ulps} ulps of the operands"


def test_reference_is_the_sum_plus_the_gated_shared_expert():
    g = torch.Generator().manual_seed(0)
    rows, gate, shared = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((5, 3, 7), (5, 1), (5, 7)))
    expected = rows[:, 0] + rows[:, 1] + rows[:, 2]
    torch.testing.assert_close(moe_combine_ref(rows), expected)
    torch.testing.assert_close(moe_combine_ref(rows, gate, shared), expected + shared / (1 + torch.exp(-gate)))


@needs_triton
@pytest.mark.parametrize("dtype", list(ULPS), ids=str)
@pytest.mark.parametrize("tokens, top_k, hidden", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("with_shared", [True, False], ids=["shared expert", "routed only"])
def test_triton_matches_reference(tokens, top_k, hidden, layout, with_shared, dtype):
    g = torch.Generator().manual_seed(tokens * 100 + hidden)
    rows, gate, shared = combine_inputs(tokens, top_k, hidden, dtype, layout, g)
    if not with_shared:
        gate = shared = None
    out = moe_combine_triton(rows, gate, shared)
    assert_combined_close(out, rows, gate, shared)
    assert out.shape == (tokens, hidden) and out.is_contiguous()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_sums_in_rank_order_and_rounds_once(dtype):
    # exact sums: equal, not close (fp16's casts round in the interpreter as on a GPU; bf16's truncate there)
    g = torch.Generator().manual_seed(1)
    rows, _, _ = combine_inputs(17, 8, 129, dtype, "strided", g, values=lambda *s: exact_values(*s, g=g))
    assert torch.equal(moe_combine_triton(rows), moe_combine_ref(rows))
    cancelling = torch.tensor([[[1.0], [2.0 ** -12], [-1.0]]], dtype=dtype, device=DEVICE)   # fp16: 2^-12 needs fp32
    assert moe_combine_triton(cancelling).item() == 2.0 ** -12 == moe_combine_ref(cancelling).item()


@needs_triton
def test_dispatch_takes_the_reference_unless_a_kernel_is_forced():
    from omni_kernels._extension import has_cuda_op   # Triton: opt-in until measured on a GPU; CUDA: the default
    assert ok.selected_backend("moe_combine", DEVICE) == ("cuda" if has_cuda_op("moe_combine") else "torch")
    g = torch.Generator().manual_seed(2)
    rows, gate, shared = combine_inputs(3, 6, 40, torch.float32, "contiguous", g)
    with ok.use_backend("triton", op="moe_combine"):
        assert ok.selected_backend("moe_combine", DEVICE) == "triton"
        out = ok.moe_combine(rows, gate, shared)
    torch.testing.assert_close(out, moe_combine_ref(rows, gate, shared), atol=1e-6, rtol=1e-6)
    assert moe_combine_triton(rows[:0], gate[:0], shared[:0]).shape == (0, 40)
    assert moe_combine_triton(rows.double()).dtype == torch.float64   # other dtypes: the reference


def test_rejects_bad_arguments():
    rows, gate, shared = torch.randn(3, 2, 8), torch.randn(3, 1), torch.randn(3, 8)
    for args, message in (((rows[0],), "rows must be"), ((rows, gate, None), "both its gate logits and its output"),
                          ((rows, gate[:2], shared), "must be \\(3, 1\\) and \\(3, 8\\)"),
                          ((rows, gate, shared[:, :4]), "must be \\(3, 1\\) and \\(3, 8\\)"),
                          ((rows, gate.to("meta"), shared), "on rows' device")):
        with pytest.raises(ValueError, match=message):
            ok.moe_combine(*args)


# ------------------------------------------------------------------------------------------------------ CUDA
def _cuda_moe_combine():
    from omni_kernels._extension import has_cuda_op
    if not torch.cuda.is_available() or not has_cuda_op("moe_combine"):
        pytest.skip("needs a GPU and the compiled extension")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(ULPS), ids=str)
@pytest.mark.parametrize("tokens, top_k, hidden", [*SHAPES, (16, 6, 1024), (5, 1, 2048), (1, 8, 2048)])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "unaligned"])
@pytest.mark.parametrize("with_shared", [True, False], ids=["shared expert", "routed only"])
def test_cuda_is_the_reference_bit_for_bit(tokens, top_k, hidden, layout, with_shared, dtype):
    # exact row sums, so torch's CUDA reduction order cannot show: then the same sigmoid (expf, IEEE division) and
    # roundings make it equal, not close; the vector path (16-byte rows), the scalar one (odd widths, unaligned
    # views) and a hidden stride the kernel does not take (strided rows: the reference runs)
    _cuda_moe_combine()
    from omni_kernels.moe_combine import moe_combine_cuda
    g = torch.Generator().manual_seed(tokens + top_k)
    rows, gate, shared = combine_inputs(tokens, top_k, hidden, dtype, "strided" if layout == "strided" else
                                        "contiguous", g, values=lambda *s: exact_values(*s, g=g))
    if layout == "unaligned":   # rows and shared one element past a 16-byte boundary
        rows = torch.cat([rows.new_zeros(1), rows.flatten()])[1:].view_as(rows)
        shared = torch.cat([shared.new_zeros(1), shared.flatten()])[1:].view_as(shared)
    if not with_shared:
        gate = shared = None
    assert ok.selected_backend("moe_combine", "cuda") == "cuda"
    out = ok.moe_combine(rows, gate, shared)
    assert out.shape == (tokens, hidden) and out.is_contiguous()
    assert torch.equal(out, moe_combine_ref(rows, gate, shared))
    assert torch.equal(moe_combine_cuda(rows, gate, shared), out)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(ULPS), ids=str)
def test_cuda_matches_reference_on_any_rows(dtype):
    # random rows: the sums may round, and torch's reduction may add them in another order (the last fp32 bit)
    _cuda_moe_combine()
    g = torch.Generator().manual_seed(3)
    rows, gate, shared = combine_inputs(33, 8, 2048, dtype, "contiguous", g)
    assert_combined_close(ok.moe_combine(rows, gate, shared), rows, gate, shared)


@pytest.mark.gpu
def test_cuda_refuses_bad_arguments():
    _cuda_moe_combine()
    rows, gate, shared = torch.randn(4, 2, 8, device="cuda"), torch.randn(4, 1, device="cuda"), \
        torch.randn(4, 8, device="cuda")
    op = torch.ops.omni.moe_combine
    for args, message in (((rows, gate, shared, torch.empty(4, 5, device="cuda")), "out must have shape"),
                          ((rows, gate, shared, torch.empty(4, 8, device="cuda").half()), "out must have rows' dtype"),
                          ((rows, gate, None, torch.empty(4, 8, device="cuda")), "both its gate logits"),
                          ((rows, gate[:3], shared, torch.empty(4, 8, device="cuda")), "gate must have shape"),
                          ((rows, gate, shared, shared), "out must not overlap shared"),
                          ((rows, gate, shared, torch.empty(8, 4, device="cuda").t()), "out must be contiguous"),
                          ((rows.double(), None, None, torch.empty(4, 8, device="cuda").double()), "dtype must be")):
        with pytest.raises(RuntimeError, match=message):
            op(*args)
