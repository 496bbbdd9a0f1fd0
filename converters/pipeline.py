"""The conversion pipeline: source -> canonical decoder -> lowering -> verify -> bundle.

Written as a chain of small steps (after ExecuTorch's LLM export builder). The
bundle is assembled in a temporary folder, verified there with the real runtime,
and only then renamed into place.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import edgelm
from edgelm.bundle import BundleWriter, Manifest
from edgelm.converters.lowering import LowerOptions, get_lowering
from edgelm.converters.model import build_decoder
from edgelm.converters.progress import Steps
from edgelm.converters.sources import load_source
from edgelm.converters.verify import ParityGate, check_parity
from edgelm.errors import ConversionError, EdgeLMError
from edgelm.runtime.backends import quiet_native_stderr
from edgelm.runtime.engine import Engine

log = logging.getLogger(__name__)
_VERSIONED = ("torch", "executorch", "onnx", "onnxruntime", "litert-torch", "ai-edge-litert", "transformers")


@dataclass
class ConvertOptions:
    """Everything ``edgelm convert`` can be told."""

    source: str | None = None
    out: Path = Path("bundle")
    format: str = "pte"
    max_context: int | None = None
    max_prefill: int = 512
    threads: int | None = None
    force: bool = False
    verify: bool = True
    verify_steps: int = 32
    gate: ParityGate = field(default_factory=ParityGate)
    progress: bool = True


def package_versions() -> dict[str, str]:
    out = {"edgelm": edgelm.__version__}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def convert(opts: ConvertOptions) -> tuple[Path, dict[str, Any]]:
    """Run the whole pipeline; return the bundle path and a report (timings, checks)."""
    ext, lower = get_lowering(opts.format)  # unknown format fails before any heavy work
    quiet = not log.isEnabledFor(logging.DEBUG)
    report: dict[str, Any] = {}
    with BundleWriter(opts.out, overwrite=opts.force) as writer, Steps(5, enabled=opts.progress) as steps, \
            warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        with steps.step("loading source model"):
            source = load_source(opts.source, max_context=opts.max_context)
        with steps.step("building canonical decoder"):
            model = build_decoder(source.config, source.state_dict)
            cfg = source.config
            log.info("model: %s, %.1f M parameters, max_context %d", cfg.arch, cfg.num_parameters() / 1e6,
                     cfg.max_context)
        model_file = f"model{ext}"
        with steps.step(f"lowering to {opts.format}"), quiet_native_stderr(quiet):
            try:
                lowered = lower(model, writer.path(model_file),
                                LowerOptions(max_prefill=opts.max_prefill, threads=opts.threads))
            except EdgeLMError:
                raise
            except Exception as e:  # exporters raise anything; keep the message, drop the traceback
                log.debug("lowering failed", exc_info=True)
                raise ConversionError(f"lowering to {opts.format} failed: {type(e).__name__}: {e}") from e
        report["lowering"] = lowered.report
        (writer.path("tokenizer.json")).write_text(source.tokenizer_json, encoding="utf-8")
        manifest = Manifest(
            format=opts.format, model_file=model_file, model=cfg, scheme="fp32",
            special_tokens=source.special_tokens, chat_template=source.chat_template,
            max_context=cfg.max_context, io=lowered.io, source=source.description,
            versions=package_versions(),
        )
        manifest.verification = {"lowering": lowered.report}
        tmp = writer.write_manifest(manifest)
        if opts.verify:
            with steps.step("verifying against PyTorch"):
                engine = Engine.load(tmp, threads=opts.threads)
                parity = check_parity(model, engine, steps=opts.verify_steps, gate=opts.gate)
                del engine
            manifest.verification["parity"] = parity
            report["parity"] = parity
        else:
            with steps.step("verification skipped"):
                pass
        with steps.step("writing bundle"):
            out = writer.commit(manifest)
        report["timings_s"] = steps.timings
    report["bundle"] = str(out)
    report["files"] = manifest.files
    return out, report
