"""edgelm: Transformer language models on edge devices.

The package root is the device side and never imports torch. The host-side
conversion code lives in :mod:`edgelm.converters`.
"""

from edgelm.errors import EdgeLMError

__version__ = "0.1.0"
__all__ = ["EdgeLMError", "__version__"]
