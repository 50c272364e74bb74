"""Triton, when it is installed: the kernels' import point, the interpreter switch and the device predicate.

On CPU, Triton kernels run only in the interpreter (``TRITON_INTERPRET=1``, set before import), and the dispatch
uses them there only when the ``triton`` backend is forced: the interpreter is a test tool, not a fallback.
Without triton (not a Linux wheel platform) the module still imports; its kernels are then never selected.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    try:   # libdevice's math functions (the accurate expf torch's CUDA kernels call)
        from triton.language.extra import libdevice
    except ImportError:
        libdevice = None
except ImportError:  # the decorators become no-ops so kernel modules still import
    HAS_TRITON = False

    class _Placeholder:
        constexpr = int

        def __getattr__(self, name):
            return _Placeholder()

        def __call__(self, *args, **kwargs):
            return args[0] if len(args) == 1 and callable(args[0]) else _Placeholder()

    triton = tl = _Placeholder()
    libdevice = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# whether torch_exp can be libdevice's expf: on a GPU with libdevice, not in the interpreter (it has none)
ACCURATE_EXP = libdevice is not None and not INTERPRET


@triton.jit
def torch_exp(x, ACCURATE: tl.constexpr):
    """exp as torch's CUDA kernels compute it: libdevice's expf (tl.exp is the fast ex2 approximation); the
    interpreter computes it in numpy. Pass ``ACCURATE_EXP``."""
    if ACCURATE:
        return libdevice.exp(x)
    return tl.exp(x)


def triton_runs(device: torch.device) -> bool:
    return HAS_TRITON and (device.type == "cuda" or (INTERPRET and device.type == "cpu"))


__all__ = ["ACCURATE_EXP", "HAS_TRITON", "INTERPRET", "libdevice", "tl", "torch_exp", "triton", "triton_runs"]
