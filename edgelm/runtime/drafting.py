"""Where speculative decoding's draft tokens come from: a draft bundle, or the text itself.

The engine asks a drafter for up to ``k`` tokens that follow the live token, checks them
all in one pass of the target bundle, and tells the drafter how many it kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np

from edgelm.sampling import Sampler

if TYPE_CHECKING:
    from edgelm.runtime.engine import Engine

#: the length of prompt lookup's first proposal in a generation (see :class:`LookupDrafter`)
FIRST_LOOKUP_LENGTH = 2


class ModelDrafter:
    """A smaller bundle of the same model proposes tokens one decode step at a time.

    Its KV cache follows the target's: rejected rows lie past the live position, where attention
    never reaches them and the next step overwrites them.
    """

    def __init__(self, draft: Engine, eos_ids: frozenset[int]) -> None:
        self.draft, self.eos_ids = draft, eos_ids
        self.behind: int | None = None  # a token the draft has not run yet, at pos - 1

    def start(self, prompt_ids: Sequence[int]) -> None:
        ids = list(prompt_ids)
        self.draft._prefill(ids, self.draft.backend.reusable(ids))
        self.behind = None

    def propose(self, tok: int, pos: int, k: int, history: Sequence[int],
                sampler: Sampler) -> tuple[list[int], list[np.ndarray]]:
        """Up to ``k`` tokens after ``tok`` (at ``pos``), and the distribution each was drawn from
        (empty under greedy decoding)."""
        backend = self.draft.backend
        if self.behind is not None:
            backend.decode(self.behind, pos - 1)
        drafts: list[int] = []
        qs: list[np.ndarray] = []
        cur = tok
        for j in range(k):
            logits = backend.decode(cur, pos + j)
            if sampler.greedy:
                cur = sampler(logits, chain(history, drafts))
            else:
                qs.append(sampler.probs(logits, chain(history, drafts)))
                cur = sampler.draw(qs[-1])
            drafts.append(cur)
            if cur in self.eos_ids:
                break
        return drafts, qs

    def settle(self, drafts: Sequence[int], accepted: int) -> None:
        """After a fully accepted run the draft has not seen its own last token yet."""
        self.behind = drafts[-1] if drafts and accepted == len(drafts) else None


class LookupDrafter:
    """Prompt-lookup decoding: no draft model. The last ``n`` tokens (``max_ngram`` down to
    ``min_ngram``) are looked up earlier in the prompt and the output; the tokens that followed
    their latest occurrence are the proposal.

    It pays where the answer repeats its context (summaries, extraction, edits of a given
    text, code) and costs little where it does not: with no recurring n-gram the step is a plain
    decode, and proposals start short (``FIRST_LOOKUP_LENGTH``) and adapt as in ``transformers``'
    assisted generation (two more after a fully accepted run, one fewer after a rejection), so
    wrong guesses stay cheap. What a verify pass of n tokens costs SmolLM2's .pte, in decode steps
    (fp32 / w8a8): n=2 1.27 / 1.39, n=5 1.39 / 1.54, n=7 1.46 / 2.36, n=8 1.98 / 2.43; hence the
    engine's default of at most 5 proposed tokens (n=6).
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2, vocab_size: int = 0) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.max_ngram, self.min_ngram, self.vocab_size = max_ngram, min_ngram, vocab_size
        self.length = FIRST_LOOKUP_LENGTH  # the next proposal's length, at most the engine's k
        self.k = 0
        self._reset()

    def _reset(self) -> None:
        # n -> {n-gram: where its latest occurrence with a token after it ends}; filled as the
        # history grows, so a lookup costs a few dict probes instead of a scan (a NumPy scan of
        # 100 tokens took 160 us a step, 2.5% of a w8a8 decode step)
        self._ends: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(self.min_ngram, self.max_ngram + 1)}
        self._indexed = 0  # history[:_indexed] is in _ends

    def start(self, prompt_ids: Sequence[int]) -> None:
        self.length = FIRST_LOOKUP_LENGTH
        self._reset()

    def lookup(self, history: Sequence[int], k: int) -> list[int]:
        """The up to ``k`` tokens that followed the latest earlier occurrence of the longest
        recurring suffix of ``history`` (``[]`` if none recurs). ``history`` must only grow
        between calls (until :meth:`start`)."""
        last = len(history) - 1  # n-grams ending before it have a continuation
        for end in range(self._indexed, last):
            for n, ends in self._ends.items():
                if end + 1 >= n:
                    ends[tuple(history[end + 1 - n:end + 1])] = end
        self._indexed = max(self._indexed, last)
        for n in range(min(self.max_ngram, last), self.min_ngram - 1, -1):
            end = self._ends[n].get(tuple(history[-n:]))
            if end is not None:
                return list(history[end + 1:end + 1 + k])
        return []

    def propose(self, tok: int, pos: int, k: int, history: Sequence[int],
                sampler: Sampler) -> tuple[list[int], list[np.ndarray]]:
        """``history`` ends with ``tok``. Under sampling each proposal is a sure choice (a one-hot
        draft distribution), so speculative sampling accepts it with the target's probability."""
        self.k = k
        drafts = self.lookup(history, min(k, self.length))
        if sampler.greedy or not drafts:
            return drafts, []
        qs = []
        for x in drafts:
            q = np.zeros(self.vocab_size, dtype=np.float32)
            q[x] = 1.0
            qs.append(q)
        return drafts, qs

    def settle(self, drafts: Sequence[int], accepted: int) -> None:
        self.length = min(self.k, self.length + 2) if accepted == len(drafts) else max(1, self.length - 1)
