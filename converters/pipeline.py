"""The conversion pipeline: source -> canonical decoder -> lowering -> verify -> bundle.

Written as a chain of small steps (after ExecuTorch's LLM export builder). The
bundle is assembled in a temporary folder, verified there with the real runtime,
and only then renamed into place.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import edgelm
from edgelm.bundle import BundleWriter, Manifest
from edgelm.converters.evaluate import QualityGate, load_texts, quality_report, token_windows
from edgelm.converters.lowering import FORMATS, LowerOptions, get_lowering
from edgelm.converters.model import build_decoder
from edgelm.converters.progress import Steps
from edgelm.converters.quant import QuantSpec
from edgelm.converters.sources import load_source
from edgelm.converters.verify import ParityGate, check_parity
from edgelm.errors import BundleError, ConversionError, EdgeLMError, FormatError
from edgelm.runtime.backends import quiet_native_stderr
from edgelm.runtime.engine import Engine
from edgelm.targets import profile_to_dict
from edgelm.tokenizer import Tokenizer

log = logging.getLogger(__name__)
# SmoothQuant alpha for pte and tflite w8a8 by default: held-out KL to fp32 0.025 -> 0.014 on SmolLM2 (README)
DEFAULT_SMOOTH = 0.5
SMOOTH_FORMATS = ("pte", "tflite")  # ONNX quantizes activations per block of 32 and does not need it
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
    kv_cache: str = "fp32"  # the KV cache's elements: fp32, or int8 (edgelm.config.INT8_KV_FORMATS)
    pte_attention: str = "custom"  # pte: ExecuTorch's llama:: kernels, or plain ops (edgelm.config.PTE_ATTENTIONS)
    max_prefill: int = 512
    prefill_lengths: tuple[int, ...] = ()
    target: Any = None  # an edgelm.targets.Profile
    threads: int | None = None
    force: bool = False
    embedding: str = "int8"
    lm_head: str = "int8"
    int4_symmetric: bool = False
    smooth: float | None = None  # SmoothQuant alpha; None: DEFAULT_SMOOTH for pte/tflite w8a8, else off
    calib: str | None = None  # calibration text (file or folder); built-in set if None
    calib_windows: int = 16
    eval: str | None = None  # held-out evaluation text; built-in set if None
    eval_windows: int = 8
    evaluate: bool | None = None  # held-out quality report; default: for quantized schemes
    verify: bool = True
    verify_steps: int = 32
    max_logit_error: float | None = None  # parity gate; default 0.05 for fp32, none for quantized
    min_top1: float | None = None  # default 0.98 for fp32, 0.80 for quantized
    max_ppl_increase: float = 0.25
    progress: bool = True
    compress: Any = None  # an edgelm.converters.compress.options.CompressOptions: prune/low-rank/distill first


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
    try:  # the GGUF loader's own tqdm bar ignores transformers' switch above
        import functools

        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        if not isinstance(gguf_utils.tqdm, functools.partial):
            gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
    except (ImportError, AttributeError):
        pass


def package_versions() -> dict[str, str]:
    out = {"edgelm": edgelm.__version__}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _lossy(opts: ConvertOptions) -> bool:
    """Whether the artifact is meant to differ from fp32: quantized weights or an int8 KV cache."""
    return opts.scheme != "fp32" or opts.kv_cache != "fp32"


def _quality_gate(opts: ConvertOptions) -> tuple[ParityGate, QualityGate]:
    """Gates for this scheme: strict parity for fp32; for quantized artifacts (weights or KV cache) a
    top-1 floor on the parity prompts and the held-out quality gate instead of a logit-error bound."""
    quantized = _lossy(opts)
    top1 = opts.min_top1 if opts.min_top1 is not None else (QualityGate.min_top1 if quantized else 0.98)
    err = opts.max_logit_error if opts.max_logit_error is not None else (float("inf") if quantized else 0.05)
    return ParityGate(max_abs_err=err, min_top1=top1), QualityGate(min_top1=top1,
                                                                   max_ppl_increase=opts.max_ppl_increase)


def convert(opts: ConvertOptions) -> list[tuple[Path, dict[str, Any]]]:
    """Run the whole pipeline; return ``(bundle path, report)`` per format.

    ``opts.format == "all"`` loads and prepares the source once and writes one bundle per
    format under ``opts.out`` (``OUT/pte``, ``OUT/onnx``, ``OUT/tflite``).
    """
    formats = list(FORMATS) if opts.format == "all" else [opts.format]
    for fmt in formats:  # an unknown format, or a scheme or cache a format cannot do, fails before any heavy work
        get_lowering(fmt, opts.scheme, opts.kv_cache)
        if opts.smooth and fmt not in SMOOTH_FORMATS:
            raise FormatError(f"--smooth is built for {' and '.join(SMOOTH_FORMATS)} (XNNPACK's int8 activations, one "
                              f"scale per row), not {fmt}")
    quant = QuantSpec(opts.scheme, opts.group_size, opts.embedding, opts.lm_head, opts.int4_symmetric,
                      smooth=opts.smooth or 0.0)
    if not log.isEnabledFor(logging.INFO):
        silence_libraries()
    if opts.format == "all" and opts.out.exists() and not opts.force:
        raise BundleError(f"{opts.out} already exists; choose another output path or pass --force")
    results = []
    compressing = opts.compress is not None and opts.compress.active
    compression = None
    with Steps(2 + compressing + 4 * len(formats), enabled=opts.progress) as steps, warnings.catch_warnings():
        if not log.isEnabledFor(logging.INFO):
            warnings.simplefilter("ignore")
        with steps.step("loading source model"):
            source = load_source(opts.source, max_context=opts.max_context)
            if opts.target is not None:
                from edgelm.targets import check_memory

                for fmt in formats:  # each runtime keeps its own copies of the weights
                    check_memory(opts.target, source.config, opts.scheme, source.config.max_context, fmt,
                                 opts.prefill_lengths, kv_cache=opts.kv_cache, pte_attention=opts.pte_attention)
        if compressing:  # compression (issue 5): a smaller plain model, lowered like any other
            from edgelm.converters.compress.recipe import compress_source

            with steps.step("compressing (prune / low-rank / sparsity / distill)"):
                source, compression = compress_source(source, opts.compress, progress=opts.progress)
        with steps.step("building canonical decoder"):
            model = build_decoder(source.config, source.state_dict)
            cfg = source.config
            log.info("model: %s, %.1f M parameters, max_context %d", cfg.arch, cfg.num_parameters() / 1e6,
                     cfg.max_context)
        parent_is_new = opts.format == "all" and not opts.out.exists()
        try:
            for fmt in formats:
                out = opts.out / fmt if opts.format == "all" else opts.out
                results.append(_convert_one(opts, fmt, out, source, model, quant, steps))
        except BaseException:
            # a failed first format leaves no empty OUT behind to trip the next run's exists check;
            # bundles the run did complete stay (each is whole, written by rename)
            if parent_is_new and opts.out.is_dir() and not any(opts.out.iterdir()):
                opts.out.rmdir()
            raise
    if compression is not None:
        for _, report in results:
            report["compression"] = compression
    return results


def _convert_one(opts: ConvertOptions, fmt: str, out: Path, source, model, quant: QuantSpec,
                 steps: Steps) -> tuple[Path, dict[str, Any]]:
    ext, lower = get_lowering(fmt, opts.scheme)
    quiet = not log.isEnabledFor(logging.INFO)
    parity_gate, quality_gate = _quality_gate(opts)
    cfg = source.config
    report: dict[str, Any] = {"format": fmt, "scheme": opts.scheme}
    with BundleWriter(out, overwrite=opts.force) as writer:
        writer.path("tokenizer.json").write_text(source.tokenizer_json, encoding="utf-8")
        if opts.smooth is None and fmt in SMOOTH_FORMATS and opts.scheme == "w8a8":
            quant = dataclasses.replace(quant, smooth=DEFAULT_SMOOTH)
        calibration = None
        if opts.scheme == "w8a8-static" or quant.smooth:
            tok = Tokenizer(writer.path("tokenizer.json"))
            calibration = token_windows(tok, load_texts(opts.calib, "calibration"), min(128, cfg.max_context),
                                        opts.calib_windows)
        model_file = f"model{ext}"
        label = fmt if not quant.quantized else f"{fmt} ({opts.scheme})"
        if opts.kv_cache != "fp32":
            label += f", {opts.kv_cache} KV cache"
        with steps.step(f"lowering to {label}"), quiet_native_stderr(quiet):
            try:
                lowered = lower(model, writer.path(model_file), LowerOptions(
                    max_prefill=opts.max_prefill, prefill_lengths=tuple(opts.prefill_lengths), threads=opts.threads,
                    quant=quant, calibration=calibration, kv_cache=opts.kv_cache, attention=opts.pte_attention,
                    architecture=opts.target.device.architecture if opts.target else None))
            except EdgeLMError:
                raise
            except Exception as e:  # exporters raise anything; keep the message, drop the traceback
                log.debug("lowering failed", exc_info=True)
                raise ConversionError(f"lowering to {fmt} failed: {type(e).__name__}: {e}") from e
        report["lowering"] = lowered.report
        manifest = Manifest(
            format=fmt, model_file=model_file, model=cfg, scheme=opts.scheme,
            special_tokens=source.special_tokens, chat_template=source.chat_template,
            max_context=cfg.max_context, io={**lowered.io, "quantization": quant.to_dict()},
            source=source.description, versions=package_versions(),
            target=profile_to_dict(opts.target) if opts.target else None,
        )
        manifest.verification = {"lowering": lowered.report}
        tmp = writer.write_manifest(manifest)
        if opts.verify:
            with steps.step(f"verifying {fmt} against PyTorch"):
                engine = Engine.load(tmp, threads=opts.threads)
                parity = check_parity(model, engine, steps=opts.verify_steps, gate=parity_gate)
            manifest.verification["parity"] = parity
            report["parity"] = parity
            evaluate = opts.evaluate if opts.evaluate is not None else _lossy(opts)
            with steps.step(f"measuring {fmt} quality on held-out text" if evaluate else "quality check skipped"):
                if evaluate:
                    quality = quality_report(model, engine, load_texts(opts.eval, "eval"),
                                             max_windows=opts.eval_windows, gate=quality_gate)
                    manifest.verification["quality"] = quality
                    report["quality"] = quality
            del engine
        else:
            for _ in range(2):
                with steps.step("verification skipped"):
                    pass
        with steps.step(f"writing {fmt} bundle"):
            path = writer.commit(manifest)
    report["bundle"] = str(path)
    report["files"] = manifest.files
    report["timings_s"] = dict(steps.timings)
    return path, report
