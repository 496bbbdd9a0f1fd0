"""Lowerings: turn a canonical :class:`Decoder` into one format's model file.

Each format registers itself under its name (``pte``, ``onnx``, ``tflite``); the
pipeline looks it up here instead of branching on the format.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm.errors import FormatError

FORMATS = ("pte", "onnx", "tflite")
_MODULES = {"pte": "executorch", "onnx": "onnx", "tflite": "tflite"}


@dataclass
class LowerOptions:
    """Settings every lowering understands."""

    max_prefill: int = 512
    prefill_lengths: tuple[int, ...] = ()
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Lowered:
    """What a lowering produced: the file and the facts the manifest and runtime need."""

    path: Path
    io: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)


LowerFn = Callable[[Any, Path, LowerOptions], Lowered]
_REGISTRY: dict[str, tuple[str, LowerFn]] = {}


def register_lowering(fmt: str, extension: str) -> Callable[[LowerFn], LowerFn]:
    """Decorator: register ``fn(model, out_path, options) -> Lowered`` for ``fmt``."""

    def deco(fn: LowerFn) -> LowerFn:
        _REGISTRY[fmt] = (extension, fn)
        return fn

    return deco


def get_lowering(fmt: str) -> tuple[str, LowerFn]:
    """(file extension, lowering function) for ``fmt``; a clear error for unknown formats."""
    if fmt not in FORMATS:
        raise FormatError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt not in _REGISTRY:
        try:
            importlib.import_module(f"{__name__}.{_MODULES[fmt]}")
        except ModuleNotFoundError as e:
            raise FormatError(f"the {fmt} lowering is not available: {e}") from e
    if fmt not in _REGISTRY:
        raise FormatError(f"the {fmt} lowering is not implemented yet")
    return _REGISTRY[fmt]
