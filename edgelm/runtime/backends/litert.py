"""LiteRT backend: runs the ``.tflite`` of a ``tflite`` bundle with the LiteRT interpreter.

The file has a ``decode`` signature and fixed-length ``prefill_<P>`` signatures (see
``edgelm.converters.lowering.tflite``). Each takes the whole KV cache as inputs and
returns the logits and the K/V rows of its new positions; this backend keeps the
cache and writes those rows into it. A prompt chunk runs through the smallest prefill
signature that holds it, padded on the right; ``last_index`` picks its last real
token's logits.

Two ways to feed the interpreter (``EDGELM_LITERT_IO`` or ``io_mode=`` picks one):

* ``tensors`` (default): the cache lives in the interpreter's own input tensors,
  reached as numpy views. ``decode``'s cache inputs are the cache; a step writes the
  token, the position and the new rows, nothing else. A prefill signature's own cache
  inputs are brought up to date lazily, copying only the rows it has not seen.
* ``runner``: the public signature runner. It resizes and copies every input and
  output on each call, i.e. the whole cache per token; kept for measurement and as
  the fallback for interpreters without per-subgraph tensor views.

Prefill subgraphs are allocated on first use, so an unused signature costs no activation
memory. Its weights are another matter: the XNNPACK delegate is applied to every subgraph at
the first allocation and packs the weights once per subgraph. Measured on SmolLM2-135M with
three signatures (anonymous memory after load): fp32 1.58 GB (about 3 x 530 MB), ``w8a8``
0.44 GB, ``w4a8`` 0.30 GB, ``w8`` 3.1 GB (weight-only int8 is dequantized to float and then
packed, per subgraph). The Python ``Interpreter`` has no way to share packed weights
(``experimental_default_delegate_latest_features`` changes nothing; no XNNPACK weight-cache
option, no loadable XNNPACK delegate plugin). LiteRT's ``CompiledModel`` has one
(``CpuOptions(xnnpack_weight_cache_path=":memory:")``: fp32 about 0.7 GB), but its Python
``TensorBuffer`` binds host memory only to rank-1 inputs, so the cache would be copied on
every call; flattening the cache inputs instead costs a copy inside the graph. Quantized
schemes are the way to a small footprint here; without XNNPACK (builtin kernels) fp32 needs
no packed copies but decodes about 3x slower.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from edgelm.bundle import MANIFEST, Manifest
from edgelm.errors import BackendUnavailableError, BundleError, ContextOverflowError
from edgelm.runtime.backends import default_threads, quiet_native_stderr, register_backend

log = logging.getLogger(__name__)

IO_MODES = ("tensors", "runner")
IO_ENV = "EDGELM_LITERT_IO"
_TFLITE_MAGIC = b"TFL3"


def interpreter_class():
    """LiteRT's ``Interpreter`` (``ai-edge-litert``), else the legacy ``tflite-runtime`` one."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as first:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise BackendUnavailableError(
                f"this bundle is a LiteRT (.tflite) bundle and no LiteRT runtime is installed ({first}); "
                "install it with: pip install 'edgelm[tflite]'"
            ) from first
    return Interpreter


class _Names:
    """Tensor names of the signatures, from the manifest's ``io.names``."""

    def __init__(self, names: dict[str, str], n_layers: int) -> None:
        self.tokens, self.pos, self.last, self.logits = (names["tokens"], names["input_pos"], names["last_index"],
                                                         names["logits"])
        self.k = [names["k_cache"].format(layer=i) for i in range(n_layers)]
        self.v = [names["v_cache"].format(layer=i) for i in range(n_layers)]
        self.k_new = [names["k_new"].format(layer=i) for i in range(n_layers)]
        self.v_new = [names["v_new"].format(layer=i) for i in range(n_layers)]

    def inputs(self, length: int) -> set[str]:
        return {self.tokens, self.pos, *self.k, *self.v} | ({self.last} if length > 1 else set())

    def outputs(self) -> set[str]:
        return {self.logits, *self.k_new, *self.v_new}


class _TensorSignature:
    """One signature's inputs and outputs as numpy views into the interpreter's tensors."""

    def __init__(self, interpreter, name: str, length: int, names: _Names) -> None:
        self.name, self.length, self.names = name, length, names
        self._it, self._w = interpreter, interpreter._interpreter
        self._sg = self._w.GetSubgraphIndexFromSignature(name)
        defs = interpreter._get_full_signature_list()[name]
        self._in, self._out = defs["inputs"], defs["outputs"]
        self.ready = False
        self.valid = 0  # cache rows [0, valid) of this signature's inputs match the backend's cache

    def allocate(self) -> None:
        self._w.AllocateTensors(self._sg)

        def view(index: int) -> np.ndarray:
            # Views stay valid: nothing resizes or reallocates these tensors after this point,
            # and Invoke(subgraph) runs without the public API's no-live-views check.
            return self._w.tensor(self._it, index, self._sg)

        n = self.names
        self.tokens, self.pos = view(self._in[n.tokens]), view(self._in[n.pos])
        self.last = view(self._in[n.last]) if self.length > 1 else None
        self.k, self.v = [view(self._in[x]) for x in n.k], [view(self._in[x]) for x in n.v]
        self.logits = view(self._out[n.logits])
        self.k_new, self.v_new = [view(self._out[x]) for x in n.k_new], [view(self._out[x]) for x in n.v_new]
        for a in (*self.k, *self.v):  # masked rows still enter the matmuls: keep them finite
            a.fill(0.0)
        self.tokens.fill(0)
        self.ready = True

    def invoke(self) -> None:
        self._w.Invoke(self._sg)


class _TensorIO:
    """Cache in the interpreter's tensors: ``decode``'s cache inputs are the cache."""

    def __init__(self, interpreter, decode: str, prefill: dict[int, str], names: _Names) -> None:
        self._decode = _TensorSignature(interpreter, decode, 1, names)
        self._decode.allocate()
        self._prefill = {n: _TensorSignature(interpreter, name, n, names) for n, name in prefill.items()}

    def prefill(self, length: int, tokens: np.ndarray, start: int) -> np.ndarray:
        sig, cache = self._prefill[length], self._decode
        if not sig.ready:
            with quiet_native_stderr(not log.isEnabledFor(logging.DEBUG)):
                sig.allocate()
        if sig.valid < start:  # rows written since this signature last ran
            for dst, src in zip((*sig.k, *sig.v), (*cache.k, *cache.v)):
                dst[:, :, sig.valid:start] = src[:, :, sig.valid:start]
        n = len(tokens)
        sig.tokens[0, :n] = tokens
        sig.tokens[0, n:] = 0
        sig.pos[0] = start
        sig.last[0] = n - 1
        sig.invoke()
        end = start + n
        for i in range(len(cache.k)):
            k, v = sig.k_new[i][:, :, :n], sig.v_new[i][:, :, :n]
            cache.k[i][:, :, start:end] = k
            cache.v[i][:, :, start:end] = v
            sig.k[i][:, :, start:end] = k
            sig.v[i][:, :, start:end] = v
        for other in self._prefill.values():
            other.valid = min(other.valid, start)
        sig.valid = end
        return sig.logits.reshape(-1).copy()

    def decode(self, token: int, pos: int) -> np.ndarray:
        d = self._decode
        d.tokens[0, 0] = token
        d.pos[0] = pos
        d.invoke()
        for k, v, k_new, v_new in zip(d.k, d.v, d.k_new, d.v_new):
            k[:, :, pos] = k_new[:, :, 0]
            v[:, :, pos] = v_new[:, :, 0]
        for sig in self._prefill.values():
            if sig.valid > pos:
                sig.valid = pos
        return d.logits.reshape(-1).copy()


class _RunnerIO:
    """Cache in numpy arrays, fed through the signature runners (copies the cache per call)."""

    def __init__(self, interpreter, decode: str, prefill: dict[int, str], names: _Names, shapes) -> None:
        self.names = names
        self._k = [np.zeros(s, np.float32) for s in shapes]
        self._v = [np.zeros(s, np.float32) for s in shapes]
        self._caches = {**dict(zip(names.k, self._k)), **dict(zip(names.v, self._v))}
        interpreter.allocate_tensors()  # here, where native output is silenced, not on the first call
        self._decode = interpreter.get_signature_runner(decode)
        self._prefill = {n: interpreter.get_signature_runner(name) for n, name in prefill.items()}

    def _store(self, out: dict, start: int, n: int) -> np.ndarray:
        for i in range(len(self._k)):
            self._k[i][:, :, start:start + n] = out[self.names.k_new[i]][:, :, :n]
            self._v[i][:, :, start:start + n] = out[self.names.v_new[i]][:, :, :n]
        return out[self.names.logits].reshape(-1)

    def prefill(self, length: int, tokens: np.ndarray, start: int) -> np.ndarray:
        n = len(tokens)
        padded = np.zeros((1, length), np.int32)
        padded[0, :n] = tokens
        out = self._prefill[length](**{self.names.tokens: padded, self.names.pos: np.array([start], np.int32),
                                       self.names.last: np.array([n - 1], np.int32)}, **self._caches)
        return self._store(out, start, n)

    def decode(self, token: int, pos: int) -> np.ndarray:
        out = self._decode(**{self.names.tokens: np.array([[token]], np.int32),
                              self.names.pos: np.array([pos], np.int32)}, **self._caches)
        return self._store(out, pos, 1)


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise BundleError(f"{path} is missing; the bundle is incomplete, convert the model again")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[4:8] != _TFLITE_MAGIC:
        raise BundleError(f"{path} is not a TFLite/LiteRT model (no {_TFLITE_MAGIC.decode()} identifier); "
                          "the bundle is damaged, convert the model again")


@register_backend("tflite")
class LiteRTBackend:
    """Backend for ``format == "tflite"`` bundles."""

    def __init__(self, root: Path, manifest: Manifest, threads: int | None = None, io_mode: str | None = None) -> None:
        Interpreter = interpreter_class()
        quiet = not log.isEnabledFor(logging.DEBUG)
        self.threads = threads or default_threads()
        self.io_mode = io_mode or os.environ.get(IO_ENV) or "tensors"
        if self.io_mode not in IO_MODES:
            raise ValueError(f"io_mode must be one of {IO_MODES}, got {self.io_mode!r}")
        cfg = manifest.model
        self.max_context = manifest.max_context
        io = manifest.io
        try:
            decode = io["decode"]
            prefill = {int(n): name for n, name in io["prefill"].items()}
            names = _Names(io["names"], cfg.n_layers)
            self.min_prefill = int(io.get("min_prefill", 2))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BundleError(f"{root / MANIFEST}: its io section does not describe an edgelm LiteRT model "
                              f"({type(e).__name__}: {e}); convert the model again") from e
        if not prefill:
            raise BundleError(f"{root / MANIFEST}: no prefill signatures listed; convert the model again")
        self.prefill_lengths = sorted(prefill)
        self.max_prefill = self.prefill_lengths[-1]
        path = root / manifest.model_file
        _check_file(path)
        try:
            with quiet_native_stderr(quiet):
                interpreter = Interpreter(model_path=str(path), num_threads=self.threads)
        except (ValueError, RuntimeError) as e:
            raise BundleError(f"{path}: LiteRT cannot load this model ({e}); the bundle is damaged or was not "
                              "written by edgelm, convert the model again") from e
        shapes = [cfg.kv_cache_shape(i) for i in range(cfg.n_layers)]
        self._check_signatures(interpreter, path, decode, prefill, names, shapes)
        self._interpreter = interpreter
        with quiet_native_stderr(quiet):
            if self.io_mode == "tensors" and not self._has_subgraph_views(interpreter):
                log.info("this LiteRT interpreter has no per-subgraph tensor views; using signature runners")
                self.io_mode = "runner"
            if self.io_mode == "tensors":
                self._io = _TensorIO(interpreter, decode, prefill, names)
            else:
                self._io = _RunnerIO(interpreter, decode, prefill, names, shapes)

    @staticmethod
    def _has_subgraph_views(interpreter) -> bool:
        w = getattr(interpreter, "_interpreter", None)
        return all(hasattr(w, a) for a in ("tensor", "Invoke", "AllocateTensors", "GetSubgraphIndexFromSignature"))

    @staticmethod
    def _check_signatures(interpreter, path: Path, decode: str, prefill: dict[int, str], names: _Names,
                          shapes) -> None:
        sigs = interpreter.get_signature_list()
        for name, length in ((decode, 1), *((v, k) for k, v in prefill.items())):
            if name not in sigs:
                raise BundleError(f"{path}: the model has no {name!r} signature (it has: {', '.join(sigs) or 'none'}); "
                                  "the manifest and model file do not belong together, convert the model again")
            have = set(sigs[name]["inputs"]) | set(sigs[name]["outputs"])
            missing = (names.inputs(length) | names.outputs()) - have
            if missing:
                raise BundleError(f"{path}: signature {name!r} lacks {', '.join(sorted(missing)[:4])}; "
                                  "convert the model again")
        details = interpreter.get_signature_runner(decode).get_input_details()
        for i, shape in enumerate(shapes):
            got = tuple(int(x) for x in details[names.k[i]]["shape"])
            if got != tuple(shape):
                raise BundleError(f"{path}: layer {i} KV cache is {list(got)} in the model but {list(shape)} in the "
                                  "manifest; convert the model again")

    def prefill(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        n = len(tokens)
        if not self.min_prefill <= n <= self.max_prefill:
            raise ValueError(f"prefill takes {self.min_prefill}..{self.max_prefill} tokens, got {n}")
        if start_pos < 0 or start_pos + n > self.max_context:
            raise ContextOverflowError(f"tokens {start_pos}..{start_pos + n - 1} do not fit the context window of "
                                       f"{self.max_context}")
        length = next(x for x in self.prefill_lengths if x >= n)
        return self._io.prefill(length, np.asarray(tokens, dtype=np.int32), start_pos)

    def decode(self, token: int, pos: int) -> np.ndarray:
        if not 0 <= pos < self.max_context:
            raise ContextOverflowError(f"position {pos} is outside the context window of {self.max_context}")
        return self._io.decode(token, pos)
