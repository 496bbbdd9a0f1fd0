"""ExecuTorch backend: runs the ``.pte`` (+ ``.ptd`` weights) with the ExecuTorch runtime.

The KV cache lives in the program's shared mutable buffers, so a decode step moves
only one token id, one position and the logits across the Python boundary.
"""

from __future__ import annotations

import logging
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


@register_backend("pte")
class ExecuTorchBackend:
    """Backend for ``format == "pte"`` bundles."""

    def __init__(self, root: Path, manifest: Manifest, threads: int | None = None) -> None:
        quiet = not log.isEnabledFor(logging.DEBUG)
        try:
            with quiet_native_stderr(quiet):
                import torch
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

    def _run(self, method, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        t = self._torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64).reshape(1, -1))
        self._pos[0] = start_pos
        return method.execute([t, self._pos])[0].numpy()

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
        self._pos[0] = pos
        return self._decode.execute([self._tok, self._pos])[0].numpy().reshape(-1)
