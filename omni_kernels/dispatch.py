"""Backend selection for every op: the CUDA extension, its CPU twins, Triton, or the pure-torch reference.

Each op registers one implementation per backend together with a predicate saying on which devices it runs. A call
asks the registry for the implementation to use for its input's device:

* the backend forced for that op (``set_backend(name, op=...)``), else the one forced globally
  (``set_backend(name)`` or the environment variable ``OMNI_KERNELS_BACKEND=cuda|cpp|triton|torch``), when it
  implements the op on that device;
* otherwise the first of ``cuda``, ``cpp`` (the extension's C++ CPU twins), ``triton``, ``torch`` that does (on CPU,
  Triton runs in the interpreter, a test tool, so it is used there only when forced).

A kernel registered with ``opt_in=True`` is never chosen by that search: only forcing its backend (for its op or
globally, ``set_backend``/``use_backend``/the environment variable) selects it. Kernels that have not yet been
measured on a GPU against the current default are registered that way, so that a build does not make them the
default unseen. (The exception: a kernel that does the default's own arithmetic in fewer launches and passes over
memory, the same family of kernel, as ``omni::add_rms_norm`` does for the add and ``omni::rms_norm``,
``omni::silu_mul`` for torch's SiLU and multiply, and ``omni::moe_combine`` for the MoE block's sum, sigmoid,
multiply and add.)

The reference (``torch``) runs everywhere, so every op always has an implementation. Selection happens in Python
before the torch dispatcher, so ``torch.compile`` and CUDA-graph capture see only the chosen kernel.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

BACKENDS = ("cuda", "cpp", "triton", "torch")
ENV_VAR = "OMNI_KERNELS_BACKEND"


@dataclass(frozen=True, slots=True)
class Kernel:
    op: str
    backend: str
    fn: Callable
    runs_on: Callable[[torch.device], bool]
    opt_in: bool = False   # selected only when its backend is forced


def _check_backend(name: str | None) -> str | None:
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}: expected one of {', '.join(BACKENDS)}")
    return name


class KernelRegistry:
    def __init__(self, forced: str | None = None):
        self._kernels: dict[str, dict[str, Kernel]] = {}
        self._forced_global = _check_backend(forced)
        self._forced_per_op: dict[str, str] = {}
        self._selected: dict[tuple[str, torch.device], Kernel] = {}   # decided per (op, device); reset on changes

    def register(self, op: str, backend: str, runs_on: Callable[[torch.device], bool], *, opt_in: bool = False):
        """Decorator: ``fn`` implements ``op`` on ``backend`` for the devices where ``runs_on(device)`` holds;
        with ``opt_in`` it is used only when ``backend`` is forced."""
        _check_backend(backend)

        def decorate(fn: Callable) -> Callable:
            self._kernels.setdefault(op, {})[backend] = Kernel(op, backend, fn, runs_on, opt_in)
            self._selected.clear()
            return fn

        return decorate

    def set_backend(self, backend: str | None, op: str | None = None) -> None:
        """Force ``backend`` for ``op`` (or for every op when ``op`` is None); None removes the override."""
        _check_backend(backend)
        self._selected.clear()
        if op is None:
            self._forced_global = backend
        elif backend is None:
            self._forced_per_op.pop(op, None)
        else:
            self._forced_per_op[op] = backend

    def forced(self, op: str) -> str | None:
        return self._forced_per_op.get(op, self._forced_global)

    def select(self, op: str, device: torch.device) -> Kernel:
        key = (op, device)
        if key not in self._selected:   # every eager op call asks: keep the answer, not the search
            self._selected[key] = self._search(op, device)
        return self._selected[key]

    def _search(self, op: str, device: torch.device) -> Kernel:
        kernels = self._kernels[op]
        forced = self.forced(op)
        candidate = kernels.get(forced) if forced else None
        if candidate is not None and candidate.runs_on(device):
            return candidate
        for backend in BACKENDS:
            kernel = kernels.get(backend)
            # On CPU, Triton means the interpreter: a test tool used only when forced. Opt-in kernels: only forced.
            if kernel is None or kernel.opt_in:
                continue
            if kernel.runs_on(device) and not (backend == "triton" and device.type == "cpu"):
                return kernel
        raise RuntimeError(f"no implementation of {op} runs on {device}")  # unreachable: torch runs everywhere

    def ops(self) -> list[str]:
        return sorted(self._kernels)

    def backends(self, op: str) -> list[str]:
        return [b for b in BACKENDS if b in self._kernels[op]]


REGISTRY = KernelRegistry(forced=os.environ.get(ENV_VAR) or None)


def set_backend(backend: str | None, op: str | None = None) -> None:
    REGISTRY.set_backend(backend, op)


def selected_backend(op: str, device: torch.device | str) -> str:
    return REGISTRY.select(op, torch.device(device)).backend


@contextlib.contextmanager
def use_backend(backend: str | None, op: str | None = None) -> Iterator[None]:
    """Force a backend inside a ``with`` block (tests use it to run every backend)."""
    previous = REGISTRY._forced_global if op is None else REGISTRY._forced_per_op.get(op)
    REGISTRY.set_backend(backend, op)
    try:
        yield
    finally:
        REGISTRY.set_backend(previous, op)


def everywhere(device: torch.device) -> bool:
    return True
