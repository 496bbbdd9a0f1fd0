"""Prompt-prefix reuse: a record of what the backend's KV cache holds, so a new prompt that
starts like the last one (the next turn of a chat, a fixed system prompt, a regenerated
answer) runs only its new tokens.

Every backend keeps its KV cache between calls and writes the rows of the positions it runs;
attention at a position reads rows ``0..pos`` only. So rows ``0..n-1`` are reusable for a
prompt whose first ``n`` tokens are the tokens those rows were computed from, in that order.
:class:`RecordedBackend` keeps that list: a call that writes from ``start`` on drops what
the record says about rows ``start..`` (the rows a later position computed were computed from
earlier ones) and then appends the tokens it ran, once the call has returned. The record is
therefore never longer than the truth, even when a call fails halfway or rows are
overwritten by speculative decoding's rejected draft tokens: those rows do hold what the
record says, so reusing them is right whenever a new prompt has those tokens there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if len(diff) else n


class RecordedBackend:
    """A backend (``prefill`` / ``decode`` / ``verify``) that records the token behind each KV-cache
    row it writes. Every other attribute is the wrapped backend's."""

    def __init__(self, backend: Any) -> None:
        self.inner = backend
        self.tokens: list[int] = []  # rows 0..len-1 of the cache were computed from these tokens

    def __getattr__(self, name: str) -> Any:  # max_prefill, max_verify, threads, session, ...
        return getattr(self.inner, name)

    def reusable(self, ids: Sequence[int]) -> int:
        """How many leading tokens of ``ids`` the cache holds already; at most ``len(ids) - 1``, since
        the last prompt token must run to give the next token's logits."""
        return min(common_prefix(self.tokens, ids), max(0, len(ids) - 1))

    def forget(self) -> None:
        """Trust no row: the next prompt runs from position 0."""
        self.tokens.clear()

    def _wrote(self, start: int, tokens: Sequence[int]) -> None:
        if len(self.tokens) == start:
            self.tokens.extend(int(t) for t in tokens)

    def prefill(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        del self.tokens[start_pos:]
        logits = self.inner.prefill(tokens, start_pos)
        self._wrote(start_pos, tokens)
        return logits

    def decode(self, token: int, pos: int) -> np.ndarray:
        del self.tokens[pos:]
        logits = self.inner.decode(token, pos)
        if len(self.tokens) == pos:
            self.tokens.append(int(token))
        return logits

    def verify(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        del self.tokens[start_pos:]
        rows = self.inner.verify(tokens, start_pos)
        self._wrote(start_pos, tokens)
        return rows
