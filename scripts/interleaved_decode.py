"""Prefill and decode speed of several bundles, measured in turns in one process.

    python scripts/interleaved_decode.py POSITION BUNDLE... [--rounds 7] [--steps 32] [--threads 2]

Each round prefills POSITION random tokens and then decodes ``--steps`` tokens from there, in
each bundle in turn; the medians over the rounds are printed. `edgelm bench` measures one bundle
after the other, so a shared machine's drift (tens of percent here) can land on one row; in turns
it lands on every bundle alike. Used for the README's .pte attention comparison.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from edgelm.runtime import Engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("position", type=int, help="prompt length: decoding starts at this position")
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    engines = [Engine.load(b, threads=args.threads) for b in args.bundles]
    if any(args.position + args.steps > e.max_context for e in engines):
        raise SystemExit(f"position + steps ({args.position + args.steps}) exceeds a bundle's context window")
    prompt = np.random.default_rng(0).integers(100, min(e.manifest.model.vocab_size for e in engines),
                                               args.position).astype(np.int64)
    prefill: dict[str, list[float]] = {b: [] for b in args.bundles}
    decode: dict[str, list[float]] = {b: [] for b in args.bundles}
    for _ in range(args.rounds):
        for name, engine in zip(args.bundles, engines):
            backend, pos = engine.backend, 0
            t = time.perf_counter()
            while pos < args.position:  # chunks as the engine cuts them; a last chunk of one token is decoded
                n = min(backend.max_prefill, args.position - pos)
                if n >= 2:
                    backend.prefill(prompt[pos:pos + n], pos)
                else:
                    backend.decode(int(prompt[pos]), pos)
                pos += n
            prefill[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            for i in range(args.steps):
                backend.decode(5, args.position + i)
            decode[name].append((time.perf_counter() - t) / args.steps)
    for name in args.bundles:
        print(f"{name}: prefill of {args.position} tokens {statistics.median(prefill[name]) * 1e3:.0f} ms, "
              f"decode {1 / statistics.median(decode[name]):.1f} tok/s "
              f"(rounds {1 / max(decode[name]):.1f}-{1 / min(decode[name]):.1f})")


if __name__ == "__main__":
    main()
