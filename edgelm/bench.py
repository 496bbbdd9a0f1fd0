"""Benchmarks that print numbers: time to first token, prefill and decode speed, peak memory.

Each row runs in its own process (``python -m edgelm.bench ROW_JSON``) so peak RSS and
thread settings belong to that row alone. Rows: a bundle through :class:`Engine`, or
PyTorch eager ``transformers`` (the baseline, host only). Every figure is the median of
several timed runs after warm-up, with min and max.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgelm.errors import EdgeLMError

DEFAULT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


def _int4_label(manifest) -> str:
    """`` symmetric`` for int4 groups without a minimum (GGUF Q4_0's form), else ``""``."""
    q = (manifest.verification or {}).get("lowering", {}).get("quantization") or {}
    return " symmetric" if q.get("zero_point") == "symmetric" else ""


def _compressed_label(source: dict[str, Any]) -> str:
    """`` (compressed to 70% of the parameters)`` for a pruned/factored bundle, else ``""``."""
    c = source.get("compression") or {}
    ratio = c.get("params_ratio")
    return f" (compressed to {ratio:.0%} of the parameters)" if ratio and ratio < 1 else ""


def _kv_label(manifest) -> str:
    """``, int8 KV cache`` for a bundle whose cache is not fp32, else ``""``."""
    kv = manifest.io.get("kv_cache_dtype", "fp32")
    return "" if kv == "fp32" else f", {kv} KV cache"


def _attention_label(manifest) -> str:
    """``, portable attention`` for a .pte without ExecuTorch's llama:: kernels, else ``""``."""
    return ", portable attention" if manifest.io.get("attention") == "portable" else ""


def _bundle_label(manifest) -> str:
    return (f"edgelm {manifest.format} {manifest.scheme}" + _int4_label(manifest) + _kv_label(manifest)
            + _attention_label(manifest) + _compressed_label(manifest.source))


def _model_bytes(manifest) -> int:
    return sum(f["size"] for name, f in manifest.files.items() if name != manifest.tokenizer_file)


def row_name_and_size(engine) -> tuple[str, int]:
    """A bench row's name and model bytes (tokenizer excluded). With a draft attached the row
    says so, and the size counts both bundles: a device would hold both."""
    m = engine.manifest
    name, size = _bundle_label(m), _model_bytes(m)
    if engine.draft is not None:
        dm = engine.draft.manifest
        name += f" + draft {_bundle_label(dm).removeprefix('edgelm ')} (speculative, {engine.draft_tokens} tokens)"
        size += _model_bytes(dm)
    elif engine.lookup:
        name += f" + prompt lookup (speculative, up to {engine.draft_tokens} tokens)"
    return name, size


def sampling_label(sampling: dict[str, Any] | None) -> str:
    """``, sampled (temperature 0.7, top-p 0.9)`` for a row that samples, ``""`` for greedy."""
    if not sampling or not sampling.get("temperature"):
        return ""
    parts = [f"temperature {sampling['temperature']:g}"]
    if sampling.get("top_k"):
        parts.append(f"top-k {sampling['top_k']}")
    if sampling.get("top_p", 1.0) < 1.0:
        parts.append(f"top-p {sampling['top_p']:g}")
    return f", sampled ({', '.join(parts)})"


TIMINGS = ("ttft_s", "prefill_tps", "decode_tps", "overhead_share", "acceptance")  # a row's timed figures


def bench_bundle(bundle: str, prompt: str = DEFAULT_PROMPT, new_tokens: int = 64, runs: int = 5,
                 warmup: int = 1, threads: int | None = None, chat: bool = True, draft: str | None = None,
                 draft_tokens: int = 5, lookup: int = 0, sampling: dict[str, Any] | None = None) -> dict[str, Any]:
    """Time ``runs`` generations of exactly ``new_tokens`` tokens from ``bundle``: greedy, or with
    ``sampling`` (:class:`~edgelm.sampling.SamplingConfig` fields) when given; speculatively with
    ``draft``, or with prompt lookup of up to ``lookup``-grams, proposing up to ``draft_tokens``
    at a time, when given."""
    from edgelm.runtime import Engine
    from edgelm.sampling import SamplingConfig

    t = time.perf_counter()
    engine = Engine.load(bundle, threads=threads, draft=draft, draft_tokens=draft_tokens, lookup=lookup)
    load_s = time.perf_counter() - t
    ids = engine.encode_prompt(prompt, chat=chat and bool(engine.manifest.chat_template))
    keys = [k for k in TIMINGS if k != "acceptance" or engine.speculative]
    samples: dict[str, list[float]] = {k: [] for k in keys}
    first: list[int] = []
    for i in range(warmup + runs):
        engine.reset()  # every run prefills the whole prompt
        tokens = list(engine.generate_ids(ids, max_new_tokens=new_tokens, ignore_eos=True,
                                          sampling=SamplingConfig(**sampling) if sampling else None))
        first = first or tokens
        if i >= warmup:
            s = engine.last_stats
            for k in samples:
                samples[k].append(getattr(s, k))
    m = engine.manifest
    name, size = row_name_and_size(engine)
    name += sampling_label(sampling)
    extra: dict[str, Any] = {"draft_tokens": engine.draft_tokens} if engine.speculative else {}
    if sampling:
        extra["sampling"] = sampling
    if engine.draft is not None:
        extra["draft"] = str(draft)
    if engine.lookup:
        extra["lookup"] = engine.lookup
    return {
        "name": name, "kind": "bundle", "bundle": str(bundle), **extra, "format": m.format,
        "scheme": m.scheme, "threads": getattr(engine.backend, "threads", threads), "prompt_tokens": len(ids),
        "new_tokens": new_tokens, "runs": runs, "warmup": warmup, "load_s": load_s,
        **{k: _summary(v) for k, v in samples.items()},
        "peak_rss_mb": peak_rss_mb(), "size_mb": size / 1e6, "tokens": first,
        # .pte rows: whether the methods shared one packed copy of the weights (README: Memory)
        **({"weight_cache": engine.backend.weight_cache} if hasattr(engine.backend, "weight_cache") else {}),
    }


def run_row(row: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run one benchmark row in a fresh Python process and return its result.

    A row with ``"small_pages": True`` runs without the huge pages this process may have
    (:mod:`edgelm.runtime.hugepages`): the baseline that shows what they are worth.
    """
    env = None
    if row.get("small_pages"):
        from edgelm.runtime.hugepages import TUNABLE

        env = {**os.environ, "EDGELM_HUGE_PAGES": "0"}
        kept = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith(TUNABLE)]
        env["GLIBC_TUNABLES"] = ":".join(kept)
    proc = subprocess.run([sys.executable, "-m", "edgelm.bench", json.dumps(row)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = proc.stderr.strip().splitlines()
        raise EdgeLMError(f"benchmark row {row.get('kind')} {row.get('bundle', '')} failed: "
                          f"{err[-1] if err else 'no output'}")
    return json.loads(lines[-1])


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from its results in several rounds (``edgelm bench --rounds``): each timing's median is the median
    of the rounds' medians, its min and max those of all runs; each round's median is kept (``"rounds"``); peak
    RSS is the highest, a bundle's load time the median."""
    if len(rounds) == 1:
        return rounds[0]
    row = dict(rounds[0])
    row["rounds"] = {}
    for k in TIMINGS:
        if k in row:
            medians = [r[k]["median"] for r in rounds]
            row[k] = {"median": statistics.median(medians), "min": min(r[k]["min"] for r in rounds),
                      "max": max(r[k]["max"] for r in rounds)}
            row["rounds"][k] = medians
    row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rounds)
    if "load_s" in row:  # bundle rows
        row["load_s"] = statistics.median(r["load_s"] for r in rounds)
    return row


def machine_info() -> dict[str, Any]:
    """What makes a run reproducible: CPU model, cores, Python, package versions."""
    info: dict[str, Any] = {"machine": platform.machine(), "system": platform.system(),
                            "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from edgelm.runtime.hugepages import describe

    info["huge_pages"] = describe()
    gov = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    if gov.is_file():
        info["governor"] = gov.read_text().strip()
    from importlib import metadata

    versions = {}
    for pkg in ("edgelm", "numpy", "tokenizers", "executorch", "torch", "onnxruntime", "ai-edge-litert",
                "transformers"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    return info


def format_table(rows: list[dict[str, Any]], baseline: str | None = None) -> str:
    """A Markdown table; speed ratios are against the row named ``baseline`` (same run)."""
    base = next((r for r in rows if r["name"] == baseline), None)
    head = ("| row | size MB | peak RSS MB | TTFT ms | prefill tok/s | decode tok/s (min–max) | decode vs "
            f"{baseline or 'baseline'} |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d = r["decode_tps"]
        ratio = f"{d['median'] / base['decode_tps']['median']:.2f}x" if base else "–"
        size = f"{r['size_mb']:.1f}" if r.get("size_mb") else "–"
        name = r["name"] + (f", {r['acceptance']['median']:.0%} of draft tokens kept" if r.get("acceptance") else "")
        lines.append(f"| {name} | {size} | {r['peak_rss_mb']:.0f} | {r['ttft_s']['median'] * 1e3:.0f} | "
                     f"{r['prefill_tps']['median']:.0f} | {d['median']:.1f} ({d['min']:.1f}–{d['max']:.1f}) | "
                     f"{ratio} |")
    return "\n".join(lines)


def _main(argv: list[str]) -> int:
    row = json.loads(argv[0])
    kind = row.pop("kind")
    small_pages = row.pop("small_pages", False)
    top1_ref = row.pop("top1_ref", None)  # edgelm.compare: held-out top-1 agreement, after the timings
    if kind == "bundle":
        result = bench_bundle(**row)
    elif kind == "eager":
        from edgelm.converters.baseline import bench_eager

        result = bench_eager(**row)
    elif kind in ("llamacpp", "reference"):
        from edgelm.compare import ROW_KINDS

        result = ROW_KINDS[kind](**row)
    else:
        raise SystemExit(f"unknown row kind {kind!r}")
    from edgelm.runtime.hugepages import describe

    result["huge_pages"] = describe()
    if small_pages:
        result["name"] += ", small pages"
    if top1_ref:
        from edgelm.compare import top1_agreement

        result["top1"] = top1_agreement(kind, row, top1_ref)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
