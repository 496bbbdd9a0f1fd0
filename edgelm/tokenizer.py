"""Tokenizer wrapper: ``tokenizer.json`` through the `tokenizers` library, chat templates
through Jinja (the language Hugging Face chat templates are written in), and UTF-8-safe
incremental detokenization for streaming."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from edgelm.errors import BundleError

Message = dict[str, str]


class Tokenizer:
    """Encodes prompts, renders chat templates and decodes token ids."""

    def __init__(self, path: str | Path, special_tokens: dict[str, Any] | None = None,
                 chat_template: str | None = None) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise BundleError(f"{path}: cannot load tokenizer ({e})") from e
        self.special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template
        self._template = None

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.special_tokens.get("eos_token_ids", []))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text`` (special tokens added the way the model's tokenizer does)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True,
                            **variables: Any) -> str:
        """Render ``messages`` with the bundle's chat template (the Jinja text the model shipped).

        ``variables`` are extra template variables, as ``transformers``' ``apply_chat_template``
        takes them (e.g. Qwen3's ``enable_thinking=False``)."""
        if not self.chat_template:
            raise BundleError("this bundle has no chat template; run without --chat or pass a raw prompt")
        if self._template is None:
            self._template = _chat_environment().from_string(self.chat_template)
        names = {k: v for k, v in self.special_tokens.items() if k.endswith("_token") and isinstance(v, str)}
        return self._template.render(**{**names, **variables}, messages=messages,
                                     add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True, **variables: Any) -> list[int]:
        """Token ids of a rendered chat (the template already holds any BOS text)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **variables),
                           add_special_tokens=False)

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self)


def _chat_environment():
    """The Jinja environment ``transformers`` renders chat templates in, so a template renders the
    same text here: sandboxed, ``trim_blocks``/``lstrip_blocks``, loop controls, ``raise_exception``,
    ``strftime_now``, a ``tojson`` that leaves non-ASCII and HTML characters alone, and the
    ``{% generation %}`` block (which transformers uses to mark assistant tokens; here it only
    renders its body)."""
    import json

    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message: str) -> None:
        raise BundleError(f"chat template: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text pieces.

    Decoding token by token breaks multi-byte characters and the spacing rules of
    byte-level and SentencePiece tokenizers; this decodes a sliding window of recent
    tokens and only emits text once it no longer ends in an incomplete character.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the window that is re-decoded for context
        self._read = 0  # tokens already turned into emitted text

    def add(self, token_id: int) -> str:
        """Add one token; return the new text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix_text = self.tok.decode(self.ids[self._prefix:self._read])
        new_text = self.tok.decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            piece = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever text is still held back (at the end of generation)."""
        prefix_text = self.tok.decode(self.ids[self._prefix:self._read])
        new_text = self.tok.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text):]
