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

from edgelm.config import INT8_KV_FORMATS
from edgelm.converters.quant import QuantSpec, check_scheme
from edgelm.errors import FormatError

FORMATS = ("pte", "onnx", "tflite")
_MODULES = {"pte": "executorch", "onnx": "onnx", "tflite": "tflite"}
# An int8 KV cache's rows, in the manifest (io.kv_cache_rows; edgelm inspect prints the word before the colon),
# and how attention reads symmetric ones (io.kv_cache_decode): converters.model.quantize_rows_symmetric's form
SYMMETRIC_ROWS = "symmetric: x = code * scale, code int8 in -127..127, an fp32 scale per position and head"
ASYMMETRIC_ROWS = ("asymmetric: x = (code - zero point) * scale, an fp32 scale and an int8 zero point per position "
                   "and head")
FOLDED_DECODE = "int8 codes, scales folded into the scores and probabilities"


@dataclass
class LowerOptions:
    """Settings every lowering understands."""

    max_prefill: int = 512
    prefill_lengths: tuple[int, ...] = ()
    threads: int | None = None
    quant: QuantSpec = field(default_factory=QuantSpec)
    calibration: list[list[int]] | None = None  # token windows, for calibrated (static) schemes
    kv_cache: str = "fp32"  # the KV cache's element type (edgelm.config.KV_CACHE_DTYPES)
    architecture: str | None = None  # the CPU the bundle is for (`uname -m`): its target's, else None (this one)
    attention: str = "custom"  # pte: ExecuTorch's llama:: kernels ("custom") or plain ATen ops ("portable")
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Lowered:
    """What a lowering produced: the file and the facts the manifest and runtime need."""

    path: Path
    io: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)


LowerFn = Callable[[Any, Path, LowerOptions], Lowered]
_REGISTRY: dict[str, tuple[str, LowerFn, tuple[str, ...]]] = {}
_KV_CACHES: dict[str, tuple[str, ...]] = {}


def register_lowering(fmt: str, extension: str, schemes: tuple[str, ...] = ("fp32",),
                      kv_caches: tuple[str, ...] = ("fp32",)) -> Callable[[LowerFn], LowerFn]:
    """Decorator: register ``fn(model, out_path, options) -> Lowered`` for ``fmt``, the
    quantization schemes it can do and the KV cache element types it can hold."""

    def deco(fn: LowerFn) -> LowerFn:
        _REGISTRY[fmt] = (extension, fn, tuple(schemes))
        _KV_CACHES[fmt] = tuple(kv_caches)
        return fn

    return deco


def supported_schemes(fmt: str) -> tuple[str, ...]:
    """The quantization schemes the ``fmt`` lowering can do."""
    get_lowering(fmt)
    return _REGISTRY[fmt][2]


def get_lowering(fmt: str, scheme: str | None = None, kv_cache: str | None = None) -> tuple[str, LowerFn]:
    """(file extension, lowering function) for ``fmt``; a clear error for an unknown format, or a
    scheme or KV cache type the format cannot do."""
    if fmt not in FORMATS:
        raise FormatError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt not in _REGISTRY:
        try:
            importlib.import_module(f"{__name__}.{_MODULES[fmt]}")
        except ModuleNotFoundError as e:
            raise FormatError(f"the {fmt} lowering is not available: {e}") from e
    if fmt not in _REGISTRY:
        raise FormatError(f"the {fmt} lowering is not implemented yet")
    ext, fn, schemes = _REGISTRY[fmt]
    if scheme is not None:
        check_scheme(fmt, scheme, schemes)
    if kv_cache is not None and kv_cache not in _KV_CACHES[fmt]:
        raise FormatError(f"the {fmt} format cannot hold an {kv_cache} KV cache (it keeps "
                          f"{' or '.join(_KV_CACHES[fmt])}); an int8 cache is built for "
                          f"{' and '.join(INT8_KV_FORMATS)}: use one of those formats, or --kv-cache fp32")
    return ext, fn
