"""Benchmarks against the peers, in one run: PyTorch eager, llama.cpp and edgelm bundles.

Every row runs in its own process (``python -m edgelm.bench``, see :func:`edgelm.bench.run_row`)
with the same prompt and thread count, and reports TTFT, prefill and decode tokens/s (median,
min, max of several runs after warm-up over exactly ``new_tokens`` greedy tokens, EOS ignored),
peak RSS and file size. Rows:

- ``eager``: PyTorch eager ``transformers``, fp32 (:mod:`edgelm.converters.baseline`).
- ``llamacpp``: llama.cpp through ``llama-cpp-python`` (the ``llamacpp`` extra) on the source
  GGUF, rewritten at F32 / Q8_0 / Q4_0 / Q4_1 by llama.cpp's own quantize API and cached. The
  embedded SmolLM2 GGUF is Q4_1, so these are requantized from its dequantized weights,
  exactly the fp32 weights edgelm converts. Without llama-cpp-python they are skip rows.
- ``bundle``: an edgelm bundle through :class:`edgelm.runtime.Engine`.

Each row also gets its greedy top-1 agreement with the fp32 PyTorch reference (edgelm's
canonical decoder on the source weights), teacher-forced on windows of the built-in held-out
text: the same token ids for every row. A ``reference`` row (in its own process too) makes the
prompt token ids and the reference predictions.

    edgelm compare BUNDLE... -o bench-results/peers [--llamacpp F32,Q8_0,Q4_0] [--threads 2]

Writes ``peers.md`` (the table), ``peers.json`` and ``peers.png`` (decode tok/s and TTFT per row).
"""

from __future__ import annotations

import ctypes
import json
import os
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.bench import DEFAULT_PROMPT, _summary, machine_info, peak_rss_mb, run_row
from edgelm.errors import EdgeLMError

# llama.cpp file types by the name llama-quantize uses; the value is the llama_cpp constant.
LLAMACPP_FTYPES = {
    "F32": "LLAMA_FTYPE_ALL_F32", "F16": "LLAMA_FTYPE_MOSTLY_F16", "BF16": "LLAMA_FTYPE_MOSTLY_BF16",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K", "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
}
DEFAULT_LLAMACPP = ("F32", "Q8_0", "Q4_0", "Q4_1")
_WEIGHT_BITS = {"F32": 32, "fp32": 32, "F16": 16, "BF16": 16, "Q8_0": 8, "w8": 8, "w8a8": 8, "w8a8-static": 8,
                "Q6_K": 6, "Q5_K_M": 5, "Q4_0": 4, "Q4_1": 4, "Q4_K_M": 4, "w4a8": 4}
INSTALL_HINT = "pip install 'edgelm[llamacpp]'"


def llamacpp_missing() -> str | None:
    """Why llama.cpp rows cannot run here, or None when ``llama_cpp`` imports."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # ImportError, or OSError when the shared library does not load
        return f"llama-cpp-python is not installed ({type(e).__name__}: {e}); {INSTALL_HINT}"
    return None


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgelm" / "llamacpp"


def llamacpp_gguf(source: Path, qtype: str, cache_dir: Path, threads: int = 2) -> Path:
    """``source`` rewritten as llama.cpp file type ``qtype`` by ``llama_model_quantize`` (cached).

    ``allow_requantize`` is on: a quantized source (the embedded SmolLM2 is Q4_1) is dequantized
    to float first, so every type starts from the same weights the fp32 reference uses.
    """
    if qtype not in LLAMACPP_FTYPES:
        raise EdgeLMError(f"unknown llama.cpp type {qtype!r}; choose from {', '.join(LLAMACPP_FTYPES)}")
    source = Path(source)
    st = source.stat()
    out = Path(cache_dir) / f"{source.stem}.{st.st_size:x}.{qtype}.gguf"
    if out.is_file():
        return out
    import llama_cpp

    from edgelm.runtime.backends import quiet_native_stderr

    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMACPP_FTYPES[qtype])
    params.nthread = threads
    params.allow_requantize = True
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
    try:
        with quiet_native_stderr():
            rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            raise EdgeLMError(f"llama.cpp could not write {qtype} from {source} (llama_model_quantize returned {rc})")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _load_llama(gguf: str, threads: int, n_ctx: int, logits_all: bool = False):
    from llama_cpp import Llama

    from edgelm.runtime.backends import quiet_native_stderr

    with quiet_native_stderr():
        return Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=threads,
                     n_threads_batch=threads, logits_all=logits_all, verbose=False)


def _last_logits(llm, n_vocab: int) -> np.ndarray:
    """The logits of the last evaluated token, read in place (``Llama.scores`` stays empty
    unless ``logits_all``)."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))


def bench_llamacpp(gguf: str, prompt_ids: list[int], qtype: str = "", new_tokens: int = 64, runs: int = 5,
                   warmup: int = 1, threads: int = 2, source_type: str | None = None) -> dict[str, Any]:
    """Time ``runs`` greedy generations of exactly ``new_tokens`` tokens with llama.cpp.

    The loop is the runtime's: one ``eval`` of the prompt, then one ``eval`` per token, argmax in
    NumPy, EOS ignored. TTFT ends when the first token is picked; decode tok/s counts the steps
    after it, as :class:`edgelm.runtime.GenerationStats` does.
    """
    t = time.perf_counter()
    llm = _load_llama(gguf, threads, n_ctx=len(prompt_ids) + new_tokens + 16)
    load_s = time.perf_counter() - t
    n_vocab = llm.n_vocab()
    samples: dict[str, list[float]] = {"ttft_s": [], "prefill_tps": [], "decode_tps": []}
    for i in range(warmup + runs):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt_ids)
        tok = int(np.argmax(_last_logits(llm, n_vocab)))
        t_first = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([tok])
            tok = int(np.argmax(_last_logits(llm, n_vocab)))
        t_last = time.perf_counter()
        if i >= warmup:
            samples["ttft_s"].append(t_first - t0)
            samples["prefill_tps"].append(len(prompt_ids) / (t_first - t0))
            samples["decode_tps"].append((new_tokens - 1) / (t_last - t_first) if new_tokens > 1 else 0.0)
    import llama_cpp

    return {"name": f"llama.cpp {qtype}".strip(), "kind": "llamacpp", "gguf": str(gguf), "scheme": qtype,
            "source_type": source_type, "threads": threads, "prompt_tokens": len(prompt_ids),
            "new_tokens": new_tokens, "runs": runs, "warmup": warmup, "load_s": load_s,
            **{k: _summary(v) for k, v in samples.items()}, "peak_rss_mb": peak_rss_mb(),
            "size_mb": Path(gguf).stat().st_size / 1e6, "llama_cpp_python": llama_cpp.__version__}


def reference(ref_out: str, source: str | None = None, prompt: str = DEFAULT_PROMPT, chat: bool = True,
              windows: int = 4, seq_len: int = 128, eval_path: str | None = None) -> dict[str, Any]:
    """The fp32 reference: prompt token ids and greedy predictions on held-out windows (host, torch)."""
    import tempfile

    import torch

    from edgelm.converters.evaluate import load_texts, reference_logits, token_windows
    from edgelm.converters.model import build_decoder
    from edgelm.converters.sources import embedded_default_path, load_source
    from edgelm.tokenizer import Tokenizer

    src = load_source(source)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "tokenizer.json").write_text(src.tokenizer_json, encoding="utf-8")
        tok = Tokenizer(Path(d) / "tokenizer.json", src.special_tokens, src.chat_template)
    if chat and src.chat_template:
        prompt_ids = tok.encode_chat([{"role": "user", "content": prompt}])
    else:
        prompt_ids = tok.encode(prompt)
    seq_len = min(seq_len, src.config.max_context)
    wins = token_windows(tok, load_texts(eval_path), seq_len, windows) if windows else []
    top1 = []
    if wins:
        model = build_decoder(src.config, src.state_dict).eval()
        with torch.no_grad():
            top1 = [reference_logits(model, w).argmax(-1) for w in wins]
    shape = (len(wins), len(wins[0]) if wins else 0)
    np.savez(ref_out, windows=np.asarray(wins, dtype=np.int64).reshape(shape),
             top1=np.asarray(top1, dtype=np.int64).reshape(shape))
    gguf = None
    if source is None:
        gguf = str(embedded_default_path())
    elif source.lower().endswith(".gguf"):
        gguf = str(Path(source).expanduser())
    return {"kind": "reference", "source": source or "embedded", "gguf": gguf, "prompt_ids": prompt_ids,
            "windows": len(wins), "seq_len": seq_len, "ref": str(ref_out)}


ROW_KINDS: dict[str, Callable[..., dict[str, Any]]] = {"llamacpp": bench_llamacpp, "reference": reference}


# -- top-1 agreement, measured in the row's own process after its timings ----------------------
def _preds_bundle(bundle: str, threads: int | None, windows: np.ndarray) -> np.ndarray:
    from edgelm.runtime import Engine

    engine = Engine.load(bundle, threads=threads)
    decode = engine.backend.decode  # teacher-forced, one token at a time (as converters.evaluate does)
    return np.stack([[int(np.argmax(decode(int(t), p))) for p, t in enumerate(w)] for w in windows])


def _preds_llamacpp(gguf: str, threads: int, windows: np.ndarray) -> np.ndarray:
    llm = _load_llama(gguf, threads, n_ctx=max(windows.shape[1], 64), logits_all=True)
    n_vocab = llm.n_vocab()
    out = []
    for w in windows:
        llm.reset()
        llm.eval([int(t) for t in w])
        out.append(np.argmax(llm.scores[:len(w), :n_vocab], -1))
    return np.stack(out)


def _preds_eager(source: str | None, threads: int | None, windows: np.ndarray) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    from edgelm.converters.sources import embedded_default_path

    if threads:
        torch.set_num_threads(threads)
    path, kwargs = source, {}
    if source is None or source.endswith(".gguf"):
        p = embedded_default_path() if source is None else Path(source)
        path, kwargs = str(p.parent), {"gguf_file": p.name}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(windows)).logits.argmax(-1).numpy()


def top1_agreement(kind: str, row: dict[str, Any], ref: str) -> dict[str, Any]:
    """Share of held-out positions where the row's greedy next token equals the fp32 reference's."""
    data = np.load(ref)
    windows, top1 = data["windows"], data["top1"]
    if not len(windows):
        return {}
    if kind == "bundle":
        preds = _preds_bundle(row["bundle"], row.get("threads"), windows)
    elif kind == "llamacpp":
        preds = _preds_llamacpp(row["gguf"], row.get("threads") or 2, windows)
    elif kind == "eager":
        preds = _preds_eager(row.get("source"), row.get("threads"), windows)
    else:
        raise ValueError(f"no top-1 agreement for row kind {kind!r}")
    return {"top1_agreement": float((preds == top1).mean()), "tokens": int(top1.size), "windows": len(windows)}


# -- the run -----------------------------------------------------------------------------------
def _bits(row: dict[str, Any]) -> int | None:
    if row.get("kind") == "eager":
        return 32
    return _WEIGHT_BITS.get(row.get("scheme", ""))


def _skip(name: str, kind: str, reason: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": kind, "skipped": reason, **extra}


def compare(bundles: list[str | Path], out_dir: str | Path, source: str | None = None, gguf: str | None = None,
            eager: bool = True, llamacpp: tuple[str, ...] = DEFAULT_LLAMACPP, threads: int = 2, runs: int = 5,
            warmup: int = 1, new_tokens: int = 64, prompt: str | None = None, chat: bool = True,
            windows: int = 4, seq_len: int = 128, cache_dir: str | Path | None = None,
            echo: Callable[[str], None] = print, timeout: float = 3600) -> dict[str, Any]:
    """Run every row, then write ``peers.md``, ``peers.json`` and ``peers.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompt = prompt or DEFAULT_PROMPT
    common = {"new_tokens": new_tokens, "runs": runs, "warmup": warmup, "threads": threads}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    echo("running the fp32 reference (prompt ids, held-out predictions)...")
    ref_path = out / "reference.npz"
    ref = run_row({"kind": "reference", "ref_out": str(ref_path), "source": source, "prompt": prompt, "chat": chat,
                   "windows": windows, "seq_len": seq_len}, timeout=timeout)
    top1_ref = str(ref_path) if ref["windows"] else None
    rows: list[dict[str, Any]] = []
    if eager:
        rows.append({"kind": "eager", "source": source, "prompt": prompt, "chat": chat, **common})
    if llamacpp:
        missing = llamacpp_missing()
        src_gguf = gguf or ref.get("gguf")
        if missing is None and not src_gguf:
            missing = f"llama.cpp needs a GGUF file and the source {ref['source']} is not one; pass --gguf FILE"
        for q in llamacpp:
            name = f"llama.cpp {q}"
            if missing:
                rows.append(_skip(name, "llamacpp", missing, scheme=q))
                continue
            try:
                echo(f"making the llama.cpp {q} GGUF (cached)...")
                path = llamacpp_gguf(Path(src_gguf), q, Path(cache_dir or default_cache_dir()), threads)
            except (EdgeLMError, OSError) as e:
                rows.append(_skip(name, "llamacpp", f"failed: {e}", scheme=q))
                continue
            rows.append({"kind": "llamacpp", "gguf": str(path), "qtype": q, "prompt_ids": ref["prompt_ids"],
                         "source_type": Path(src_gguf).name, **common})
    rows += [{"kind": "bundle", "bundle": str(b), "prompt": prompt, "chat": chat, **common} for b in bundles]
    results = []
    for row in rows:
        if "skipped" in row:
            echo(f"skipping {row['name']}: {row['skipped']}")
            results.append(row)
            continue
        label = row.get("bundle") or row.get("qtype") or row.get("source") or "embedded"
        echo(f"running {row['kind']} {label}...")
        try:
            r = run_row({**row, "top1_ref": top1_ref}, timeout=timeout)
        except Exception as e:  # a failed row is reported, the others still run
            r = _skip(f"{row['kind']} {label}".strip(), row["kind"], f"failed: {e}")
        results.append(r)
    for r in results:
        r["weight_bits"] = _bits(r)
    info = machine_info()
    if load_before is not None:  # other work on the machine skews every row; say how busy it was
        info["load_avg_1min"] = {"start": load_before, "end": os.getloadavg()[0]}
    try:
        import llama_cpp

        info["versions"]["llama-cpp-python"] = llama_cpp.__version__
    except Exception:
        pass
    lengths = {r["prompt_tokens"] for r in results if "prompt_tokens" in r}
    report = {"machine": info, "threads": threads, "new_tokens": new_tokens, "runs": runs, "warmup": warmup,
              "prompt": prompt, "prompt_tokens": len(ref["prompt_ids"]), "top1_windows": ref["windows"],
              "top1_seq_len": ref["seq_len"], "rows": results}
    if len(lengths) > 1:
        report["warning"] = f"rows saw different prompt lengths {sorted(lengths)}"
        echo(f"warning: {report['warning']}")
    table = format_peer_table(report)
    (out / "peers.md").write_text(table + "\n")
    (out / "peers.json").write_text(json.dumps(report, indent=2) + "\n")
    report["chart"] = plot_peers(report, out / "peers.png")
    if report["chart"] is None:
        echo("matplotlib is not installed: no chart (pip install matplotlib)")
    return report


def machine_line(report: dict[str, Any]) -> str:
    m = report["machine"]
    load = m.get("load_avg_1min")
    busy = f" (load average {load['start']:.1f} at start, {load['end']:.1f} at end)" if load else ""
    return (f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores{busy}, {report['threads']} threads per row; "
            f"prompt {report['prompt_tokens']} tokens, {report['new_tokens']} new tokens, median of "
            f"{report['runs']} runs after {report['warmup']} warm-up; top-1 vs fp32 on {report['top1_windows']} "
            f"held-out windows of {report['top1_seq_len']} tokens")


def format_peer_table(report: dict[str, Any]) -> str:
    """Markdown: one line per row; decode speed against PyTorch eager; skip rows say why."""
    rows = report["rows"]
    base = next((r for r in rows if r.get("kind") == "eager" and "skipped" not in r), None)
    lines = ["| row | weight bits | size MB | peak RSS MB | TTFT ms | prefill tok/s | decode tok/s (min–max) | "
             "decode vs eager | top-1 vs fp32 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        bits = r.get("weight_bits") or "–"
        if "skipped" in r:
            lines.append(f"| {r['name']} | {bits} | skipped: {r['skipped']} | | | | | | |")
            continue
        d = r["decode_tps"]
        ratio = f"{d['median'] / base['decode_tps']['median']:.2f}x" if base else "–"
        size = f"{r['size_mb']:.1f}" if r.get("size_mb") else "–"
        top1 = r.get("top1", {}).get("top1_agreement")
        lines.append(f"| {r['name']} | {bits} | {size} | {r['peak_rss_mb']:.0f} | {r['ttft_s']['median'] * 1e3:.0f} | "
                     f"{r['prefill_tps']['median']:.0f} | {d['median']:.1f} ({d['min']:.1f}–{d['max']:.1f}) | "
                     f"{ratio} | {'–' if top1 is None else f'{top1:.3f}'} |")
    return "\n".join(lines)


def plot_peers(report: dict[str, Any], path: Path) -> str | None:
    """A PNG of decode tok/s (min–max whiskers) and TTFT per row; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in report["rows"] if "skipped" not in r][::-1]
    colors = {"eager": "#888888", "llamacpp": "#e8833a", "bundle": "#3a78e8"}
    names = [r["name"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.8), sharey=True)
    med = [r["decode_tps"]["median"] for r in rows]
    err = [[m - r["decode_tps"]["min"] for m, r in zip(med, rows)], [r["decode_tps"]["max"] - m for m, r in
                                                                      zip(med, rows)]]
    c = [colors.get(r["kind"], "#3a78e8") for r in rows]
    ax1.barh(names, med, xerr=err, color=c, capsize=3)
    for y, (v, r) in enumerate(zip(med, rows)):
        ax1.text(r["decode_tps"]["max"], y, f"  {v:.1f}", va="center", fontsize=8)
    ax1.set_xlabel("decode tokens/s (median, min–max)")
    ax2.barh(names, [r["ttft_s"]["median"] * 1e3 for r in rows], color=c)
    ax2.set_xlabel("time to first token, ms")
    fig.suptitle(textwrap.fill(machine_line(report), 150), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
