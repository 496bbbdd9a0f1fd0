"""ExecuTorch backend: runs the ``.pte`` (+ ``.ptd`` weights) with the ExecuTorch runtime.

The KV cache lives in the program's shared mutable buffers, so a decode step moves
only one token id, one position and the logits across the Python boundary.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import weakref
from pathlib import Path

import numpy as np

from edgelm.bundle import Manifest
from edgelm.errors import BackendUnavailableError, BundleError
from edgelm.runtime.backends import default_threads, quiet_native_stderr, register_backend

log = logging.getLogger(__name__)


# Live backends: ExecuTorch's thread pool is one per process, and XNNPACK runtimes keep using
# the pool they were created with, so resizing it under a loaded program crashes that program.
_LIVE: weakref.WeakSet = weakref.WeakSet()


def _use_threadpool(portable_lib, threads: int) -> int:
    """Size the process-wide thread pool to ``threads`` if no loaded program uses it; return the size used."""
    current = portable_lib._threadpool_get_thread_count()
    if current == threads:
        return threads
    if len(_LIVE):
        log.warning("ExecuTorch's thread pool is shared by the whole process and a loaded program uses it: "
                    "keeping %d threads instead of %d", current, threads)
        return current
    portable_lib._unsafe_reset_threadpool(threads)
    return threads


# XNNPACK's packed-weight cache. Without it every method of a program (prefill, decode) packs its own
# copy of the weights: for SmolLM2 at fp32 two packed copies of 540 MB beside the mapped file. With it
# the methods share one. The cache is a backend option of the runtime, and ExecuTorch's Python bindings
# expose no way to set backend options; this calls the C++ entry point ``executorch::runtime::set_option``
# from libexecutorch.so through ctypes, after checking the struct layout with ``get_option``.
#
# The cache keys a packed weight by its constant's name, which ExecuTorch's serializer makes the sha256
# of the unpacked bytes: for a float weight that is the whole content. A quantized weight's scales are
# separate constants outside that name, so two programs in one process with the same int8 codes but
# different scales (a layer whose rows differ by a power of two does it) would share one packed copy,
# and one of them would compute with the other's scales; tests/test_weight_cache.py builds that case.
# edgelm's pte lowering names quantized weights by their bytes and quantization together and records
# ``io.weight_keys == WEIGHT_KEYS``; quantized programs without that mark load with the option off.
# ``EDGELM_XNNPACK_WEIGHT_CACHE=0`` keeps it off for every program.
_SET_OPTION = "_ZN10executorch7runtime10set_optionEPKcNS0_4SpanINS0_13BackendOptionEEE"
_GET_OPTION = "_ZN10executorch7runtime10get_optionEPKcNS0_4SpanINS0_13BackendOptionEEE"
_OPTIONS_LIB: ctypes.CDLL | bool | None = None  # None: not probed yet; False: no usable set_option here
_LOAD_LOCK = threading.Lock()  # the option is process-wide: set it and load under one lock


class _BackendOption(ctypes.Structure):
    # runtime/backend/options.h: char key[64]; std::variant<bool, int, std::array<char, 256>> value
    # (storage aligned like int, then the alternative's index)
    _fields_ = [("key", ctypes.c_char * 64), ("value", ctypes.c_int32 * 64), ("index", ctypes.c_uint8)]


class _OptionSpan(ctypes.Structure):
    _fields_ = [("data", ctypes.POINTER(_BackendOption)), ("size", ctypes.c_size_t)]


def _weight_cache_option(lib: ctypes.CDLL, value: bool | None) -> bool | None:
    """Read (``value`` None) or set XNNPACK's ``weight_cache_enabled``; the value read, or None on any mismatch."""
    # The option lives at the start of a larger zeroed buffer: should a build's BackendOption be bigger
    # than this layout, the runtime's writes still land in memory owned here, and the check below fails.
    buf = (ctypes.c_uint8 * 4096)()
    opt = _BackendOption.from_buffer(buf)
    opt.key, opt.index = b"weight_cache_enabled", 0
    opt.value[0] = int(bool(value))
    fn = getattr(lib, _GET_OPTION if value is None else _SET_OPTION)
    fn.restype = ctypes.c_uint32
    fn.argtypes = [ctypes.c_char_p, _OptionSpan]
    if fn(b"XnnpackBackend", _OptionSpan(ctypes.pointer(opt), 1)) != 0 or opt.index != 0:
        return None
    return bool(opt.value[0] & 0xFF)


def _options_lib(portable_lib) -> ctypes.CDLL | None:
    global _OPTIONS_LIB
    if _OPTIONS_LIB is None:
        _OPTIONS_LIB = False
        lib_path = Path(portable_lib.__file__).resolve().parents[2] / "lib" / "libexecutorch.so"
        try:
            lib = ctypes.CDLL(str(lib_path))
            if _weight_cache_option(lib, None) is not None:  # the layout matches this build
                _OPTIONS_LIB = lib
        except (OSError, AttributeError) as e:  # no such library or symbol in this build
            log.debug("XNNPACK weight cache not available: %s", e)
    return _OPTIONS_LIB or None


WEIGHT_KEYS = "sha256(bytes+quantization)"


def cache_safe(manifest: Manifest) -> bool:
    """True if the bundle's XNNPACK weights are named by all they hold, so they can share the cache:
    written with quantization-covering names (``io.weight_keys``), or with no quantized weight at all."""
    if manifest.io.get("weight_keys") == WEIGHT_KEYS:
        return True
    # fp32 quantizes nothing: the embedding and LM-head choices apply to quantized schemes only
    return (manifest.io.get("quantization") or {}).get("scheme", manifest.scheme) == "fp32"


def use_weight_cache(portable_lib, on: bool) -> bool:
    """Set XNNPACK's shared packed-weight cache on or off for the programs loaded next; True if it is on."""
    on = on and os.environ.get("EDGELM_XNNPACK_WEIGHT_CACHE", "1").strip() != "0"
    lib = _options_lib(portable_lib)
    if lib is None or _weight_cache_option(lib, on) is None:
        return False
    state = bool(_weight_cache_option(lib, None))
    log.debug("XNNPACK weight cache %s", "on" if state else "off")
    return state


# ExecuTorch's attention kernels (``llama::custom_sdpa`` and the int8 cache's dequantizing path) multiply
# with the BLAS ``sgemm_`` that the pip wheels resolve to MKL inside libtorch_cpu, and MKL runs each call
# on its own OpenMP team. The kernels already split their work over ExecuTorch's thread pool, so with a
# pool of N threads every pool thread starts a team of N: N * N busy threads on N cores. Measured here
# (scripts/attention_threads.py, 30 SmolLM2-shaped layers at position 2000, 2 threads): 58 ms a decode
# step with MKL's default threads, 13 ms with one. Only the variable read when MKL starts works, and MKL
# starts when torch is imported (ExecuTorch's bindings import it), so this runs before that import.
BLAS_THREADS_VARS = ("MKL_NUM_THREADS", "OMP_NUM_THREADS")


def single_threaded_blas() -> bool:
    """Make MKL single-threaded for this process, before torch loads it; return whether it was set.

    Leaves it alone if the user set ``MKL_NUM_THREADS`` or ``OMP_NUM_THREADS``, or if torch is already
    imported (the setting would no longer take effect; a conversion process is one).
    """
    if "torch" in sys.modules or any(v in os.environ for v in BLAS_THREADS_VARS):
        return False
    os.environ["MKL_NUM_THREADS"] = "1"
    log.debug("MKL_NUM_THREADS=1: ExecuTorch's thread pool parallelizes the attention kernels")
    return True


@register_backend("pte")
class ExecuTorchBackend:
    """Backend for ``format == "pte"`` bundles."""

    def __init__(self, root: Path, manifest: Manifest, threads: int | None = None) -> None:
        quiet = not log.isEnabledFor(logging.DEBUG)
        single_threaded_blas()
        try:
            with quiet_native_stderr(quiet):
                import torch
                if manifest.io.get("attention", "custom") == "custom":  # "portable" bundles use no llama:: kernel
                    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  llama:: kernels
                from executorch.extension.pybindings import portable_lib
                from executorch.kernels import quantized  # noqa: F401  quantized embedding kernels
                from executorch.runtime import Runtime
        except ImportError as e:
            raise BackendUnavailableError(
                f"this bundle is an ExecuTorch (.pte) bundle and the ExecuTorch runtime is not installed ({e}); "
                "install it with: pip install 'edgelm[pte]'"
            ) from e
        self._torch = torch
        self.threads = threads or default_threads()
        io = manifest.io
        self.max_prefill = int(io.get("max_prefill", 1))
        self.min_prefill = int(io.get("min_prefill", 2))
        model = root / manifest.model_file
        data = root / io["data_file"] if io.get("data_file") else None
        try:
            with quiet_native_stderr(quiet):
                self.threads = _use_threadpool(portable_lib, self.threads)
                kwargs = {"data_path": str(data)} if data else {}
                with _LOAD_LOCK:  # XNNPACK packs the weights when a method loads
                    self.weight_cache = use_weight_cache(portable_lib, cache_safe(manifest))
                    program = Runtime.get().load_program(str(model), **kwargs)
                    self._prefill = program.load_method("prefill")
                    self._decode = program.load_method("decode")
        except (RuntimeError, ValueError, KeyError) as e:
            raise BundleError(f"{model}: ExecuTorch cannot load this program ({e}); is it really a .pte "
                              "written by edgelm? convert the model again") from e
        _LIVE.add(self)
        # decode takes 1 to max_verify tokens and returns every position's logits; in bundles written
        # before speculative decoding it takes exactly one token
        self.max_verify = int(io.get("max_verify", 0))
        # Reused input tensors: a decode step only writes two integers into them.
        self._tok = torch.zeros((1, 1), dtype=torch.long)
        self._pos = torch.zeros((1,), dtype=torch.long)
        # "length" (portable bundles): the second input is arange(start_pos + S), a slice of this one
        self._positions = None
        if io.get("position_input", "start") == "length":
            self._positions = torch.arange(manifest.max_context, dtype=torch.long)

    def _inputs(self, tokens, start_pos: int) -> list:
        if self._positions is not None:
            end = start_pos + tokens.shape[1]
            if end > len(self._positions):  # a shorter slice would silently move the tokens' positions
                raise BundleError(f"positions {start_pos}..{end - 1} are past the context window "
                                  f"({len(self._positions)})")
            return [tokens, self._positions[:end]]
        self._pos[0] = start_pos
        return [tokens, self._pos]

    def _run(self, method, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        t = self._torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64).reshape(1, -1))
        return method.execute(self._inputs(t, start_pos))[0].numpy()

    def prefill(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        return self._run(self._prefill, tokens, start_pos).reshape(-1)

    def verify(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        """Run ``tokens`` (2 to ``max_verify``) from ``start_pos``; return every position's logits
        ``[len(tokens), vocab]``. Same method as :meth:`decode`, so no second copy of the packed weights."""
        if not self.max_verify:
            raise BundleError("this .pte's decode method takes one token at a time (it predates speculative "
                              "decoding); convert the model again to use it as a speculative target")
        return self._run(self._decode, tokens, start_pos).reshape(len(tokens), -1)

    def decode(self, token: int, pos: int) -> np.ndarray:
        self._tok[0, 0] = token
        return self._decode.execute(self._inputs(self._tok, pos))[0].numpy().reshape(-1)
