"""Backends: one per bundle format, each wrapping that format's own runtime.

A backend module registers its class under the format name with
:func:`register_backend`; :func:`open_backend` imports the module for a format
only when a bundle of that format is opened, so a device installs only the
runtime it uses.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from edgelm.bundle import Manifest
from edgelm.errors import FormatError


class Backend(Protocol):
    """What the engine needs from a format runtime. Logits are float32 ``[vocab]``.

    A backend that can be a speculative-decoding target also has ``max_verify`` (>= 2) and
    ``verify(tokens, start_pos) -> float32 [len(tokens), vocab]``: every position's logits.
    """

    max_prefill: int
    min_prefill: int

    def prefill(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        """Run ``tokens`` (int64, 1-D, ``min_prefill <= len <= max_prefill``) from ``start_pos``;
        return the logits of the last one."""

    def decode(self, token: int, pos: int) -> np.ndarray:
        """Run one token at position ``pos``; return its logits."""


BackendFactory = Callable[[Path, Manifest, "int | None"], Backend]
_REGISTRY: dict[str, BackendFactory] = {}
_MODULES = {"pte": "executorch", "onnx": "onnxruntime", "tflite": "litert"}


def register_backend(fmt: str) -> Callable[[BackendFactory], BackendFactory]:
    """Decorator registering a backend class (or factory) for bundle format ``fmt``."""

    def deco(factory: BackendFactory) -> BackendFactory:
        _REGISTRY[fmt] = factory
        return factory

    return deco


def open_backend(root: Path, manifest: Manifest, threads: int | None = None) -> Backend:
    """Instantiate the backend for ``manifest.format``."""
    fmt = manifest.format
    if fmt not in _MODULES:
        raise FormatError(f"bundle format {fmt!r} is unknown to this edgelm; known: {', '.join(_MODULES)}")
    if fmt not in _REGISTRY:
        importlib.import_module(f"{__name__}.{_MODULES[fmt]}")
    return _REGISTRY[fmt](root, manifest, threads)


def default_threads() -> int:
    """Threads to use when nobody said: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def quiet_native_stderr(enabled: bool = True) -> Iterator[None]:
    """Silence what native runtimes print straight to fd 2 (cpuinfo probes, threadpool notes).

    Python-level errors still propagate as exceptions; pass ``enabled=False`` (``-v``) to see
    the native output.
    """
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
