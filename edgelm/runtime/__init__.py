"""Device-side runtime: load a bundle and stream tokens. No torch at import time."""

from edgelm.runtime.chat import Chat
from edgelm.runtime.engine import Engine, GenerationStats
from edgelm.sampling import SamplingConfig

__all__ = ["Chat", "Engine", "GenerationStats", "SamplingConfig"]
