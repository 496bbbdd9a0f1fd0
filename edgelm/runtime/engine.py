"""The engine: loads a bundle, runs prefill and decode through its backend, streams text."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.bundle import Manifest, load_manifest
from edgelm.errors import BundleError, ContextOverflowError
from edgelm.runtime.backends import Backend, open_backend
from edgelm.runtime.chat import Chat
from edgelm.runtime.drafting import LookupDrafter, ModelDrafter
from edgelm.runtime.hugepages import TUNABLE, huge_pages_env
from edgelm.runtime.prefix import RecordedBackend, common_prefix
from edgelm.sampling import Sampler, SamplingConfig
from edgelm.tokenizer import Message, Tokenizer

log = logging.getLogger(__name__)

OVERFLOW_POLICIES = ("error", "truncate")
DEFAULT_DRAFT_TOKENS = 5
LOOKUP_NGRAM = 3  # prompt lookup's longest n-gram (``--lookup``)


@dataclass
class GenerationStats:
    """Timings of the last generation. Rates are tokens per second."""

    prompt_tokens: int = 0
    reused_tokens: int = 0  # leading prompt tokens whose KV-cache rows the last generation left
    generated_tokens: int = 0
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_backend_s: float = 0.0
    decode_steps: int = 0
    total_s: float = 0.0
    stop_reason: str = ""
    truncated_prompt_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def acceptance(self) -> float:
        """Share of the draft tokens the target kept (speculative decoding only)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def prefill_tps(self) -> float:
        """Prompt tokens run per second (reused ones are not run)."""
        return (self.prompt_tokens - self.reused_tokens) / self.prefill_s if self.prefill_s else 0.0

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
        d.update(prefill_tps=self.prefill_tps, decode_tps=self.decode_tps, overhead_share=self.overhead_share,
                 acceptance=self.acceptance)
        return d


class Engine:
    """Streams tokens from a bundle.

    >>> engine = Engine.load("smollm2-pte")                       # doctest: +SKIP
    >>> for piece in engine.generate("What is the capital of France?", chat=True):  # doctest: +SKIP
    ...     print(piece, end="", flush=True)

    The KV cache outlives a generation: a prompt that starts with tokens the cache already holds
    (the conversation so far, a fixed system prompt) runs only the tokens after them.
    :meth:`reset` forgets it.
    """

    def __init__(self, root: Path, manifest: Manifest, backend: Backend, tokenizer: Tokenizer) -> None:
        self.root, self.manifest, self.tokenizer = root, manifest, tokenizer
        self.backend = backend if isinstance(backend, RecordedBackend) else RecordedBackend(backend)
        self.max_context = manifest.max_context
        self.eos_ids = frozenset(manifest.special_tokens.get("eos_token_ids") or manifest.model.eos_token_ids)
        self.last_stats = GenerationStats()
        self.draft_tokens = 0
        self._drafter: ModelDrafter | LookupDrafter | None = None

    @classmethod
    def load(cls, bundle: str | Path, threads: int | None = None, verify: bool = True,
             draft: str | Path | Engine | None = None, draft_tokens: int = DEFAULT_DRAFT_TOKENS,
             lookup: int = 0) -> Engine:
        """Open ``bundle`` (folder or .zip), check its checksums and start its backend.

        ``draft``: a smaller bundle of the same model family (same tokenizer) that proposes
        tokens for speculative decoding; see :meth:`attach_draft`. ``lookup``: the longest n-gram
        of prompt-lookup decoding instead (no draft model); see :meth:`attach_lookup`.
        ``draft_tokens``: the most tokens proposed per pass, by either.
        """
        if draft is not None and lookup:
            raise ValueError("give a draft bundle or prompt lookup, not both")
        root, manifest = load_manifest(bundle, verify=verify)
        if huge_pages_env(os.environ) is not None:
            log.info("this process runs without huge pages for the weights: start it with GLIBC_TUNABLES=%s=1 "
                     "for 5-14%% faster decoding (the edgelm command does that itself)", TUNABLE)
        tokenizer = Tokenizer(root / manifest.tokenizer_file, manifest.special_tokens, manifest.chat_template)
        backend = open_backend(root, manifest, threads)
        engine = cls(root, manifest, backend, tokenizer)
        if draft is not None:
            if not isinstance(draft, Engine):
                draft = cls.load(draft, threads=threads, verify=verify)
            engine.attach_draft(draft, draft_tokens)
        elif lookup:
            engine.attach_lookup(lookup, draft_tokens)
        return engine

    def attach_draft(self, draft: Engine | None, draft_tokens: int = DEFAULT_DRAFT_TOKENS) -> None:
        """Decode speculatively with ``draft`` proposing up to ``draft_tokens`` tokens per step
        (``None`` detaches it).

        This bundle checks each proposal in one pass (its backend's ``verify``), so its weights are
        read once for several tokens: on a memory-bound device that is where the speed comes from.
        Greedy output is this bundle's own; sampled output keeps its distribution. Both bundles
        must share the tokenizer; this one must be a .pte or .onnx bundle converted by this edgelm
        version (one call checks several tokens: the .pte's ``decode`` takes up to 16, the .onnx
        graph returns every position's logits). The draft can be any format.
        """
        if draft is None:
            self._detach()
            return
        self._check_speculative(draft_tokens)
        tok_self = self.manifest.files.get(self.manifest.tokenizer_file, {}).get("sha256")
        tok_draft = draft.manifest.files.get(draft.manifest.tokenizer_file, {}).get("sha256")
        if tok_self != tok_draft or self.manifest.model.vocab_size != draft.manifest.model.vocab_size:
            raise BundleError(f"the draft {draft.root} has another tokenizer than {self.root}; a draft must be the "
                              "same model family (e.g. a w4a8 bundle of the same source)")
        if draft.max_context < self.max_context:
            raise BundleError(f"the draft's context window ({draft.max_context}) is shorter than this bundle's "
                              f"({self.max_context}); convert the draft with --max-context {self.max_context}")
        self.draft_tokens, self._drafter = draft_tokens, ModelDrafter(draft, self.eos_ids)

    def attach_lookup(self, max_ngram: int = LOOKUP_NGRAM, draft_tokens: int = DEFAULT_DRAFT_TOKENS) -> None:
        """Decode speculatively without a draft model (prompt-lookup decoding): the last
        ``max_ngram`` (down to 2) tokens are looked up in the prompt and the output so far, and
        up to ``draft_tokens`` tokens that followed them are checked in one pass. Greedy output
        is unchanged; it is faster where the answer repeats its context (summaries, extraction,
        editing a given text). ``max_ngram=0`` detaches it. Needs a .pte or .onnx bundle, as
        :meth:`attach_draft` does; a draft bundle attached before is detached.
        """
        if max_ngram == 0:
            self._detach()
            return
        self._check_speculative(draft_tokens)
        self.draft_tokens = draft_tokens
        self._drafter = LookupDrafter(max_ngram, min(2, max_ngram), self.manifest.model.vocab_size)

    @property
    def draft(self) -> Engine | None:
        """The attached draft bundle, if any (:meth:`attach_draft`)."""
        return self._drafter.draft if isinstance(self._drafter, ModelDrafter) else None

    @property
    def lookup(self) -> int:
        """Prompt lookup's longest n-gram (:meth:`attach_lookup`); 0 when it is off."""
        return self._drafter.max_ngram if isinstance(self._drafter, LookupDrafter) else 0

    @property
    def speculative(self) -> bool:
        """Whether tokens come from speculative decoding (a draft bundle or prompt lookup)."""
        return self._drafter is not None

    def warm(self, prompt_ids: Sequence[int]) -> int:
        """Run ``prompt_ids`` into the KV cache now (the draft bundle's too), so that a later prompt
        starting with them (a long system prompt, a document to ask about) runs only what follows:
        an app can do it at start-up, before the user types. Returns how many tokens ran."""
        ids = list(prompt_ids)[:self.max_context]
        start = common_prefix(self.backend.tokens, ids)
        if start < len(ids):
            self._prefill(ids, start)
        if self.draft is not None:
            self.draft.warm(ids)
        return len(ids) - start

    def reset(self) -> None:
        """Forget what the KV cache holds (the draft bundle's too): the next generation runs its
        whole prompt. Benchmarks call it to time a full prefill; output does not depend on it."""
        self.backend.forget()
        if self.draft is not None:
            self.draft.reset()

    def _detach(self) -> None:
        self.draft_tokens, self._drafter = 0, None

    def _check_speculative(self, draft_tokens: int) -> None:
        if draft_tokens < 1:
            raise ValueError("draft_tokens must be at least 1")
        if getattr(self.backend, "max_verify", 0) < 2:
            raise BundleError(
                f"{self.root}: this {self.manifest.format} bundle cannot check draft tokens (no verify method); "
                "speculative decoding needs a target .pte or .onnx bundle converted by this edgelm version")

    # -- prompts -----------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[Message], chat: bool = False,
                      system: str | None = None, template_vars: Mapping[str, Any] | None = None) -> list[int]:
        """Token ids of ``prompt``: raw text, or a chat (a message list, or text with ``chat=True``).
        ``template_vars`` go to the chat template (e.g. ``{"enable_thinking": False}`` for Qwen3)."""
        if isinstance(prompt, str) and not chat:
            return self.tokenizer.encode(prompt)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system is not None:
            messages = [{"role": "system", "content": system}, *messages]
        return self.tokenizer.encode_chat(messages, **(template_vars or {}))

    def prompt_room(self, max_new_tokens: int) -> int:
        """The longest prompt that leaves room for ``max_new_tokens`` (at least one) in the context."""
        return self.max_context - max(1, min(max_new_tokens, self.max_context - 1))

    def chat(self, system: str | None = None, template_vars: Mapping[str, Any] | None = None) -> Chat:
        """A conversation (:class:`~edgelm.runtime.chat.Chat`): each turn runs only its new tokens."""
        return Chat(self, system=system, template_vars=template_vars)

    def _fit(self, ids: list[int], max_new_tokens: int, overflow: str, stats: GenerationStats) -> list[int]:
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}")
        if not ids:
            raise ContextOverflowError("the prompt is empty: give at least one token of text")
        room = self.prompt_room(max_new_tokens)
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
    def _prefill(self, ids: list[int], start: int = 0) -> np.ndarray:
        """Run ``ids[start:]`` from position ``start`` (the cache holds ``ids[:start]``); the last logits."""
        b = self.backend
        arr = np.asarray(ids, dtype=np.int64)
        pos, logits = start, None
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

        With a draft attached (:meth:`attach_draft`, :meth:`attach_lookup`) the tokens come from
        speculative decoding: the same tokens under greedy decoding, the same distribution when
        sampling.
        ``ignore_eos`` keeps going past EOS (benchmarks use it to time a fixed token count).
        """
        stats = GenerationStats()
        self.last_stats = stats
        t0 = time.perf_counter()
        ids = self._fit(list(prompt_ids), max_new_tokens, overflow, stats)
        stats.prompt_tokens = len(ids)
        stats.reused_tokens = self.backend.reusable(ids)
        sampler = Sampler(sampling)
        history = list(ids)
        logits = self._prefill(ids, stats.reused_tokens)
        if self._drafter is not None:
            self._drafter.start(ids)
        stats.prefill_s = time.perf_counter() - t0
        if self._drafter is not None:
            source = self._speculative_tokens(logits, len(ids), sampler, history, stats)
        else:
            source = self._plain_tokens(logits, len(ids), sampler, history, stats)
        stats.stop_reason = "max_tokens"
        t_first = 0.0
        try:
            for i, tok in enumerate(source):
                now = time.perf_counter()
                if i == 0:
                    stats.ttft_s, t_first = now - t0, now
                else:
                    stats.decode_s, stats.decode_steps = now - t_first, i
                if tok in self.eos_ids and not ignore_eos:
                    stats.stop_reason = "eos"
                    break
                stats.generated_tokens = i + 1
                yield tok
                if i + 1 == max_new_tokens:
                    break
                if len(ids) + i >= self.max_context:  # this token's own position is past the window
                    stats.stop_reason = "context_full"
                    break
        finally:
            source.close()
            stats.total_s = time.perf_counter() - t0

    def _plain_tokens(self, logits: np.ndarray, pos: int, sampler: Sampler, history: list[int],
                      stats: GenerationStats) -> Iterator[int]:
        """One token per decode step; the step runs only when the consumer asks for the next token."""
        decode = self.backend.decode
        while True:
            tok = sampler(logits, history)
            history.append(tok)
            yield tok
            b0 = time.perf_counter()
            logits = decode(tok, pos)
            stats.decode_backend_s += time.perf_counter() - b0
            pos += 1

    def _speculative_tokens(self, logits: np.ndarray, pos: int, sampler: Sampler, history: list[int],
                            stats: GenerationStats) -> Iterator[int]:
        """Speculative decoding: the drafter proposes up to ``draft_tokens`` tokens, the target
        checks them all in one ``verify`` pass and keeps the longest agreeing run plus one token
        of its own. Rejected rows stay in the KV caches past the live position; attention never
        reaches them and the next pass overwrites them.
        """
        assert self._drafter is not None
        target, drafter = self.backend, self._drafter
        k_max = min(self.draft_tokens, target.max_verify - 1)
        tok = sampler(logits, history)
        history.append(tok)
        yield tok
        while True:
            k = min(k_max, self.max_context - 1 - pos)  # verify writes positions pos .. pos + k
            b0 = time.perf_counter()
            drafts, qs = drafter.propose(tok, pos, k, history, sampler) if k >= 1 else ([], [])
            if not drafts:  # nothing to check (no room left, or no n-gram recurs): one plain step
                logits = target.decode(tok, pos)
                stats.decode_backend_s += time.perf_counter() - b0
                tok = sampler(logits, history)
                history.append(tok)
                pos += 1
                yield tok
                continue
            rows = target.verify(np.asarray([tok, *drafts], dtype=np.int64), pos)
            stats.decode_backend_s += time.perf_counter() - b0
            accepted: list[int] = []
            final = None
            for j, x in enumerate(drafts):
                if sampler.greedy:
                    choice = sampler(rows[j], chain(history, accepted))
                    ok = choice == x
                else:
                    ok, choice = sampler.accept_draft(sampler.probs(rows[j], chain(history, accepted)), qs[j], x)
                if not ok:
                    final = choice
                    break
                accepted.append(x)
            if final is None:  # every draft token accepted: the target's next token comes free
                final = sampler(rows[len(drafts)], chain(history, accepted))
            stats.draft_tokens += len(drafts)
            stats.accepted_tokens += len(accepted)
            drafter.settle(drafts, len(accepted))
            pos += len(accepted) + 1
            tok = final
            for x in (*accepted, final):
                history.append(x)
                yield x

    def generate(self, prompt: str | Sequence[Message], *, chat: bool = False, system: str | None = None,
                 max_new_tokens: int = 256, sampling: SamplingConfig | None = None,
                 stop: Sequence[str] = (), overflow: str = "error",
                 template_vars: Mapping[str, Any] | None = None) -> Iterator[str]:
        """Stream the answer to ``prompt`` as text pieces.

        ``prompt`` is raw text, or a chat: a list of ``{"role", "content"}`` messages, or text
        with ``chat=True`` (``template_vars``: extra chat-template variables). Generation ends
        at EOS, at any of the ``stop`` strings (not included in the output), after
        ``max_new_tokens``, or when the context is full.
        """
        ids = self.encode_prompt(prompt, chat=chat, system=system, template_vars=template_vars)
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
