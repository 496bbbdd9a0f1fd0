"""The folder ``edgelm compress`` writes, which ``edgelm convert`` accepts as a source.

::

    CKPT/
      edgelm-checkpoint.json   format marker, canonical ModelConfig (per-layer heads, FFN widths,
                               low-rank ranks), special tokens, chat template, original source
      model.safetensors        canonical weight names (a tied LM head stored once)
      tokenizer.json
      compression.json         the compression report (what was removed, quality before/after)

Not a Hugging Face folder on purpose: ``transformers`` Llama has one head count and one FFN
width for all layers and no factored linears, so per-layer dims would not survive.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from edgelm.config import ModelConfig
from edgelm.errors import SourceError

log = logging.getLogger(__name__)

MARKER = "edgelm-checkpoint.json"
FORMAT = "edgelm-checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def save_checkpoint(source, out: str | Path, report: dict[str, Any] | None = None, force: bool = False) -> Path:
    """Write ``source`` (an :class:`edgelm.converters.sources.Source`) as a checkpoint folder."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not force:
        raise SourceError(f"{out} already exists; choose another output folder or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        cfg = source.config
        sd = {k: v.detach().contiguous().clone() for k, v in source.state_dict.items()
              if not (cfg.tie_embeddings and k == "output.weight")}
        save_file(sd, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / "tokenizer.json").write_text(source.tokenizer_json, encoding="utf-8")
        meta = {"format": FORMAT, "version": VERSION, "config": cfg.to_dict(),
                "special_tokens": source.special_tokens, "chat_template": source.chat_template,
                "source": source.description}
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if report is not None:
            (tmp / "compression.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_checkpoint(path: str | Path, max_context: int | None = None):
    """A :class:`~edgelm.converters.sources.Source` from a checkpoint folder."""
    from safetensors.torch import load_file

    from edgelm.converters.sources import Source

    path = Path(path)
    try:
        meta = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SourceError(f"{path / MARKER}: cannot read ({e})") from e
    if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
        raise SourceError(f"{path / MARKER}: not an edgelm checkpoint this version reads "
                          f"(format {meta.get('format')!r}, version {meta.get('version')}); upgrade edgelm")
    for name in (WEIGHTS, "tokenizer.json"):
        if not (path / name).is_file():
            raise SourceError(f"{path}: the checkpoint is missing {name}")
    try:
        cfg = ModelConfig.from_dict(meta["config"])
    except (ValueError, TypeError, KeyError) as e:
        raise SourceError(f"{path / MARKER}: bad model config ({e})") from e
    sd: dict[str, torch.Tensor] = load_file(str(path / WEIGHTS))
    if max_context:
        positions = sd.get("pos_embeddings.weight")  # learned positions (GPT-2) end where training did
        if positions is not None and max_context > positions.shape[0]:
            log.warning("max_context %d is beyond the model's %d learned positions; using %d", max_context,
                        positions.shape[0], positions.shape[0])
            max_context = positions.shape[0]
        cfg.max_context = max_context
    description: dict[str, Any] = {"kind": "checkpoint", "path": str(path), "original": meta.get("source", {})}
    report_path = path / "compression.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text(encoding="utf-8"))
        description["compression"] = report.get("summary", {})
    return Source(cfg, sd, (path / "tokenizer.json").read_text(encoding="utf-8"), meta.get("special_tokens", {}),
                  meta.get("chat_template"), description)
