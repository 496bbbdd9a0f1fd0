"""One command for the quantization table: every format x scheme it supports, beside fp32.

Converts the source once per (format, scheme) with the held-out quality report switched on,
then benchmarks every bundle in one `edgelm bench` run (same prompt and threads for all) and
prints a Markdown table: size, top-1 agreement, KL, perplexity (vs fp32), decode tokens/s and
the share of decode time the Python runtime spends outside the backend.
The conversions run with the quality gate opened wide so that a scheme that fails the default
gate still gets its row; the "gate" column says whether it would pass the defaults.

    python scripts/compare_schemes.py -o bench-results/schemes [--source SRC] [--formats pte,onnx]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from edgelm.bench import DEFAULT_PROMPT, run_row
from edgelm.bundle import load_manifest
from edgelm.converters.evaluate import QualityGate
from edgelm.converters.lowering import FORMATS, supported_schemes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--source", default=None, help="model to convert (default: the embedded SmolLM2)")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--schemes", default=None, help="comma-separated; default: all a format supports")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reuse", action="store_true", help="keep bundles that already exist")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bundles = []
    for fmt in args.formats.split(","):
        wanted = args.schemes.split(",") if args.schemes else supported_schemes(fmt)
        for scheme in [s for s in wanted if s in supported_schemes(fmt)]:
            out = args.out / f"{fmt}-{scheme}"
            if not (args.reuse and (out / "edgelm.json").is_file()):
                cmd = [sys.executable, "-m", "edgelm.cli", "convert", *([args.source] if args.source else []),
                       "-f", fmt, "-q", scheme, "-o", str(out), "--force", "--evaluate",
                       "--min-top1", "0", "--max-ppl-increase", "1000"]  # measure; judged below
                print("$", " ".join(cmd), flush=True)
                if subprocess.run(cmd).returncode != 0:
                    print(f"conversion failed for {fmt}/{scheme}; its row is left out", flush=True)
                    continue
            bundles.append(out)
    rows = []
    for b in bundles:
        print(f"benchmarking {b.name}...", flush=True)
        r = run_row({"kind": "bundle", "bundle": str(b), "prompt": DEFAULT_PROMPT, "new_tokens": args.new_tokens,
                     "runs": args.runs, "warmup": 1, "threads": args.threads})
        _, m = load_manifest(b, verify=False)
        r["quality"] = m.verification.get("quality", {})
        r["quantization"] = m.verification.get("lowering", {}).get("quantization", {})
        rows.append(r)
    fp32 = {r["format"]: r for r in rows if r["scheme"] == "fp32"}
    gate = QualityGate()
    lines = ["| format | scheme | size MB | size vs fp32 | top-1 | KL | perplexity (fp32) | decode tok/s (min–max) "
             "| overhead | gate |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        q, d = r["quality"], r["decode_tps"]
        rel = f"{r['size_mb'] / fp32[r['format']]['size_mb']:.0%}" if r["format"] in fp32 else "–"
        ppl = f"{q['perplexity']:.3f} ({q['perplexity_fp32']:.3f})" if q else "–"
        passed = "–" if not q else "pass" if (q["top1_agreement"] >= gate.min_top1 and q["perplexity"]
                                               <= q["perplexity_fp32"] * (1 + gate.max_ppl_increase)) else "FAIL"
        lines.append(f"| {r['format']} | {r['scheme']} | {r['size_mb']:.1f} | {rel} | "
                     f"{q.get('top1_agreement', float('nan')):.3f} | {q.get('mean_kl', float('nan')):.4f} | {ppl} | "
                     f"{d['median']:.1f} ({d['min']:.1f}–{d['max']:.1f}) | "
                     f"{r['overhead_share']['median']:.1%} | {passed} |")
    table = "\n".join(lines)
    print(table)
    (args.out / "schemes.md").write_text(table + "\n")
    (args.out / "schemes.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
