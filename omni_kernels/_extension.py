"""Lazy access to the compiled extension ``omni_kernels._C`` (built from ``csrc/``: the CUDA kernels where a CUDA
toolchain exists, the C++ CPU twins wherever torch and a C++ compiler do).

Nothing here runs at import time: the shared library is loaded on the first call that asks for it, so
``import omni_kernels`` works on machines without a GPU or without the extension.
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def extension_loaded() -> bool:
    try:
        import omni_kernels._C  # noqa: F401  (registers the omni:: ops with the dispatcher)
    except ImportError:
        return False
    _register_fakes()
    return True


@functools.cache
def has_kernel(name: str, dispatch_key: str) -> bool:
    """The extension has a kernel for ``omni::name`` under ``dispatch_key`` ("CPU", "CUDA"). bindings.cpp defines
    every schema in every build (only the CUDA impls sit behind OMNI_WITH_CUDA), so the schema alone says nothing:
    a CPU-only build has ``torch.ops.omni.rms_norm`` but no CUDA kernel behind it."""
    return (extension_loaded() and hasattr(torch.ops.omni, name)
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"omni::{name}", dispatch_key))


def has_op(name: str) -> bool:
    """The extension has a C++ CPU kernel (a CPU twin) for ``name``."""
    return has_kernel(name, "CPU")


def has_cuda_op(name: str) -> bool:
    """The extension was built with CUDA and has a CUDA kernel for ``name``."""
    return has_kernel(name, "CUDA")


def cuda_runs(name: str):
    """Device predicate for a backend entry: a CUDA kernel for the op exists and the tensor lives on a GPU."""
    return lambda device: device.type == "cuda" and has_cuda_op(name)


def cpu_runs(name: str):
    """Device predicate for a C++ CPU twin: a CPU kernel for the op exists and the tensor lives on the CPU."""
    return lambda device: device.type == "cpu" and has_op(name)


def _register_fakes() -> None:
    # Ops that write into preallocated outputs return nothing; their fakes only need to exist for tracing.
    for name in ("rms_norm", "add_rms_norm", "silu_mul", "qk_norm_rope", "decode_attention", "rvq_embed_mean",
                 "causal_conv1d", "causal_conv_transpose1d", "moe_route", "fused_moe", "moe_combine",
                 "code_predictor_frame", "decoder_step"):
        if hasattr(torch.ops.omni, name):
            torch.library.register_fake(f"omni::{name}")(lambda *args, **kwargs: None)
