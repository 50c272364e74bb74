"""Who may drive a set of runners now. A runner's caches (and the batched runners' rows, generators and histories)
hold the state of whoever drives it, so two users advanced alternately (two suspended ``stream()`` generators, a
``generate()`` while a stream is suspended, two speech engines) would silently corrupt each other's answers. A lease
turns that into a clear error.

The lease refers to its holder weakly: a holder that is garbage-collected without releasing it (an engine never
closed) frees it too. A generator holds it in a ``try``/``finally``, which its ``close()`` and its collection run.
"""
from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager


class RunnerBusyError(RuntimeError):
    """The runners are in use by another user (a stream, a batch or an engine not yet finished or closed)."""


class RunnerLease:
    def __init__(self, runners: str, advice: str):
        """``runners``: what the lease guards, ``advice``: what to do instead (both for the error)."""
        self.runners, self.advice = runners, advice
        self._holder: weakref.ref | None = None
        self._holder_name = ""

    @property
    def holder(self) -> object | None:
        return None if self._holder is None else self._holder()

    def check(self, holder: object | None = None) -> None:
        """A RunnerBusyError when someone other than ``holder`` holds the lease."""
        current = self.holder
        if current is not None and current is not holder:
            raise RunnerBusyError(f"the model's {self.runners} are in use by {self._holder_name}: {self.advice}")

    def take(self, holder: object, name: str) -> None:
        """``holder`` (``name`` says what it is, for the error) drives the runners from now on; a RunnerBusyError when
        another holds them. Taking it again is a no-op."""
        self.check(holder)
        self._holder, self._holder_name = weakref.ref(holder), name

    def release(self, holder: object) -> None:
        if self.holder is holder:
            self._holder = None

    @contextmanager
    def held(self, name: str) -> Iterator[None]:
        """The lease for the body of a ``with`` (a call, or a generator's life until it ends or is closed)."""
        holder = _Holder()
        self.take(holder, name)
        try:
            yield
        finally:
            self.release(holder)


class _Holder:
    """A weakly referable token for ``held``."""
