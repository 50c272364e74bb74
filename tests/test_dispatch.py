import subprocess
import sys

import pytest
import torch

import omni_kernels as ok
from omni_kernels.dispatch import KernelRegistry, everywhere


def make_registry(forced=None):
    registry = KernelRegistry(forced=forced)
    registry.register("op", "torch", everywhere)(lambda: "torch")
    registry.register("op", "triton", lambda d: d.type == "cpu")(lambda: "triton")
    registry.register("op", "cuda", lambda d: d.type == "cuda")(lambda: "cuda")
    return registry


def test_prefers_cuda_then_triton_then_torch_where_they_run():
    registry = KernelRegistry()
    registry.register("op", "torch", everywhere)(lambda: "torch")
    registry.register("op", "triton", lambda d: d.type in ("cuda", "meta"))(lambda: "triton")
    registry.register("op", "cuda", lambda d: d.type == "cuda")(lambda: "cuda")
    assert registry.select("op", torch.device("cuda")).backend == "cuda"
    assert registry.select("op", torch.device("meta")).backend == "triton"


def test_triton_on_cpu_only_when_forced():
    registry = make_registry()
    assert registry.select("op", torch.device("cpu")).backend == "torch"
    registry.set_backend("triton")
    assert registry.select("op", torch.device("cpu")).backend == "triton"


def test_forced_backend_global_and_per_op():
    registry = make_registry(forced="torch")
    assert registry.select("op", torch.device("cpu")).backend == "torch"
    registry.set_backend("triton", op="op")
    assert registry.select("op", torch.device("cpu")).backend == "triton"
    registry.set_backend(None, op="op")
    assert registry.select("op", torch.device("cpu")).backend == "torch"


def test_forced_backend_that_cannot_run_falls_back_in_order():
    registry = make_registry(forced="cuda")
    assert registry.select("op", torch.device("cpu")).backend == "torch"


def test_opt_in_backend_only_when_forced():
    # an opt-in kernel that runs on CPU: the search passes over it, forcing its backend (per op or globally) picks it
    op = "_test_opt_in_op"
    registry = ok.dispatch.REGISTRY
    registry.register(op, "torch", everywhere)(lambda: "torch")
    registry.register(op, "cpp", lambda d: d.type == "cpu", opt_in=True)(lambda: "cpp")
    try:
        assert registry.select(op, torch.device("cpu")).backend == "torch"
        with ok.use_backend("cpp", op=op):
            assert ok.selected_backend(op, "cpu") == "cpp"
        assert ok.selected_backend(op, "cpu") == "torch"
        with ok.use_backend("cpp"):
            assert ok.selected_backend(op, "cpu") == "cpp"
        assert registry.select(op, torch.device("cpu")).fn() == "torch"
    finally:
        registry._kernels.pop(op, None)
        registry._selected.clear()
    assert op not in registry.ops()


def test_fused_moe_cuda_is_opt_in():
    kernel = ok.dispatch.REGISTRY._kernels["fused_moe"]["cuda"]
    assert kernel.opt_in and not ok.dispatch.REGISTRY._kernels["fused_moe"]["triton"].opt_in

def test_cuda_backend_needs_a_cuda_kernel_not_just_the_schema():
    # bindings.cpp defines every omni:: schema in every build; only a CUDA build registers CUDA kernels behind them,
    # and a GPU must never be sent to a schema without one
    from omni_kernels._extension import extension_loaded, has_cuda_op, has_op
    if not extension_loaded():
        pytest.skip("extension not built")
    registry = ok.dispatch.REGISTRY
    cuda_ops = [op for op in registry.ops() if "cuda" in registry.backends(op)]
    assert "rms_norm" in cuda_ops and hasattr(torch.ops.omni, "rms_norm")
    composed = {"add_rms_norm": "rms_norm"}   # ops whose CUDA backend is another omni:: kernel with torch ops
    for op in cuda_ops:
        kernel = torch._C._dispatch_has_kernel_for_dispatch_key(f"omni::{composed.get(op, op)}", "CUDA")
        assert has_cuda_op(composed.get(op, op)) == kernel, op
        if not kernel:
            assert ok.selected_backend(op, "cuda") != "cuda", op
            with ok.use_backend("cuda", op=op):                 # forcing it cannot pick a missing kernel either
                assert ok.selected_backend(op, "cuda") != "cuda", op
    assert has_op("decoder_step") and not has_cuda_op("decoder_step")     # a CPU twin only
    if torch.version.cuda is None:  # a CPU-only torch builds a CPU-only extension: no CUDA kernel at all
        assert not any(has_cuda_op(op) for op in cuda_ops)
        assert ok.selected_backend("rms_norm", "cuda") == "torch"


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown kernel backend"):
        ok.set_backend("tpu")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        KernelRegistry(forced="rocm")


def test_use_backend_restores_previous_choice():
    before = ok.dispatch.REGISTRY.forced("rms_norm")
    with ok.use_backend("torch", op="rms_norm"):
        assert ok.selected_backend("rms_norm", "cpu") == "torch"
    assert ok.dispatch.REGISTRY.forced("rms_norm") == before


def test_every_op_has_a_reference_backend():
    for op in ok.dispatch.REGISTRY.ops():
        assert "torch" in ok.dispatch.REGISTRY.backends(op)
        assert ok.selected_backend(op, "cpu") in ok.BACKENDS


def test_environment_variable_forces_the_backend():
    code = "import omni_kernels as ok; print(ok.dispatch.REGISTRY.forced('rms_norm'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"OMNI_KERNELS_BACKEND": "torch", "PATH": ""}, check=True)
    assert result.stdout.strip() == "torch"
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"OMNI_KERNELS_BACKEND": "bogus", "PATH": ""})
    assert bad.returncode != 0 and "unknown kernel backend" in bad.stderr


def test_import_needs_no_gpu_and_no_extension():
    code = "import omni_kernels, omni_runtime; from omni_kernels._extension import extension_loaded; " \
           "print(omni_kernels.selected_backend('rms_norm', 'cpu'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""})
    assert result.stdout.strip() in ok.BACKENDS
