"""The ``edgelm`` command line: convert, run, inspect, bench."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from edgelm.config import KV_CACHE_DTYPES, PTE_ATTENTIONS
from edgelm.deploy.commands import deploy_command, device_options, run_device_bench
from edgelm.errors import EdgeLMError

try:  # torch-free flag definitions; absent where only the device side was copied (edgelm deploy)
    from edgelm.converters.compress import options as compress_options

    _compress_flags = compress_options.click_options
except ImportError:
    compress_options = None

    def _compress_flags(f):
        return f

FORMATS = ("pte", "onnx", "tflite")
SCHEMES = ("fp32", "w8", "w8a8", "w8a8-static", "w4a8")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("edgelm").setLevel(level)
    if verbose < 2:
        for noisy in ("torch", "executorch", "transformers", "jax", "absl"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


class _Group(click.Group):
    """Prints :class:`EdgeLMError` as one line on stderr and exits non-zero, no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgeLMError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.secho("interrupted", fg="yellow", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug and native runtime output).")
@click.version_option(package_name="edgelm")
def main(verbose: int) -> None:
    """edgelm: make Transformer LMs small and fast, lower them to ExecuTorch, LiteRT or ONNX,
    and stream tokens on edge devices."""
    _setup_logging(verbose)


def entry() -> None:
    """The ``edgelm`` command: first huge pages for the weights (:mod:`edgelm.runtime.hugepages`), then the CLI."""
    from edgelm.runtime.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages()
    main()


def _draft_options(f):
    """``--draft`` / ``--lookup`` / ``--draft-tokens``: speculative decoding."""
    f = click.option("--draft-tokens", type=click.IntRange(1, 15), default=5, show_default=True,
                     help="Most tokens proposed per verify pass (--draft or --lookup).")(f)
    f = click.option("--lookup", is_flag=True,
                     help="Prompt-lookup decoding: no draft model; tokens that followed the last 3 (or 2) tokens "
                     "earlier in the prompt and output are proposed and BUNDLE (a .pte or .onnx) checks them in "
                     "one pass. Same greedy output; faster where the answer repeats its context (summaries, edits).")(f)
    return click.option("--draft", type=click.Path(path_type=Path), default=None,
                        help="A smaller bundle of the same model (e.g. its w8a8 .pte) that proposes tokens; BUNDLE "
                        "(a .pte or .onnx) checks several per pass: speculative decoding, same greedy output.")(f)


def _lengths(ctx, param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(sorted({int(v) for v in value.split(",") if v.strip()}))
    except ValueError:
        raise click.BadParameter("give comma-separated integers, e.g. 32,128") from None
    if not out or out[0] < 1:
        raise click.BadParameter("lengths must be positive integers")
    return out


@main.command()
@click.argument("source", required=False)
@click.option("-f", "--format", "fmt", default="pte", show_default=True,
              help=f"Output format: {', '.join(FORMATS)}, or 'all' for one bundle of each under OUT.")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Bundle folder to write.")
@click.option("-t", "--target", default=None,
              help="Target profile: a built-in name (see `edgelm targets list`) or a .toml file. It sets format, "
                   "scheme, context and prefill lengths and checks the model fits; explicit flags override it.")
@click.option("-q", "--quant", "--scheme", "scheme", type=click.Choice(SCHEMES), default="fp32", show_default=True,
              help="Quantization scheme.")
@click.option("--group-size", type=click.IntRange(16), default=32, show_default=True, help="w4a8 group size.")
@click.option("--embedding", type=click.Choice(["int8", "fp32"]), default="int8", show_default=True,
              help="Embedding table precision for quantized schemes.")
@click.option("--lm-head", type=click.Choice(["int8", "scheme", "fp32"]), default="int8", show_default=True,
              help="LM head precision for quantized schemes ('scheme': same as the other linears).")
@click.option("--int4-symmetric", is_flag=True,
              help="w4a8: symmetric int4 groups (GGUF Q4_0's form) instead of groups with a float minimum "
                   "(Q4_1's form); faster in pte, less accurate. LiteRT's int4 is always symmetric.")
@click.option("--smooth", type=click.FloatRange(0, 1), default=None,
              help="pte/tflite w8a8, w4a8: SmoothQuant strength alpha, activation outliers moved into the "
                   "weights (0 = off) [default: 0.5 for w8a8, else off; it hurts w4a8 from a Q4 GGUF].")
@click.option("--calib", type=click.Path(exists=True), default=None,
              help="Calibration text (file or folder) for w8a8-static and --smooth; default: the built-in set.")
@click.option("--eval", "eval_text", type=click.Path(exists=True), default=None,
              help="Held-out text (file or folder) for the quality report; default: the built-in set.")
@click.option("--eval-windows", type=click.IntRange(1), default=8, show_default=True,
              help="128-token windows of held-out text to evaluate.")
@click.option("--evaluate/--no-evaluate", default=None,
              help="Held-out quality report (top-1, KL, perplexity). Default: on for quantized schemes.")
@click.option("--max-context", type=click.IntRange(16, 1 << 20), default=None,
              help="KV-cache length fixed at export (default: the model's, capped at 2048).")
@click.option("--kv-cache", type=click.Choice(KV_CACHE_DTYPES), default="fp32", show_default=True,
              help="KV cache elements. int8 (pte, onnx): 3.7x less cache memory; a .pte with ExecuTorch's kernels "
                   "attends over the int8 codes on aarch64, over dequantized rows on x86 (an .onnx and a portable "
                   ".pte: over the codes, scales folded in); judged by the quality gates like a quantized scheme.")
@click.option("--pte-attention", type=click.Choice(PTE_ATTENTIONS), default="custom", show_default=True,
              help="pte: attend with ExecuTorch's llama:: kernels (custom; on aarch64 they need ARMv8.2-A), or "
                   "with plain ops that run on any core, an ARMv8.0 Raspberry Pi 4 included (portable; "
                   "faster with long prompts, slower with short ones, more memory). A --target profile sets it.")
@click.option("--max-prefill", type=click.IntRange(2, 1 << 16), default=512, show_default=True,
              help="Longest prompt chunk one prefill call takes; longer prompts are chunked.")
@click.option("--prefill-lengths", callback=_lengths, default=None,
              help="TFLite: fixed prefill signature lengths, e.g. 32,128 (a chunk is padded to the next).")
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="Threads for verification.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--no-verify", is_flag=True, help="Skip the checks against PyTorch (not recommended).")
@click.option("--max-logit-error", type=float, default=None,
              help="Parity gate: largest logit difference to the fp32 reference [fp32: 0.05; quantized: off].")
@click.option("--min-top1", type=click.FloatRange(0, 1), default=None,
              help="Gate: smallest greedy top-1 agreement with fp32 [fp32: 0.98; quantized: 0.80].")
@click.option("--max-ppl-increase", type=click.FloatRange(0), default=0.25, show_default=True,
              help="Quality gate: largest relative perplexity increase over fp32 on held-out text.")
@_compress_flags
@click.pass_context
def convert(ctx: click.Context, source: str | None, fmt: str, out: Path, target: str | None, scheme: str,
            group_size: int, embedding: str, lm_head: str, int4_symmetric: bool, smooth: float | None,
            calib: str | None,
            eval_text: str | None,
            eval_windows: int, evaluate: bool | None, max_context: int | None, kv_cache: str, pte_attention: str,
            max_prefill: int,
            prefill_lengths: tuple[int, ...] | None, threads: int | None, force: bool, no_verify: bool,
            max_logit_error: float | None, min_top1: float | None, max_ppl_increase: float,
            **compress_params) -> None:
    """Convert SOURCE into a bundle.

    SOURCE is a Hugging Face model folder, a .gguf file, a hub id (org/name), an
    `edgelm compress` checkpoint folder, or 'builtin:tiny'. Without SOURCE the embedded
    default, SmolLM2-135M-Instruct, is used. The compression flags (--prune-ffn,
    --drop-layers, --low-rank, --sparsity, --distill-steps, ...) run before quantization.
    """
    if fmt not in (*FORMATS, "all"):
        raise click.BadParameter(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}, all",
                                 param_hint="--format")
    try:
        from edgelm.converters.pipeline import ConvertOptions
        from edgelm.converters.pipeline import convert as run_convert
    except ImportError as e:
        raise EdgeLMError(f"converting needs the conversion extra ({e}); install it with "
                          "pip install 'edgelm[convert]'") from e
    settings = {"format": fmt, "scheme": scheme, "group_size": group_size, "max_context": max_context,
                "max_prefill": max_prefill, "prefill_lengths": prefill_lengths or (), "pte_attention": pte_attention}
    profile = None
    if target is not None:
        from edgelm.targets import apply_profile, load_profile

        profile = load_profile(target)

        def typed(param: str):  # what the user typed, else None (the profile fills it in)
            return ctx.params[param] if ctx.get_parameter_source(param) is not ParameterSource.DEFAULT else None

        settings = apply_profile(profile, format=typed("fmt"), scheme=typed("scheme"),
                                 group_size=typed("group_size"), max_context=typed("max_context"),
                                 max_prefill=typed("max_prefill"), prefill_lengths=prefill_lengths,
                                 pte_attention=typed("pte_attention"))
    opts = ConvertOptions(source=source, out=out, threads=threads, force=force, verify=not no_verify, kv_cache=kv_cache,
                          embedding=embedding, lm_head=lm_head, int4_symmetric=int4_symmetric, smooth=smooth,
                          calib=calib,
                          eval=eval_text,
                          eval_windows=eval_windows, evaluate=evaluate, max_logit_error=max_logit_error,
                          min_top1=min_top1, max_ppl_increase=max_ppl_increase,
                          progress=sys.stderr.isatty(), target=profile, **settings)
    if compress_options is not None:
        compress = compress_options.from_click(compress_params, eval=eval_text, eval_windows=eval_windows)
        opts.compress = compress if compress.active else None
    for path, report in run_convert(opts):
        _print_report(path, report)


def _print_report(path: Path, report: dict) -> None:
    size = sum(f["size"] for name, f in report["files"].items() if name != "tokenizer.json")
    click.echo(f"wrote {path} ({report['format']}, {report['scheme']}, model {size / 1e6:.1f} MB)")
    if report.get("compression"):  # compression (issue 5)
        from edgelm.converters.compress.recipe import format_report

        for line in format_report(report["compression"]):
            click.echo(f"  {line}")
    lowering = report.get("lowering", {})
    for method, d in lowering.get("delegation", {}).items():
        click.echo(f"  {method}: {d['delegated']} nodes delegated to XNNPACK in {d['delegates']} subgraphs, "
                   f"{d['not_delegated']} left to portable kernels")
    if lowering.get("signatures"):
        click.echo(f"  signatures: {', '.join(lowering['signatures'])}")
    q = lowering.get("quantization")
    if q:
        left = q.get("linear_left_fp32") or []
        click.echo(f"  quantized {q['linear_quantized']}/{q['linear_total']} linear layers with {q['tool']}; "
                   f"embedding {q.get('embedding')}, lm_head {q.get('lm_head')}"
                   + (f"; left in fp32: {', '.join(left[:6])}{' …' if len(left) > 6 else ''}" if left else ""))
    parity = report.get("parity")
    if parity:
        click.echo(f"  parity vs PyTorch fp32: max logit error {parity['max_abs_err']:.2e}, "
                   f"top-1 agreement {parity['top1_agreement']:.3f}, mean KL {parity['mean_kl']:.2e} "
                   f"over {parity['positions']} positions")
    quality = report.get("quality")
    if quality:
        click.echo(f"  held-out quality: top-1 {quality['top1_agreement']:.3f}, KL {quality['mean_kl']:.4f}, "
                   f"perplexity {quality['perplexity']:.3f} vs fp32 {quality['perplexity_fp32']:.3f} "
                   f"({quality['perplexity_increase']:+.1%}) over {quality['tokens']} tokens")


# ---- compression (issue 5) ----
@main.command()
@click.argument("source", required=False)
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Checkpoint folder to write (a source for `edgelm convert`).")
@click.option("--max-context", type=click.IntRange(16, 1 << 20), default=None,
              help="Context length recorded in the checkpoint (default: the model's, capped at 2048).")
@click.option("--eval", "eval_text", type=click.Path(exists=True), default=None,
              help="Held-out text for the before/after numbers; default: the built-in set.")
@click.option("--eval-windows", type=click.IntRange(1), default=8, show_default=True)
@click.option("--evaluate/--no-evaluate", default=True, show_default=True,
              help="Measure held-out perplexity and top-1 against the uncompressed model.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@_compress_flags
def compress(source: str | None, out: Path, max_context: int | None, eval_text: str | None, eval_windows: int,
             evaluate: bool, force: bool, **compress_params) -> None:
    """Prune, factor, sparsify and/or distill SOURCE into a checkpoint folder OUT.

    OUT holds edgelm-checkpoint.json, model.safetensors, tokenizer.json and compression.json
    (the report); `edgelm convert OUT` lowers it like any other source. Per-layer head
    counts, FFN widths and low-rank ranks are kept.
    """
    try:
        from edgelm.converters.compress.checkpoint import save_checkpoint
        from edgelm.converters.compress.recipe import compress_source, format_report
        from edgelm.converters.pipeline import silence_libraries
        from edgelm.converters.sources import load_source
    except ImportError as e:
        raise EdgeLMError(f"compressing needs the conversion extra ({e}); install it with "
                          "pip install 'edgelm[convert]'") from e
    opts = compress_options.from_click(compress_params, eval=eval_text, eval_windows=eval_windows, evaluate=evaluate)
    if not opts.active:
        raise click.UsageError("nothing to do: give at least one of --prune-ffn, --prune-heads, --drop-layers, "
                               "--low-rank, --low-rank-budget, --sparsity, --distill-steps")
    if out.exists() and not force:
        raise EdgeLMError(f"{out} already exists; choose another output folder or pass --force")
    if not logging.getLogger("edgelm").isEnabledFor(logging.INFO):
        silence_libraries()
    src = load_source(source, max_context=max_context)
    new, report = compress_source(src, opts, progress=sys.stderr.isatty())
    save_checkpoint(new, out, report, force=force)
    click.echo(f"wrote {out} (checkpoint; convert it with `edgelm convert {out} -o BUNDLE`)")
    for line in format_report(report):
        click.echo(f"  {line}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--source", default=None, help="The fp32 source model (default: the one the manifest names).")
@click.option("--eval", "eval_text", type=click.Path(exists=True), default=None,
              help="Held-out text (file or folder); default: the built-in set.")
@click.option("--eval-windows", type=click.IntRange(1), default=8, show_default=True)
@click.option("--window", type=click.IntRange(2), default=128, show_default=True,
              help="Tokens per window, each run from position 0 (at most the bundle's context). Long windows "
                   "measure quality deep into the context, where an int8 KV cache holds many rows.")
@click.option("--threads", type=click.IntRange(1, 256), default=None)
@click.option("--update", is_flag=True, help="Write the new numbers into the bundle's manifest.")
def evaluate(bundle: Path, source: str | None, eval_text: str | None, eval_windows: int, window: int,
             threads: int | None, update: bool) -> None:
    """Re-measure BUNDLE's quality (top-1, KL, perplexity) against its fp32 source, in its own runtime."""
    from edgelm.converters.reevaluate import reevaluate

    q = reevaluate(bundle, source=source, eval_text=eval_text, eval_windows=eval_windows, threads=threads,
                   update=update, seq_len=window)
    click.echo(f"{bundle}: top-1 {q['top1_agreement']:.3f}, KL {q['mean_kl']:.4f}, perplexity "
               f"{q['perplexity']:.3f} vs fp32 {q['perplexity_fp32']:.3f} ({q['perplexity_increase']:+.1%}) "
               f"over {q['tokens']} tokens")


def _template_vars(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        key, sep, text = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE with KEY a name", param=param)
        try:
            out[key.strip()] = json.loads(text)
        except ValueError:
            out[key.strip()] = text
    return out


def _generation_options(f):
    """What ``run`` and ``chat`` share: the system message, template variables, sampling, stops,
    threads, speculative decoding and ``--stats``."""
    for option in reversed([
        click.option("--system", default=None, help="System message (chat template)."),
        click.option("--template-var", "template_vars", multiple=True, metavar="KEY=VALUE", callback=_template_vars,
                     help="A chat-template variable, e.g. enable_thinking=false for Qwen3 (VALUE is read as JSON "
                          "when it parses, else as text; repeatable)."),
        click.option("-n", "--max-new-tokens", type=click.IntRange(1), default=256, show_default=True),
        click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 is greedy."),
        click.option("--top-k", type=click.IntRange(0), default=0, show_default=True),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True),
        click.option("--repetition-penalty", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True),
        click.option("--seed", type=int, default=None),
        click.option("--stop", "stops", multiple=True, help="Stop when this text appears (repeatable)."),
        click.option("--truncate", is_flag=True, help="Drop the oldest prompt tokens instead of failing when the "
                     "prompt does not fit the context window."),
        click.option("--threads", type=click.IntRange(1, 256), default=None),
        _draft_options,
        click.option("--stats", is_flag=True, help="Print time to first token and prefill/decode speed."),
    ]):
        f = option(f)
    return f


def _open_engine(bundle: Path, opts: dict[str, Any]):
    """The engine and sampling settings that :func:`_generation_options` describe."""
    from edgelm.runtime import Engine, SamplingConfig
    from edgelm.runtime.engine import LOOKUP_NGRAM

    if opts["draft"] is not None and opts["lookup"]:
        raise click.UsageError("--draft and --lookup are two ways to propose tokens; give one")
    engine = Engine.load(bundle, threads=opts["threads"], draft=opts["draft"], draft_tokens=opts["draft_tokens"],
                         lookup=LOOKUP_NGRAM if opts["lookup"] else 0)
    sampling = SamplingConfig(temperature=opts["temperature"], top_k=opts["top_k"], top_p=opts["top_p"],
                              repetition_penalty=opts["repetition_penalty"], seed=opts["seed"])
    return engine, sampling


def _stats_line(engine) -> str:
    s = engine.last_stats
    return (
        f"[{engine.manifest.format}/{engine.manifest.scheme}] prompt {s.prompt_tokens} tokens"
        + (f" ({s.reused_tokens} already in the KV cache)" if s.reused_tokens else "")
        + f", generated {s.generated_tokens} ({s.stop_reason}); time to first token {s.ttft_s * 1e3:.0f} ms; "
        f"prefill {s.prefill_tps:.1f} tokens/s; decode {s.decode_tps:.1f} tokens/s; "
        f"runtime overhead {s.overhead_share:.1%} of decode time"
        + (f"; speculative: {s.accepted_tokens} of {s.draft_tokens} draft tokens accepted ({s.acceptance:.0%})"
           if engine.speculative else "")
    )


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--chat/--raw", default=None, help="Wrap PROMPT in the bundle's chat template (default: if it has one).")
@_generation_options
def run(bundle: Path, prompt: str, chat: bool | None, **opts: Any) -> None:
    """Stream the model's answer to PROMPT from BUNDLE."""
    engine, sampling = _open_engine(bundle, opts)
    use_chat = bool(engine.manifest.chat_template) if chat is None else chat
    if opts["template_vars"] and not use_chat:
        raise click.UsageError("--template-var sets chat-template variables; it needs --chat and a bundle "
                               "with a chat template")
    for piece in engine.generate(prompt, chat=use_chat, system=opts["system"], max_new_tokens=opts["max_new_tokens"],
                                 sampling=sampling, stop=opts["stops"],
                                 overflow="truncate" if opts["truncate"] else "error",
                                 template_vars=opts["template_vars"]):
        click.echo(piece, nl=False)
    click.echo()
    sys.stdout.flush()
    if opts["stats"]:
        click.echo(_stats_line(engine), err=True)


def _messages(interactive: bool) -> Iterator[str]:
    """What the user types, one message at a time; a line ending in a backslash goes on on the next."""
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # a Python built without it (some device builds): plain input()
            pass
    pending: list[str] = []
    interrupted = False
    while True:
        if interactive:
            try:
                line: str | None = input("... " if pending else "> ")
                interrupted = False
            except EOFError:
                click.echo()
                line = None
            except KeyboardInterrupt:  # Ctrl-C drops the line being typed; twice in a row leaves
                if interrupted:
                    raise
                interrupted, pending = True, []
                click.echo("\n(Ctrl-C again, Ctrl-D or /exit leaves)", err=True)
                continue
        else:
            raw = sys.stdin.readline()
            line = raw.rstrip("\n") if raw else None
        if line is None:
            if pending:
                yield "\n".join(pending)
            return
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        yield "\n".join([*pending, line])
        pending = []


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@_generation_options
def chat(bundle: Path, **opts: Any) -> None:
    """Talk with BUNDLE: each line you type is a message and the answer streams back.

    The conversation stays in the KV cache, so a turn runs only its new tokens. End a line
    with a backslash to go on on the next one. /reset starts over; /exit or Ctrl-D leaves;
    Ctrl-C stops an answer, or drops the line being typed (twice in a row: leaves). Reads stdin
    line by line when it is not a terminal.
    """
    from edgelm.errors import ContextOverflowError

    engine, sampling = _open_engine(bundle, opts)
    conversation = engine.chat(system=opts["system"], template_vars=opts["template_vars"])
    interactive = sys.stdin.isatty()
    conversation.warm()  # the system message runs now, not when the first message comes
    if interactive:
        click.echo(f"edgelm chat: {engine.root} ({engine.manifest.format}/{engine.manifest.scheme}). "
                   "/reset starts over, /exit or Ctrl-D leaves.", err=True)
    failed = 0
    for text in _messages(interactive):
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            conversation.reset()
            conversation.warm()
            click.echo("(a new conversation)", err=True)
            continue
        dropped = conversation.dropped_turns
        stream = conversation.send(text, max_new_tokens=opts["max_new_tokens"], sampling=sampling,
                                   stop=opts["stops"], overflow="truncate" if opts["truncate"] else "error")
        try:
            for piece in stream:
                click.echo(piece, nl=False)
        except ContextOverflowError as e:
            failed += 1
            click.secho(f"error: {e}", fg="red", err=True)
            continue
        except KeyboardInterrupt:
            if not interactive:
                raise
            stream.close()  # the answer so far joins the conversation now, before the next message
            click.echo(" [stopped]", nl=False, err=True)
        click.echo()
        sys.stdout.flush()
        if conversation.dropped_turns > dropped:
            click.echo(f"(the conversation outgrew the context window: the {conversation.dropped_turns} oldest "
                       "turns are left out)", err=True)
        if opts["stats"]:
            click.echo(_stats_line(engine), err=True)
    if failed:
        sys.exit(1)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
@click.option("--no-verify", is_flag=True, help="Do not check file checksums.")
def inspect(bundle: Path, as_json: bool, no_verify: bool) -> None:
    """Show what is in BUNDLE and check its checksums."""
    from edgelm.bundle import load_manifest

    root, m = load_manifest(bundle, verify=not no_verify)
    if as_json:
        click.echo(json.dumps(m.to_dict(), indent=2))
        return
    cfg = m.model
    click.echo(f"bundle      {root}")
    click.echo(f"format      {m.format} ({m.model_file}), scheme {m.scheme}, schema v{m.schema_version}")
    rs = cfg.rope_scaling or {}
    extras = [f"{rs.get('rope_type', rs.get('type'))} RoPE scaling" if rs else "",
              f"RoPE on {cfg.rotary_dim} of {cfg.head_dim} head dims" if cfg.rotary_dim else "",
              f"no RoPE in {len(cfg.nope_layers)} of {cfg.n_layers} layers" if cfg.nope_layers else "",
              f"{len(cfg.conv_layers)} of {cfg.n_layers} layers are {cfg.conv_kernel}-tap convolutions"
              if cfg.conv_layers else "",
              f"soft caps: attention {cfg.attn_softcap}, logits {cfg.final_softcap}"
              if cfg.attn_softcap or cfg.final_softcap else ""]
    click.echo(f"model       {cfg.arch}: {cfg.n_layers} layers, dim {cfg.dim}, vocab {cfg.vocab_size}, "
               f"{cfg.num_parameters() / 1e6:.1f} M parameters" + "".join(f"; {e}" for e in extras if e))
    window = ""
    if cfg.sliding_window:
        slide = cfg.n_layers if cfg.local_layers is None else len(cfg.local_layers)
        window = f" (sliding window of {cfg.sliding_window} in {slide} of {cfg.n_layers} layers)"
    click.echo(f"context     {m.max_context} tokens{window}; chat template: {'yes' if m.chat_template else 'no'}")
    from edgelm.targets import kv_cache_bytes

    kv = m.io.get("kv_cache_dtype", "fp32")
    decode = m.io.get("kv_cache_decode")  # an int8 cache: how decode attends (lowering.executorch)
    rows = m.io.get("kv_cache_rows", "")  # int8 rows: "symmetric: ..." or "asymmetric: ..." (converters.lowering)
    size = kv_cache_bytes(cfg, m.max_context, kv_cache=kv, fmt=m.format, pte_attention=m.io.get("attention", "custom"))
    click.echo(f"kv cache    {kv}" + (f" ({rows.split(':')[0]} rows)" if rows else "") + f", {size / 1e6:.1f} MB "
               f"for {m.max_context} positions" + (f"; decode attends over {decode}" if decode else ""))
    if m.format == "pte":
        attention = m.io.get("attention", "custom")
        click.echo(f"attention   {attention}: " + ("plain ops, no llama:: kernels (runs on ARMv8.0-A cores)"
                                                    if attention == "portable" else
                                                    "ExecuTorch's llama:: kernels (on aarch64: ARMv8.2-A and later)"))
    verify = int(m.io.get("max_verify", 0))
    click.echo("decoding    " + (f"up to {verify} tokens checked per call: a target for --draft and --lookup"
                                 if verify >= 2 else "one token per call: not a target for --draft or --lookup"
                                 + (" (convert it again to make it one)" if m.format in ("pte", "onnx") else "")))
    click.echo(f"source      {m.source.get('kind', '?')}: {m.source.get('path', '?')}")
    for name, info in m.files.items():
        click.echo(f"file        {name:<16} {info['size'] / 1e6:9.2f} MB  sha256 {info['sha256'][:16]}…")
    parity = m.verification.get("parity")
    if parity:
        click.echo(f"verified    max logit error {parity['max_abs_err']:.2e}, top-1 {parity['top1_agreement']:.3f}, "
                   f"KL {parity['mean_kl']:.2e}")
    click.echo("checksums   " + ("not checked" if no_verify else "ok"))


@main.command()
@click.argument("bundles", nargs=-1, type=click.Path(path_type=Path))
@click.option("--eager", "eager", is_flag=True,
              help="Add the PyTorch eager transformers baseline row (needs the conversion extra).")
@click.option("--source", default=None, help="Model for the eager row (default: the embedded SmolLM2).")
@click.option("--threads", type=click.IntRange(1, 256), default=None,
              help="Threads for every row [default: 2 here; on a device, the bundle's target profile or 2].")
@click.option("--runs", type=click.IntRange(1), default=5, show_default=True, help="Timed runs per row.")
@click.option("--rounds", type=click.IntRange(1), default=1, show_default=True,
              help="Run all rows this many times in turns (A B A B ...) and report medians over the rounds: rows "
                   "stay comparable on a machine whose speed drifts.")
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True, help="Untimed runs first.")
@click.option("-n", "--new-tokens", type=click.IntRange(2), default=64, show_default=True)
@click.option("--prompt", default=None, help="Prompt (chat-formatted when the model has a template).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Also write the results as JSON to this file ('-': print the JSON instead of the table).")
@click.option("--small-pages", is_flag=True,
              help="Also time every bundle without huge pages for the weights (see README: Huge pages).")
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Sample instead of greedy decoding (every row, the eager one included).")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@_draft_options
@device_options(required=False)
def bench(bundles: tuple[Path, ...], eager: bool, source: str | None, threads: int | None, runs: int, rounds: int,
          warmup: int, new_tokens: int, prompt: str | None, json_out: Path | None, small_pages: bool,
          temperature: float, top_k: int, top_p: float, seed: int, draft: Path | None, lookup: bool, draft_tokens: int,
          device: str | None, workdir: str | None, ssh_config: Path | None, install: bool,
          device_python: str | None, connect_timeout: int, pip_args: tuple[str, ...]) -> None:
    """Measure BUNDLES (and optionally PyTorch eager) in one run: TTFT, prefill/decode tokens/s, peak RSS.

    Each row runs in its own process with the same thread count and prompt; figures are medians
    of --runs timed generations of exactly --new-tokens tokens after --warmup. With --draft (--lookup)
    every bundle gets another row decoding speculatively with that draft (with prompt lookup). With
    --device the bundles are deployed (as `edgelm deploy` does) and timed on that device instead.
    """
    from edgelm.bench import DEFAULT_PROMPT, format_table, machine_info, merge_rounds, run_row, sampling_label
    from edgelm.runtime.engine import LOOKUP_NGRAM

    to_stdout = json_out is not None and str(json_out) == "-"
    n_lookup = LOOKUP_NGRAM if lookup else 0
    if not temperature and (top_k or top_p < 1.0):
        raise click.UsageError("--top-k and --top-p shape sampling: give --temperature too (0 is greedy)")
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed} if temperature else None
    if device is not None:
        if not bundles:
            raise click.UsageError("give at least one bundle to run on the device")
        if eager or small_pages or rounds > 1:
            raise click.UsageError("--eager, --small-pages and --rounds run on this machine only; leave them out "
                                   "with --device")
        if to_stdout:
            import contextlib
            import io

            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):  # the table; the JSON alone goes to stdout
                results = run_device_bench(bundles, device, workdir=workdir, ssh_config=ssh_config, install=install,
                                           device_python=device_python, connect_timeout=connect_timeout,
                                           threads=threads, runs=runs, warmup=warmup, new_tokens=new_tokens,
                                           prompt=prompt, json_out=None, pip_args=pip_args, draft=draft,
                                           draft_tokens=draft_tokens, lookup=n_lookup, sampling=sampling)
            from edgelm.deploy.remote_bench import device_report

            click.echo(buf.getvalue(), err=True, nl=False)
            click.echo(json.dumps(device_report(results), indent=2))
            return
        run_device_bench(bundles, device, workdir=workdir, ssh_config=ssh_config, install=install,
                         device_python=device_python, connect_timeout=connect_timeout, threads=threads, runs=runs,
                         warmup=warmup, new_tokens=new_tokens, prompt=prompt, json_out=json_out, pip_args=pip_args,
                         draft=draft, draft_tokens=draft_tokens, lookup=n_lookup, sampling=sampling)
        return
    if not bundles and not eager:
        raise click.UsageError("give at least one bundle, or --eager")
    threads = threads or 2
    common = {"prompt": prompt or DEFAULT_PROMPT, "new_tokens": new_tokens, "runs": runs, "warmup": warmup,
              "threads": threads, "sampling": sampling}
    rows = [{"kind": "eager", "source": source, **common}] if eager else []
    for b in bundles:
        variants = [{}, {"small_pages": True}] if small_pages else [{}]
        for v in variants:
            rows.append({"kind": "bundle", "bundle": str(b), **common, **v})
            if draft is not None:
                rows.append({"kind": "bundle", "bundle": str(b), "draft": str(draft), "draft_tokens": draft_tokens,
                             **common, **v})
            if lookup:
                rows.append({"kind": "bundle", "bundle": str(b), "lookup": n_lookup, "draft_tokens": draft_tokens,
                             **common, **v})
    per_round: list[list[dict]] = []
    for r in range(rounds):
        per_round.append([])
        for row in rows:
            turn = f" (round {r + 1} of {rounds})" if rounds > 1 else ""
            click.echo(f"running {row['kind']} {row.get('bundle', row.get('source') or '')}{turn}...", err=True)
            per_round[-1].append(run_row(row))
    results = [merge_rounds(list(row_rounds)) for row_rounds in zip(*per_round)]
    info = machine_info()
    report = {"machine": info, "rows": results}
    if to_stdout:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"machine: {info.get('cpu', '?')}, {info['cores']} cores, {threads} threads per row, "
               f"huge pages {info.get('huge_pages', '?')}; "
               f"{new_tokens} new tokens, median of {runs} runs after {warmup} warm-up"
               + (f", medians of {rounds} rounds run in turns" if rounds > 1 else ""))
    click.echo(format_table(results, baseline="pytorch eager fp32" + sampling_label(sampling) if eager else None))
    if json_out:
        json_out.write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {json_out}", err=True)


@main.command()
@click.argument("bundles", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("bench-results/peers"), show_default=True,
              help="Folder for peers.md, peers.json and peers.png.")
@click.option("--source", default=None, help="Model of the reference and eager rows (default: the embedded SmolLM2).")
@click.option("--gguf", default=None, help="GGUF for the llama.cpp rows (default: the source, when it is one).")
@click.option("--llamacpp", default="F32,Q8_0,Q4_0,Q4_1", show_default=True,
              help="llama.cpp types to make from the GGUF and time ('' for none).")
@click.option("--eager/--no-eager", default=True, show_default=True, help="The PyTorch eager fp32 row.")
@click.option("--threads", type=click.IntRange(1, 256), default=2, show_default=True, help="Threads for every row.")
@click.option("--runs", type=click.IntRange(1), default=5, show_default=True, help="Timed runs per row.")
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True, help="Untimed runs first.")
@click.option("-n", "--new-tokens", type=click.IntRange(2), default=64, show_default=True)
@click.option("--prompt", default=None, help="Prompt (chat-formatted when the model has a template).")
@click.option("--windows", type=click.IntRange(0), default=4, show_default=True,
              help="Held-out windows for top-1 agreement with fp32 (0: none).")
@click.option("--seq-len", type=click.IntRange(2), default=128, show_default=True, help="Tokens per window.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Where the llama.cpp GGUFs are cached [default: ~/.cache/edgelm/llamacpp].")
def compare(bundles: tuple[Path, ...], out: Path, source: str | None, gguf: str | None, llamacpp: str, eager: bool,
            threads: int, runs: int, warmup: int, new_tokens: int, prompt: str | None, windows: int, seq_len: int,
            cache_dir: Path | None) -> None:
    """Benchmark BUNDLES against the peers in one run: PyTorch eager, llama.cpp (--llamacpp types made from the
    same GGUF; needs `pip install 'edgelm[llamacpp]'`, else skip rows) and edgelm, with top-1 agreement vs fp32."""
    from edgelm.compare import compare as run_compare
    from edgelm.compare import format_peer_table, machine_line

    types = tuple(t.strip() for t in llamacpp.split(",") if t.strip())
    report = run_compare(list(bundles), out, source=source, gguf=gguf, eager=eager, llamacpp=types, threads=threads,
                         runs=runs, warmup=warmup, new_tokens=new_tokens, prompt=prompt, windows=windows,
                         seq_len=seq_len, cache_dir=cache_dir, echo=lambda s: click.echo(s, err=True))
    click.echo(f"machine: {machine_line(report)}")
    click.echo(format_peer_table(report))
    click.echo(f"wrote {out / 'peers.md'}, {out / 'peers.json'}" + (f", {report['chart']}" if report["chart"] else ""),
               err=True)


main.add_command(deploy_command)


@main.group("targets")
def targets_group() -> None:
    """Target profiles: built-in devices, or your own .toml (which may extend one)."""


@targets_group.command("list")
def targets_list() -> None:
    """List the built-in targets."""
    from edgelm.targets import list_profiles, load_profile

    for name in list_profiles():
        p = load_profile(name)
        c = p.convert
        click.echo(f"{name:<16} {','.join(c.formats):<16} {c.scheme:<6} {c.threads} threads  "
                   f"ctx {c.max_context:<5} {p.device.memory_mb:>6} MB  {p.description}")


@targets_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the resolved profile as JSON (the manifest's form).")
def targets_show(name: str, as_json: bool) -> None:
    """Show target NAME (a built-in name or a path to a .toml file), with `extends` applied."""
    from edgelm.targets import load_profile, profile_to_dict

    p = load_profile(name)
    data = profile_to_dict(p)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"{p.name}: {p.description}" + (f" (extends {p.extends})" if p.extends else ""))
    for section in ("device", "convert", "runtime", "deploy"):
        click.echo(f"[{section}]")
        for key, value in data[section].items():
            if value not in (None, ""):
                shown = ", ".join(map(str, value)) if isinstance(value, list) else value
                click.echo(f"  {key:<16} {shown}")
    d = p.device
    click.echo(f"model budget       {d.budget_bytes >> 20} MB ({d.usable_fraction:.0%} of {d.memory_mb} MB)")
    click.echo(f"device installs    {' '.join(p.packages())}  (for {p.format})")


if __name__ == "__main__":  # pragma: no cover
    entry()
