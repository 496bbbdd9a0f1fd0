"""Re-evaluate an existing bundle against its fp32 source (``edgelm evaluate``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from edgelm.bundle import MANIFEST, load_manifest
from edgelm.converters.evaluate import load_texts, quality_report
from edgelm.converters.model import build_decoder
from edgelm.converters.pipeline import silence_libraries
from edgelm.converters.sources import TINY, load_source
from edgelm.errors import SourceError
from edgelm.runtime.engine import Engine


def manifest_source(manifest) -> str | None:
    """The source argument that rebuilds the fp32 model a bundle came from."""
    kind, path = manifest.source.get("kind"), manifest.source.get("path")
    if kind == "embedded":
        return None
    if kind == "builtin":
        return TINY
    if not path:
        raise SourceError("the manifest does not name its source model; pass --source")
    return path


def reevaluate(bundle: str | Path, source: str | None = None, eval_text: str | None = None, eval_windows: int = 8,
               threads: int | None = None, update: bool = False, seq_len: int = 128) -> dict:
    """Quality numbers of ``bundle`` on held-out text, in windows of ``seq_len`` tokens; with ``update`` they go
    into its manifest."""
    root, manifest = load_manifest(bundle)
    if not logging.getLogger(__name__).isEnabledFor(logging.INFO):
        silence_libraries()  # transformers' loading bars on a quiet run, as convert keeps them off
    src = load_source(source if source is not None else manifest_source(manifest), max_context=manifest.max_context)
    if src.config.to_dict() | {"max_context": 0} != manifest.model.to_dict() | {"max_context": 0}:
        raise SourceError("the source model does not have the bundle's configuration; pass the right --source")
    model = build_decoder(src.config, src.state_dict)
    engine = Engine.load(root, threads=threads)
    quality = quality_report(model, engine, load_texts(eval_text, "eval"), seq_len=seq_len, max_windows=eval_windows)
    if update:
        manifest.verification["quality"] = quality
        data = manifest.to_dict()
        tmp = Path(root) / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        tmp.replace(Path(root) / MANIFEST)
    return quality
