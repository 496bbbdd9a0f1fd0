"""The engine: loads a bundle, runs prefill and decode through its backend, streams text."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.bundle import Manifest, load_manifest
from edgelm.errors import ContextOverflowError
from edgelm.runtime.backends import Backend, open_backend
from edgelm.sampling import Sampler, SamplingConfig
from edgelm.tokenizer import Message, Tokenizer

OVERFLOW_POLICIES = ("error", "truncate")


@dataclass
class GenerationStats:
    """Timings of the last generation. Rates are tokens per second."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_backend_s: float = 0.0
    decode_steps: int = 0
    total_s: float = 0.0
    stop_reason: str = ""
    truncated_prompt_tokens: int = 0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        """Tokens per second of the decode steps (every token after the first)."""
        return self.decode_steps / self.decode_s if self.decode_steps and self.decode_s else 0.0

    @property
    def overhead_share(self) -> float:
        """Share of decode time spent outside the backend call (sampling, Python, detokenization)."""
        return 1.0 - self.decode_backend_s / self.decode_s if self.decode_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(prefill_tps=self.prefill_tps, decode_tps=self.decode_tps, overhead_share=self.overhead_share)
        return d


class Engine:
    """Streams tokens from a bundle.

    >>> engine = Engine.load("smollm2-pte")                       # doctest: +SKIP
    >>> for piece in engine.generate("What is the capital of France?", chat=True):  # doctest: +SKIP
    ...     print(piece, end="", flush=True)
    """

    def __init__(self, root: Path, manifest: Manifest, backend: Backend, tokenizer: Tokenizer) -> None:
        self.root, self.manifest, self.backend, self.tokenizer = root, manifest, backend, tokenizer
        self.max_context = manifest.max_context
        self.eos_ids = frozenset(manifest.special_tokens.get("eos_token_ids") or manifest.model.eos_token_ids)
        self.last_stats = GenerationStats()

    @classmethod
    def load(cls, bundle: str | Path, threads: int | None = None, verify: bool = True) -> Engine:
        """Open ``bundle`` (folder or .zip), check its checksums and start its backend."""
        root, manifest = load_manifest(bundle, verify=verify)
        tokenizer = Tokenizer(root / manifest.tokenizer_file, manifest.special_tokens, manifest.chat_template)
        backend = open_backend(root, manifest, threads)
        return cls(root, manifest, backend, tokenizer)

    # -- prompts -----------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[Message], chat: bool = False,
                      system: str | None = None) -> list[int]:
        """Token ids of ``prompt``: raw text, or a chat (a message list, or text with ``chat=True``)."""
        if isinstance(prompt, str) and not chat:
            return self.tokenizer.encode(prompt)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system is not None:
            messages = [{"role": "system", "content": system}, *messages]
        return self.tokenizer.encode_chat(messages)

    def _fit(self, ids: list[int], max_new_tokens: int, overflow: str, stats: GenerationStats) -> list[int]:
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}")
        if not ids:
            raise ContextOverflowError("the prompt is empty: give at least one token of text")
        room = self.max_context - max(1, min(max_new_tokens, self.max_context - 1))
        if len(ids) <= room:
            return ids
        if overflow == "truncate":
            stats.truncated_prompt_tokens = len(ids) - room
            return ids[-room:]
        if len(ids) >= self.max_context:
            raise ContextOverflowError(
                f"the prompt is {len(ids)} tokens but this bundle's context window is {self.max_context}; "
                "shorten the prompt, allow truncation (--truncate / overflow='truncate'), or convert with a "
                "larger --max-context"
            )
        return ids  # fits, but generation will stop when the window is full

    # -- generation --------------------------------------------------------------
    def _prefill(self, ids: list[int]) -> np.ndarray:
        b = self.backend
        arr = np.asarray(ids, dtype=np.int64)
        pos, logits = 0, None
        while pos < len(arr):
            chunk = arr[pos:pos + b.max_prefill]
            if len(chunk) < b.min_prefill:
                for i, tok in enumerate(chunk):
                    logits = b.decode(int(tok), pos + i)
            else:
                logits = b.prefill(chunk, pos)
            pos += len(chunk)
        return logits

    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int = 256,
                     sampling: SamplingConfig | None = None, overflow: str = "error",
                     ignore_eos: bool = False) -> Iterator[int]:
        """Yield generated token ids (EOS excluded). Stats land in :attr:`last_stats`.

        ``ignore_eos`` keeps going past EOS (benchmarks use it to time a fixed token count).
        """
        stats = GenerationStats()
        self.last_stats = stats
        t0 = time.perf_counter()
        ids = self._fit(list(prompt_ids), max_new_tokens, overflow, stats)
        stats.prompt_tokens = len(ids)
        sampler = Sampler(sampling)
        history = list(ids)
        logits = self._prefill(ids)
        t1 = time.perf_counter()
        stats.prefill_s = t1 - t0
        pos = len(ids)
        decode = self.backend.decode
        stats.stop_reason = "max_tokens"
        t_first = 0.0
        try:
            for i in range(max_new_tokens):
                tok = sampler(logits, history)
                now = time.perf_counter()
                if i == 0:
                    stats.ttft_s, t_first = now - t0, now
                else:
                    stats.decode_s = now - t_first
                if tok in self.eos_ids and not ignore_eos:
                    stats.stop_reason = "eos"
                    break
                history.append(tok)
                stats.generated_tokens = i + 1
                yield tok
                if i + 1 == max_new_tokens:
                    break
                if pos >= self.max_context:
                    stats.stop_reason = "context_full"
                    break
                b0 = time.perf_counter()
                logits = decode(tok, pos)
                stats.decode_backend_s += time.perf_counter() - b0
                stats.decode_steps += 1
                pos += 1
        finally:
            stats.total_s = time.perf_counter() - t0

    def generate(self, prompt: str | Sequence[Message], *, chat: bool = False, system: str | None = None,
                 max_new_tokens: int = 256, sampling: SamplingConfig | None = None,
                 stop: Sequence[str] = (), overflow: str = "error") -> Iterator[str]:
        """Stream the answer to ``prompt`` as text pieces.

        ``prompt`` is raw text, or a chat: a list of ``{"role", "content"}`` messages, or text
        with ``chat=True``. Generation ends at EOS, at any of the ``stop`` strings (not
        included in the output), after ``max_new_tokens``, or when the context is full.
        """
        ids = self.encode_prompt(prompt, chat=chat, system=system)
        detok = self.tokenizer.detokenizer()
        stops = [s for s in stop if s]
        hold = max((len(s) for s in stops), default=0)
        pending = ""
        gen = self.generate_ids(ids, max_new_tokens, sampling, overflow)
        for tok in gen:
            pending += detok.add(tok)
            if stops:
                hit = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
                if hit >= 0:
                    gen.close()
                    self.last_stats.stop_reason = "stop_string"
                    if pending[:hit]:
                        yield pending[:hit]
                    return
                # keep back what could still become the start of a stop string
                cut = max(0, len(pending) - hold + 1)
                if cut:
                    yield pending[:cut]
                    pending = pending[cut:]
            elif pending:
                yield pending
                pending = ""
        pending += detok.flush()
        if stops:
            hit = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
            if hit >= 0:
                self.last_stats.stop_reason = "stop_string"
                pending = pending[:hit]
        if pending:
            yield pending

    def complete(self, prompt: str | Sequence[Message], **kwargs: Any) -> str:
        """The whole answer as one string (``generate`` joined)."""
        return "".join(self.generate(prompt, **kwargs))
