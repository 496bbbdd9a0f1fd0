"""A multi-turn conversation on one engine.

Each turn renders the whole conversation through the bundle's chat template, as
``transformers`` would, and generates from it. The engine's KV cache still holds the
previous turns (see :mod:`edgelm.runtime.prefix`), so only the new tokens run: the end of
the last answer's turn and the new message. Templates that render earlier turns differently
from the way they were generated (Qwen3 drops the thinking of past answers) simply reuse
less: the output does not depend on what is reused.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from edgelm.errors import BundleError
from edgelm.sampling import SamplingConfig
from edgelm.tokenizer import Message

if TYPE_CHECKING:
    from edgelm.runtime.engine import Engine


class Chat:
    """A conversation with ``engine`` (``Engine.chat()`` makes one).

    >>> chat = engine.chat(system="You are terse.")        # doctest: +SKIP
    >>> for piece in chat.send("Name a prime number."):     # doctest: +SKIP
    ...     print(piece, end="")
    >>> chat.ask("And another?")                             # doctest: +SKIP

    When the conversation and ``max_new_tokens`` no longer fit the context window, the oldest
    turns are dropped (the system message stays); :attr:`dropped_turns` counts them.
    """

    def __init__(self, engine: Engine, system: str | None = None,
                 template_vars: Mapping[str, Any] | None = None) -> None:
        if not engine.manifest.chat_template:
            raise BundleError(f"{engine.root}: this bundle has no chat template, so it cannot hold a conversation; "
                              "generate from raw text instead")
        self.engine, self.system = engine, system
        self.template_vars = dict(template_vars or {})
        self.messages: list[Message] = []  # user and assistant turns, oldest first
        self.dropped_turns = 0

    def conversation(self, turns: list[Message] | None = None) -> list[Message]:
        """The messages the template renders: the system message, then the turns (all of them by default)."""
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        return system + (self.messages if turns is None else turns)

    def warm(self) -> int:
        """Run the conversation so far (the system message, to begin with) into the KV cache now,
        so the next message's answer starts sooner. Returns how many tokens ran."""
        messages = self.conversation()
        if not messages:
            return 0
        return self.engine.warm(self.engine.tokenizer.encode_chat(messages, add_generation_prompt=False,
                                                                  **self.template_vars))

    def reset(self) -> None:
        """Start over (the system message stays)."""
        self.messages.clear()
        self.dropped_turns = 0

    def _make_room(self, max_new_tokens: int) -> None:
        """Drop the fewest oldest turns that leave room for ``max_new_tokens``, or else for some answer
        (it then stops when the window is full); none when even the newest message alone does not
        fit (the engine then says so, or truncates)."""
        room = self.engine.prompt_room(max_new_tokens)
        starts = [i for i, m in enumerate(self.messages) if m.get("role") == "user"]
        chosen = None
        for n, i in enumerate(starts):
            ids = self.engine.encode_prompt(self.conversation(self.messages[i:]), template_vars=self.template_vars)
            if len(ids) <= room:
                chosen = n, i
                break
            if chosen is None and len(ids) < self.engine.max_context:
                chosen = n, i
        if chosen is not None:
            del self.messages[:chosen[1]]
            self.dropped_turns += chosen[0]

    def send(self, text: str, *, max_new_tokens: int = 256, sampling: SamplingConfig | None = None,
             stop: Sequence[str] = (), overflow: str = "error") -> Iterator[str]:
        """Add the user message ``text`` and stream the answer, which joins the conversation once it
        ends (as far as it got, if the caller stops early). ``overflow`` applies when the new
        message alone does not fit, as in :meth:`Engine.generate`."""
        self.messages.append({"role": "user", "content": text})
        pieces: list[str] = []
        done = False
        try:
            self._make_room(max_new_tokens)
            for piece in self.engine.generate(self.conversation(), max_new_tokens=max_new_tokens, sampling=sampling,
                                              stop=stop, overflow=overflow, template_vars=self.template_vars):
                pieces.append(piece)
                yield piece
            done = True
        finally:
            if done or pieces:
                self.messages.append({"role": "assistant", "content": "".join(pieces)})
            else:  # nothing came back (an error, or the caller stopped at once): the message was not sent
                self.messages.pop()

    def ask(self, text: str, **kwargs: Any) -> str:
        """:meth:`send`, the whole answer as one string."""
        return "".join(self.send(text, **kwargs))
