"""Errors edgelm raises on purpose.

Every error says what went wrong and what to do about it; the CLI prints the
message without a traceback and exits non-zero.
"""

from __future__ import annotations


class EdgeLMError(Exception):
    """Base class of every error edgelm raises on purpose."""

    exit_code = 1


class SourceError(EdgeLMError):
    """A model source (folder, GGUF file, hub id) cannot be read."""


class BundleError(EdgeLMError):
    """A bundle is missing, malformed, or fails its checksums."""


class BackendUnavailableError(EdgeLMError):
    """The runtime package a bundle's format needs is not installed."""


class FormatError(EdgeLMError):
    """An unknown or unsupported format or scheme was asked for."""


class ContextOverflowError(EdgeLMError):
    """A prompt (plus the tokens to generate) does not fit the context window."""


class ConversionError(EdgeLMError):
    """Lowering a model failed."""


class VerificationError(EdgeLMError):
    """A lowered artifact failed its parity or quality gate."""
