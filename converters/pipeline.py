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
from edgelm.errors import ConversionError, EdgeLMError, FormatError
from edgelm.runtime.backends import quiet_native_stderr
from edgelm.runtime.engine import Engine
from edgelm.targets import profile_to_dict

log = logging.getLogger(__name__)
_VERSIONED = ("torch", "executorch", "onnx", "onnxruntime", "litert-torch", "ai-edge-litert", "transformers")


@dataclass
class ConvertOptions:
    """Everything ``edgelm convert`` can be told."""

    source: str | None = None
    out: Path = Path("bundle")
    format: str = "pte"
    scheme: str = "fp32"
    group_size: int = 32
    max_context: int | None = None
    max_prefill: int = 512
    prefill_lengths: tuple[int, ...] = ()
    target: Any = None  # an edgelm.targets.Profile
    threads: int | None = None
    force: bool = False
    verify: bool = True
    verify_steps: int = 32
    gate: ParityGate = field(default_factory=ParityGate)
    progress: bool = True


_NOISY = ("torch", "torch.utils._pytree", "torch._export", "torch.export", "torchao", "executorch",
          "transformers", "jax", "absl", "onnxscript", "litert_torch", "ai_edge_quantizer")


def silence_libraries() -> None:
    """Keep third-party warnings and progress bars off a quiet (non ``-v``) run."""
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


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
    ext, lower = get_lowering(opts.format)  # unknown format or scheme fails before any heavy work
    if opts.scheme != "fp32":
        raise FormatError(f"quantization scheme {opts.scheme!r} is not available for {opts.format} yet; use fp32")
    quiet = not log.isEnabledFor(logging.DEBUG)
    if not log.isEnabledFor(logging.INFO):
        silence_libraries()
    report: dict[str, Any] = {}
    with BundleWriter(opts.out, overwrite=opts.force) as writer, Steps(5, enabled=opts.progress) as steps, \
            warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        with steps.step("loading source model"):
            source = load_source(opts.source, max_context=opts.max_context)
            if opts.target is not None:
                from edgelm.targets import check_memory

                check_memory(opts.target, source.config, opts.scheme, source.config.max_context)
        with steps.step("building canonical decoder"):
            model = build_decoder(source.config, source.state_dict)
            cfg = source.config
            log.info("model: %s, %.1f M parameters, max_context %d", cfg.arch, cfg.num_parameters() / 1e6,
                     cfg.max_context)
        model_file = f"model{ext}"
        with steps.step(f"lowering to {opts.format}"), quiet_native_stderr(quiet):
            try:
                lowered = lower(model, writer.path(model_file),
                                LowerOptions(max_prefill=opts.max_prefill, prefill_lengths=tuple(opts.prefill_lengths),
                                             threads=opts.threads))
            except EdgeLMError:
                raise
            except Exception as e:  # exporters raise anything; keep the message, drop the traceback
                log.debug("lowering failed", exc_info=True)
                raise ConversionError(f"lowering to {opts.format} failed: {type(e).__name__}: {e}") from e
        report["lowering"] = lowered.report
        (writer.path("tokenizer.json")).write_text(source.tokenizer_json, encoding="utf-8")
        manifest = Manifest(
            format=opts.format, model_file=model_file, model=cfg, scheme=opts.scheme,
            special_tokens=source.special_tokens, chat_template=source.chat_template,
            max_context=cfg.max_context, io=lowered.io, source=source.description,
            versions=package_versions(), target=profile_to_dict(opts.target) if opts.target else None,
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
