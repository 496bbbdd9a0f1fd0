"""ONNX Runtime backend: runs ``model.onnx`` (see ``edgelm.converters.lowering.onnx``) on the CPU.

The backend owns the KV cache: one preallocated float32 buffer per layer and K/V,
``[1, kv_heads, max_context, head_dim]``, bound to ``past_key_values.{i}.*`` once with
I/O binding (ONNX Runtime reads it in place, no copy). The graph returns only the new
rows (``present.{i}.*``, ``[1, kv_heads, S, head_dim]``), which land in small
preallocated output buffers and are written into the cache at ``[start_pos:start_pos+S]``.
A decode step thus moves one token id, one position, one K/V row per layer and the
logits; never the whole cache. An int8 cache (``--kv-cache int8``) is the same with more
tensors per layer: int8 codes for K and V, and for each a float32 scale per row
(``past_key_values.{i}.key_scale``, ``[1, kv_heads, max_context, 1]``); the graph
quantizes the new rows.

The graph's ``logits_to_keep`` input names the positions whose logits come back: the last
one in prefill and decode, all of them in :meth:`verify` (a speculative-decoding check of
several tokens in one call). Bundles written before that input existed return the last
position only and cannot be a speculative target.

Quantized bundles run the same way; a scheme that needs ONNX Runtime session settings
names them in the manifest's ``io.session_config`` (w8 keeps its activations float with
``session.disable_quant_qdq``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgelm.bundle import Manifest
from edgelm.errors import BackendUnavailableError, BundleError
from edgelm.runtime.backends import default_threads, quiet_native_stderr, register_backend

log = logging.getLogger(__name__)

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}
_PAST = "past_key_values."

# A session's intra-op threads spin for a while after each run, waiting for more work. Two sessions
# taking turns (a speculative target and its draft) then fight over the cores: on 2 cores, 5 steps of
# SmolLM2's w8a8 draft and one 6-token check of the fp32 target took 124 ms, against 74 ms for the two
# timed apart. Spinning that stops when a run returns gives 77 ms, and a lone session decodes as fast
# as before (fp32 47.3 / 47.5 against 47.7 / 46.9 tok/s; w8a8 106.7 / 105.5 against 106.0 / 107.1).
# A process-wide thread pool would do the same, but once it exists ONNX Runtime refuses every session
# in the process that does not use it, the app's own included.
_SESSION_CONFIG = {"session.force_spinning_stop": "1"}


def _import_ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailableError(
            f"this bundle is an ONNX bundle and onnxruntime is not installed ({e}); "
            "install it with: pip install 'edgelm[onnx]'"
        ) from e
    return onnxruntime


@register_backend("onnx")
class OnnxRuntimeBackend:
    """Backend for ``format == "onnx"`` bundles."""

    def __init__(self, root: Path, manifest: Manifest, threads: int | None = None) -> None:
        ort = _import_ort()
        self.threads = threads or default_threads()
        io = manifest.io
        self.max_prefill = int(io.get("max_prefill", 1))
        self.min_prefill = int(io.get("min_prefill", 1))
        model = root / manifest.model_file
        if io.get("data_file") and not (root / io["data_file"]).is_file():
            raise BundleError(f"{root / io['data_file']}: the model's weight file is missing; copy the whole bundle")
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 0 if log.isEnabledFor(logging.DEBUG) else 3
        for key, value in {**_SESSION_CONFIG, **(io.get("session_config") or {})}.items():  # + the scheme's (w8)
            so.add_session_config_entry(str(key), str(value))
        try:
            with quiet_native_stderr(not log.isEnabledFor(logging.DEBUG)):
                self.session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own pybind types (InvalidProtobuf, Fail, NoSuchFile...)
            raise BundleError(f"{model}: ONNX Runtime cannot load this model ({type(e).__name__}: {e}); "
                              "is it really an .onnx written by edgelm? convert the model again") from e
        self._setup(model, io)

    # -- setup ---------------------------------------------------------------------
    def _setup(self, model: Path, io: dict) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        # every cache tensor, in the graph's order: K and V per layer, and with an int8 cache each one's scales
        # (past_key_values.{i}.key_scale ...); each has a present.* twin holding its new rows
        past = [k for k in inputs if k.startswith(_PAST)]
        present = ["present." + k[len(_PAST):] for k in past]
        n = len([k for k in past if k.endswith(".key")])
        missing = [k for k in ("input_ids", "position_ids") if k not in inputs]
        missing += [f"{_PAST}{i}.{kv}" for i in range(n) for kv in ("key", "value") if f"{_PAST}{i}.{kv}" not in inputs]
        missing += [k for k in ("logits", *present) if k not in outputs]
        if n == 0:
            missing.append("past_key_values.{i}.key|value")
        if missing:
            raise BundleError(f"{model}: the graph does not have the inputs/outputs edgelm expects "
                              f"(missing {', '.join(missing[:5])}); is it an .onnx written by edgelm? "
                              "convert the model again")
        present_contains = io.get("kv_cache", {}).get("present_contains", "new_rows")
        if present_contains != "new_rows":
            raise BundleError(f"{model}: present holds {present_contains!r}; this edgelm reads 'new_rows' only")
        self.n_layers = n
        self._past_names, self._present_names = past, present
        self._keep = "logits_to_keep" in inputs
        self.max_verify = self.max_prefill if self._keep else 0
        self.caches: list[np.ndarray] = []
        for name in past:
            shape, dtype = inputs[name].shape, _DTYPES.get(inputs[name].type)
            if dtype is None or any(not isinstance(d, int) for d in shape):
                raise BundleError(f"{model}: {name} must be a static float or int8 tensor, got {inputs[name].type} "
                                  f"{shape}")
            self.caches.append(np.zeros(shape, dtype=dtype))
        self.max_context = self.caches[0].shape[2]
        vocab = outputs["logits"].shape[-1]
        if not isinstance(vocab, int):
            raise BundleError(f"{model}: logits must have a static vocab axis, got {outputs['logits'].shape}")

        # Decode: every buffer preallocated and bound once; a step writes two integers.
        self._tok = np.zeros((1, 1), dtype=np.int64)
        self._pos = np.zeros((1, 1), dtype=np.int64)
        self._vocab = vocab
        self._logits = np.zeros((1, 1, vocab) if self._keep else (1, vocab), dtype=np.float32)
        self._rows = [np.zeros((*c.shape[:2], 1, c.shape[3]), dtype=c.dtype) for c in self.caches]
        self._last = np.zeros(1, dtype=np.int64)  # logits_to_keep of a one-token step (kept alive: bound)
        self._decode_binding = self._binding(self._tok, self._pos, self._last, self._logits, self._rows)

    def _binding(self, tokens: np.ndarray, positions: np.ndarray, keep: np.ndarray, logits: np.ndarray,
                 rows: list[np.ndarray]):
        """An I/O binding of these arrays and the cache (ONNX Runtime reads and writes them in place)."""
        b = self.session.io_binding()
        self._bind_array(b, "input_ids", tokens, True)
        self._bind_array(b, "position_ids", positions, True)
        if self._keep:
            self._bind_array(b, "logits_to_keep", keep, True)
        for name, cache in zip(self._past_names, self.caches):
            self._bind_array(b, name, cache, True)
        self._bind_array(b, "logits", logits, False)
        for name, row in zip(self._present_names, rows):
            self._bind_array(b, name, row, False)
        return b

    @staticmethod
    def _bind_array(binding, name: str, arr: np.ndarray, is_input: bool) -> None:
        """Bind ``arr``'s memory (no copy); ONNX Runtime reads/writes it in place on every run."""
        assert arr.flags.c_contiguous
        bind = binding.bind_input if is_input else binding.bind_output
        bind(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)

    def _check_room(self, start_pos: int, n: int) -> None:
        if start_pos < 0 or start_pos + n > self.max_context:
            raise ValueError(f"positions {start_pos}..{start_pos + n - 1} do not fit max_context {self.max_context}")

    # -- steps -----------------------------------------------------------------------
    def _run(self, tokens: np.ndarray, start_pos: int, every: bool) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64).reshape(1, -1)
        s = tokens.shape[1]
        self._check_room(start_pos, s)
        positions = np.arange(start_pos, start_pos + s, dtype=np.int64).reshape(1, -1)
        keep = np.arange(s, dtype=np.int64) if every else np.asarray([s - 1], dtype=np.int64)
        logits = np.empty((1, len(keep), self._vocab) if self._keep else (1, self._vocab), dtype=np.float32)
        rows = [np.empty((*c.shape[:2], s, c.shape[3]), dtype=c.dtype) for c in self.caches]
        self.session.run_with_iobinding(self._binding(tokens, positions, keep, logits, rows))
        for cache, row in zip(self.caches, rows):
            cache[:, :, start_pos:start_pos + s] = row
        return logits.reshape(-1, self._vocab)

    def prefill(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        return self._run(tokens, start_pos, False).reshape(-1)

    def verify(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        """Run ``tokens`` (2 to ``max_verify``) from ``start_pos``; return every position's logits
        ``[len(tokens), vocab]``: the same graph as prefill and decode, with ``logits_to_keep`` all of them."""
        if not self.max_verify:
            raise BundleError("this .onnx returns the last position's logits only (it predates speculative "
                              "decoding); convert the model again to use it as a speculative target")
        return self._run(tokens, start_pos, True)

    def decode(self, token: int, pos: int) -> np.ndarray:
        self._check_room(pos, 1)
        self._tok[0, 0] = token
        self._pos[0, 0] = pos
        self.session.run_with_iobinding(self._decode_binding)
        for cache, row in zip(self.caches, self._rows):
            cache[:, :, pos:pos + 1] = row
        return self._logits.reshape(-1).copy()
